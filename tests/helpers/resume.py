"""Resume-exactness harness: fit N epochs uninterrupted, and fit k, checkpoint, resume to N.

Final weights and every callback's state must be bitwise identical (CPU). The checkpoint is taken
inside the uninterrupted run at the end of epoch k, so one run gives both the reference and the
checkpoint, exactly as a job killed after epoch k and restarted from its last checkpoint would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, progress bar, summary or checkpointing unless asked for."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def assert_bitwise_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality where tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: type differs"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a.cpu(), b.cpu()), (
            f"{path}: values differ (max abs diff {(a.double() - b.double()).abs().max().item()})"
        )
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (
            f"{path}: keys differ: {set(a) ^ set(b)}"
        )
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class _SaveAtEpochEnd(Callback):
    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch - 1:
            trainer.save_checkpoint(self.path)


@dataclass
class ResumeResult:
    full_module: pl.LightningModule
    full_callbacks: list[Callback]
    resumed_module: pl.LightningModule
    resumed_callbacks: list[Callback]
    checkpoint: Path


def check_resume_exact(
    make_module: Callable[[], pl.LightningModule],
    make_callbacks: Callable[[], list[Callback]],
    make_datamodule: Callable[[], pl.LightningDataModule],
    tmp_path: Path,
    *,
    max_epochs: int = 4,
    split_epoch: int = 2,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> ResumeResult:
    """Run both schedules and assert bitwise equality of weights and callback states."""
    ckpt = Path(tmp_path) / f"epoch{split_epoch}.ckpt"

    pl.seed_everything(seed, verbose=False)
    full_module, full_callbacks = make_module(), make_callbacks()
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        callbacks=[*full_callbacks, _SaveAtEpochEnd(split_epoch, ckpt)],
        **trainer_kwargs,
    )
    trainer.fit(full_module, datamodule=make_datamodule())
    assert ckpt.exists(), "the harness failed to write its mid-run checkpoint"

    pl.seed_everything(seed + 1, verbose=False)  # a different seed must not matter after resume
    resumed_module, resumed_callbacks = make_module(), make_callbacks()
    trainer2 = quiet_trainer(max_epochs=max_epochs, callbacks=resumed_callbacks, **trainer_kwargs)
    trainer2.fit(resumed_module, datamodule=make_datamodule(), ckpt_path=ckpt)

    assert trainer.global_step == trainer2.global_step
    assert_bitwise_equal(full_module.state_dict(), resumed_module.state_dict(), "weights")
    for i, (a, b) in enumerate(zip(full_callbacks, resumed_callbacks)):
        assert_bitwise_equal(a.state_dict(), b.state_dict(), f"callback[{i}]:{type(a).__name__}")
    return ResumeResult(full_module, full_callbacks, resumed_module, resumed_callbacks, ckpt)


# ------------------------------------------------------------------ kill-and-resume in children

KillPoint = Literal["mid_epoch", "last_batch", "epoch_boundary"]
KILL_POINTS: tuple[KillPoint, ...] = ("mid_epoch", "last_batch", "epoch_boundary")


class KillAfterCheckpoint(Checkpoint):
    """Writes a checkpoint at ``point`` of epoch ``epoch``, as ``ModelCheckpoint`` would there,
    then SIGKILLs its own process (every rank, once rank 0's file is on disk).

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback's hook, where
    ``ModelCheckpoint`` runs: ``mid_epoch`` after batch ``batch`` of the epoch, ``last_batch``
    after the epoch's last batch (before its end hooks), ``epoch_boundary`` in
    ``on_train_epoch_end``.
    """

    def __init__(self, point: KillPoint, path: Path, epoch: int = 1, batch: int = 1) -> None:
        self.point, self.path, self.epoch, self.batch = point, Path(path), epoch, batch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch != self.epoch or self.point == "epoch_boundary":
            return
        batch_idx = args[-1]
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if (self.point == "mid_epoch" and batch_idx == self.batch and not last) or (
            self.point == "last_batch" and last
        ):
            self._save_and_die(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.point == "epoch_boundary" and trainer.current_epoch == self.epoch:
            self._save_and_die(trainer)

    def _save_and_die(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        trainer.strategy.barrier("killed after the checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Forked:
    """How a forked child ended: its exit code (``-9``: SIGKILL) and what it returned."""

    exitcode: int | None
    value: Any = None
    error: str | None = None


def save_outcome(
    fn: Callable[..., Any], out: Path, args: tuple = (), kwargs: dict[str, Any] | None = None
) -> None:
    """In a child process: call ``fn`` on one thread and save ``{"value": ...}``, or
    ``{"error": traceback}`` for the parent, which fails the test with it."""
    torch.set_num_threads(1)
    try:
        value: dict[str, Any] = {"value": fn(*args, **(kwargs or {}))}
    except BaseException:  # handed to the parent
        value = {"error": traceback.format_exc()[-4000:]}
    torch.save(value, out)


def run_forked(fn: Callable[..., Any], *args: Any, timeout: float = 120, **kwargs: Any) -> Forked:
    """Call ``fn`` in a child forked from this process (imports already paid): its return value,
    or how it died. A child still running after ``timeout`` seconds is killed: a hang fails."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        process = context.Process(target=save_outcome, args=(fn, out, args, kwargs))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f"{getattr(fn, '__name__', fn)} hung for {timeout} s: killed")
        if not out.exists():
            return Forked(process.exitcode)
        result = torch.load(out, weights_only=False)
    return Forked(process.exitcode, result.get("value"), result.get("error"))


def strip_root(obj: Any, root: Path) -> Any:
    """``obj`` with every string or path under ``root`` written ``<root>/...``, so that two runs
    in two folders compare equal where they hold the same files."""
    if isinstance(obj, str | Path):
        text = str(obj)
        for prefix in (str(Path(root).resolve()), str(root)):
            text = text.replace(prefix, "<root>")
        return text if isinstance(obj, str) or text != str(obj) else obj
    if isinstance(obj, Mapping):
        return {k: strip_root(v, root) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(strip_root(v, root) for v in obj)
    return obj


def read_outputs(root: Path) -> dict[str, Any]:
    """Every file under ``root`` by relative path, in a comparable form: tensors files loaded,
    JSON parsed, text as text (``root`` itself replaced by ``<root>``), anything else as bytes."""
    found: dict[str, Any] = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix in (".pt", ".ckpt", ".pth"):
            found[name] = strip_root(torch.load(path, map_location="cpu", weights_only=False), root)
        elif path.suffix in (".json", ".csv", ".txt", ".md", ".yaml"):
            text = strip_root(path.read_text(), root)
            found[name] = json.loads(text) if path.suffix == ".json" else text
        else:
            found[name] = path.read_bytes()
    return found
