"""The writers' edge matrix: every command and function that writes x the faults where users lose
files (DESIGN.md principle 11). One test, ``test_writer_edge[<writer>-<fault>]``; each cell checks
a property that failed before the rules of ``lightning_ext._io.check_output`` and ``atomic_write``.

``tools/edges_table.py`` turns ``WRITERS``, ``FAULTS``, ``NOT_APPLICABLE`` and a run's outcomes
into ``docs/edges.md``.

Faults:

- ``output-is-input``: the output names one of the inputs (or a file inside an input folder, or
  a shard of a sharded safetensors input or output): refused in one line naming it, even with
  ``--overwrite``, the input unchanged, nothing computed.
- ``existing-output``: refused in one line naming ``--overwrite``, the file unchanged.
- ``existing-output-overwrite-keeps-mode``: with ``--overwrite`` (``overwrite=True``; appending for
  ``write_scores``) the replaced file keeps mode 600.
- ``read-only-dir``: one line naming the output (not a hidden temporary file), before any work.
  Root writes into a 555 folder, so under root (CI) creating a file there is made to fail with
  EACCES by patching ``os.open``/``os.replace``; otherwise the folder is really made read-only.
- ``output-is-directory``: one line naming the output, before any work, the folder untouched.
- ``disk-full``: ``atomic_torch_save`` under a real ``ulimit -f`` (``RLIMIT_FSIZE``, SIGXFSZ
  ignored) in a forked child process; the commands under an ``ENOSPC`` from ``fsync``
  in-process: one line naming the output, the old file intact, no temporary file left.
- ``sigkill-mid-write``: a writer killed mid-write leaves ``.<name>.<pid>@<host>.<rand>.tmp``;
  the next write to that target removes it (the files of a live writer, or of a writer on another
  host, are kept). ``atomic_torch_save``: a real SIGKILL of a forked child; the commands: a
  temporary file of a process that is gone.
- ``concurrent-writers``: 8 processes at the same instant (forked, released by one barrier):
  ``write_scores`` keeps all 8 rows; ``run_dir`` gives 8 distinct folders (each process's listing
  of the versions made slow, so that all list before any creates); with CSV loggers, which pick
  versions by listing, each process owns a distinct folder or is refused naming another live
  run (all 8 given ``version=0``: 1 owner, 7 refusals); 8 fits sharing one
  ``PostHocEMA(snapshot_dir=...)`` reach fit start together: 1 owner, 7 refusals naming the
  folder and ``snapshot_dir``, and the owner resumed is accepted.
"""

from __future__ import annotations

import contextlib
import errno
import io
import multiprocessing
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_ext._io import atomic_torch_save, atomic_write, load_file, temp_name
from lightning_ext.cli import main as cli_main
from lightning_ext.functional.ema import sigma_rel_to_gamma
from lightning_ext.io.adapters import WEIGHTS, merge_peft_adapters, save_peft_adapter
from lightning_ext.io.ema import export_ema, write_posthoc_ema, write_snapshot
from lightning_ext.io.safetensors import INDEX_SUFFIX, SUFFIX, save_safetensors
from lightning_ext.io.scores import write_scores
from lightning_ext.io.sparse import export_sparse_checkpoint

REPO = Path(__file__).resolve().parents[2]
ADAPTER_WEIGHTS = WEIGHTS[0]
FAULTS = (
    "output-is-input",
    "existing-output",
    "existing-output-overwrite-keeps-mode",
    "read-only-dir",
    "output-is-directory",
    "disk-full",
    "sigkill-mid-write",
    "concurrent-writers",
)


class Refused(Exception):
    """A writer said no (or failed) with this message."""


# --------------------------------------------------------------------------- the writers


def _cli(*argv: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(list(argv))
    if code:  # the error lines (a progress bar may precede them on stderr)
        errors = [line for line in err.getvalue().splitlines() if line.startswith("lightning-ext")]
        raise Refused("\n".join(errors) or err.getvalue().strip())


def _python(call: Callable[[], Any]) -> None:
    try:
        call()
    except (ValueError, OSError) as error:
        raise Refused(str(error)) from error


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}


def _soup_inputs(tmp: Path) -> list[Path]:
    paths = [tmp / "a.pt", tmp / "b.pt"]
    for i, path in enumerate(paths):
        torch.save(_weights(i), path)
    return paths


def _ema_inputs(tmp: Path) -> list[Path]:
    ema = {"EMA{'decay': 0.999}": {"shadow": _weights(1)}}
    torch.save({"state_dict": _weights(0), "callbacks": ema}, tmp / "run.ckpt")
    return [tmp / "run.ckpt"]


def _sparse_inputs(tmp: Path) -> list[Path]:
    state = {"DynamicSparseTraining": {"names": ["w"], "masks": [torch.rand(8, 8) > 0.5]}}
    torch.save({"state_dict": _weights(0), "callbacks": state}, tmp / "run.ckpt")
    return [tmp / "run.ckpt"]


def _norms_inputs(tmp: Path) -> list[Path]:
    norms = torch.linspace(2.0, 0.5, 40, dtype=torch.float64)
    torch.save({"grad_norms": [norms], "norm": ["l2"]}, tmp / "grad_norms.pt")
    return [tmp / "grad_norms.pt"]


LABELS = torch.arange(32) % 4


def _add_scores(path: Path, seed: int = 0, run_name: str | None = None) -> None:
    scores = torch.rand(32, generator=torch.Generator().manual_seed(seed))
    write_scores(path, scores, LABELS, score="el2n", run_name=run_name, task="classification")


def _scores_inputs(tmp: Path) -> list[Path]:
    _add_scores(tmp / "scores.pt")
    return [tmp / "scores.pt"]


def _snapshot_inputs(tmp: Path) -> list[Path]:
    folder = tmp / "snapshots"
    folder.mkdir()
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    entries: list[dict[str, Any]] = []
    for step in (10, 20):
        entry = {"file": f"phema_{step:010d}.pt", "step": step, "gammas": gammas}
        write_snapshot(
            folder, entry, [_weights(step), _weights(step + 1)], {}, run_id="r", earlier=entries
        )
        entries.append(entry)
    return [folder, folder / entries[0]["file"]]


def _build_soup(inputs: list[Path], out: Path, overwrite: bool) -> None:
    from lightning_ext.workflows.soup import build_soup
    from tests.helpers.data import digits, loader
    from tests.helpers.models import Classifier

    data = loader(digits("val", limit=64), 64, None)
    _python(
        lambda: build_soup(
            Classifier(),
            [str(p) for p in inputs],
            method="uniform",
            dataloaders=data,
            progress_bar=False,
            plot=out,
            overwrite=overwrite,
        )
    )


def _classifier_inputs(tmp: Path) -> list[Path]:
    from tests.helpers.models import Classifier

    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp / f"ft{i}.pt")
        torch.save(Classifier().state_dict(), paths[-1])
    return paths


def _st_soup_inputs(tmp: Path) -> list[Path]:
    paths = [tmp / "a.safetensors", tmp / "b.safetensors"]
    for i, path in enumerate(paths):
        save_safetensors(_weights(i), path)
    return paths


def _sharded_inputs(tmp: Path) -> list[Path]:
    """A .pt ingredient and the shard of a sharded one (its index gone): a soup to that index's
    name would write the shard over the input."""
    torch.save(_weights(0), tmp / "a.pt")
    index = tmp / "in" / f"model{INDEX_SUFFIX}"
    save_safetensors(_weights(1), index)
    index.unlink()
    return [tmp / "a.pt", tmp / "in" / f"model-00001-of-00001{SUFFIX}"]


def _from_sharded_inputs(tmp: Path) -> list[Path]:
    """A .pt ingredient and a sharded safetensors one: an output named as its first shard would
    replace part of an input that check_output sees only as the index."""
    torch.save(_weights(0), tmp / "a.pt")
    index = tmp / "in" / f"model{INDEX_SUFFIX}"
    save_safetensors(_weights(1), index, max_shard_bytes=256)
    return [tmp / "a.pt", index]


def _adapter_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A rank-2 PEFT LoRA adapter on one 8 -> 8 linear layer, and its config."""
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.lin"
    state = {
        f"{prefix}.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{prefix}.lora_B.weight": torch.randn(8, 2, generator=g),
    }
    return state, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}


def _adapter_inputs(tmp: Path) -> list[Path]:
    return [save_peft_adapter(tmp / f"lora{i}", *_adapter_state(i)) for i in range(2)]


def _refine(inputs: list[Path], out: Path, overwrite: bool) -> None:
    from lightning_ext.io.schedule import load_grad_norms, write_refined_schedule

    norms, kinds = load_grad_norms(inputs[0])
    _python(lambda: write_refined_schedule(
        norms, kinds, out, window=5, inputs=inputs, overwrite=overwrite))  # type: ignore[arg-type]  # fmt: skip


def _flag(overwrite: bool) -> list[str]:
    return ["--overwrite"] if overwrite else []


@dataclass(frozen=True)
class Writer:
    """How to run one writer: make its inputs, write ``out``; ``heavy`` is the work that must not
    start before the output is checked (patched to fail in the refusal cells)."""

    inputs: Callable[[Path], list[Path]]
    write: Callable[[list[Path], Path, bool], None]
    heavy: str | None = None
    suffix: str = ".pt"
    inside: str | None = None  # the output is a folder: the file in it that the cells watch
    clash: Callable[[list[Path]], Path] | None = None  # the output that replaces the last input

    def main(self, out: Path) -> Path:
        """The file the cells watch: ``out``, the file inside an output folder, or the first
        shard beside a sharded safetensors index."""
        if out.name.endswith(INDEX_SUFFIX):
            return out.parent / f"{out.name[: -len(INDEX_SUFFIX)]}-00001-of-00001{SUFFIX}"
        return out / self.inside if self.inside else out


WRITERS: dict[str, Writer] = {
    "soup": Writer(
        _soup_inputs,
        lambda i, o, w: _cli("soup", *map(str, i), "-o", str(o), *_flag(w)),
        heavy="lightning_ext.cli.soup.merge",
    ),
    "export_ema": Writer(
        _ema_inputs,
        lambda i, o, w: _cli("export-ema", str(i[0]), str(o), *_flag(w)),
        heavy="lightning_ext.io.ema.ema_state_dict_from_checkpoint",
    ),
    "sparse_export": Writer(
        _sparse_inputs,
        lambda i, o, w: _cli("sparse-export", str(i[0]), str(o), "--format", "dense", *_flag(w)),
        heavy="lightning_ext.io.sparse.load_file",
    ),
    "refine_schedule": Writer(
        _norms_inputs,
        lambda i, o, w: _cli(
            "refine-schedule", str(i[0]), "-o", str(o), "--window", "5", *_flag(w)
        ),
        heavy="lightning_ext.io.schedule.load_grad_norms",
    ),
    "prune_select": Writer(
        _scores_inputs,
        lambda i, o, w: _cli(
            "prune-select", str(i[0]), "--keep", "0.5", "--out", str(o), *_flag(w)
        ),
        heavy="lightning_ext.io.scores.load_scores",
    ),
    "posthoc_ema": Writer(
        _snapshot_inputs,
        lambda i, o, w: _cli("posthoc-ema", str(i[0]), str(o), "--sigma-rel", "0.08", *_flag(w)),
        heavy="lightning_ext.io.ema.posthoc_ema_state_dict",
    ),
    "write_scores": Writer(lambda tmp: [], lambda i, o, w: _python(lambda: _add_scores(o))),
    "build_soup_plot": Writer(
        _classifier_inputs,
        _build_soup,
        heavy="lightning_ext.workflows.soup.run_soup",
        suffix=".png",
    ),
    "atomic_torch_save": Writer(
        lambda tmp: [], lambda i, o, w: _python(lambda: atomic_torch_save(_weights(0), o))
    ),
    "run_dir": Writer(lambda tmp: [], lambda i, o, w: None),
    "PostHocEMA": Writer(lambda tmp: [], lambda i, o, w: None),
    "soup_safetensors": Writer(
        _st_soup_inputs,
        lambda i, o, w: _cli("soup", *map(str, i), "-o", str(o), *_flag(w)),
        heavy="lightning_ext.cli.soup.merge",
        suffix=".safetensors",
    ),
    "soup_sharded": Writer(
        _sharded_inputs,
        lambda i, o, w: _cli("soup", *map(str, i), "-o", str(o), *_flag(w)),
        heavy="lightning_ext.cli.soup.merge",
        suffix=INDEX_SUFFIX,
        clash=lambda inputs: inputs[-1].parent / f"model{INDEX_SUFFIX}",
    ),
    "soup_from_sharded": Writer(
        _from_sharded_inputs,
        lambda i, o, w: _cli("soup", *map(str, i), "-o", str(o), *_flag(w)),
        heavy="lightning_ext.cli.soup.merge",
        suffix=SUFFIX,
        clash=lambda inputs: inputs[-1].parent / f"model-00001-of-00002{SUFFIX}",
    ),
    "export_ema_safetensors": Writer(
        _ema_inputs,
        lambda i, o, w: _cli("export-ema", str(i[0]), str(o), *_flag(w)),
        heavy="lightning_ext.io.ema.ema_state_dict_from_checkpoint",
        suffix=".safetensors",
    ),
    "posthoc_ema_safetensors": Writer(
        _snapshot_inputs,
        lambda i, o, w: _cli("posthoc-ema", str(i[0]), str(o), "--sigma-rel", "0.08", *_flag(w)),
        heavy="lightning_ext.io.ema.posthoc_ema_state_dict",
        suffix=".safetensors",
    ),
    "merge_adapters": Writer(
        _adapter_inputs,
        lambda i, o, w: _cli("merge-adapters", *map(str, i), "-o", str(o), *_flag(w)),
        heavy="lightning_ext.io.adapters.merge_lora_adapters",
        suffix="",
        inside=ADAPTER_WEIGHTS,
    ),
    "export_ema_py": Writer(
        _ema_inputs,
        lambda i, o, w: _python(lambda: export_ema(i[0], o, overwrite=w)),
        heavy="lightning_ext.io.ema.ema_state_dict_from_checkpoint",
    ),
    "export_sparse_checkpoint": Writer(
        _sparse_inputs,
        lambda i, o, w: _python(lambda: export_sparse_checkpoint(i[0], o, "dense", overwrite=w)),
        heavy="lightning_ext.io.sparse.load_file",
    ),
    "write_posthoc_ema": Writer(
        _snapshot_inputs,
        lambda i, o, w: _python(lambda: write_posthoc_ema(i[0], 0.08, o, overwrite=w)),
        heavy="lightning_ext.io.ema.posthoc_ema_state_dict",
    ),
    "write_refined_schedule": Writer(
        _norms_inputs, _refine, heavy="lightning_ext.io.schedule.refine_schedule"
    ),
    "merge_peft_adapters": Writer(
        _adapter_inputs,
        lambda i, o, w: _python(lambda: merge_peft_adapters(i, o, overwrite=w)),
        heavy="lightning_ext.io.adapters.merge_lora_adapters",
        suffix="",
        inside=ADAPTER_WEIGHTS,
    ),
    "save_safetensors": Writer(
        lambda tmp: [],
        lambda i, o, w: _python(lambda: save_safetensors(_weights(0), o)),
        suffix=".safetensors",
    ),
    "save_peft_adapter": Writer(
        lambda tmp: [],
        lambda i, o, w: _python(lambda: save_peft_adapter(o, *_adapter_state())),
        suffix="",
        inside=ADAPTER_WEIGHTS,
    ),
}

TARGETS = tuple(WRITERS)  # the rows of docs/edges.md

#: Cells that do not apply, with the reason printed in docs/edges.md.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    **{
        (w, "concurrent-writers"): "one output per command run"
        for w in ("soup", "export_ema", "sparse_export", "refine_schedule", "prune_select")
    },
    ("posthoc_ema", "concurrent-writers"): "one output per command run",
    ("build_soup_plot", "concurrent-writers"): "one output per call",
    ("write_scores", "output-is-input"): "reads nothing but the file it appends to",
    ("atomic_torch_save", "output-is-input"): "the primitive: callers check (check_output)",
    ("atomic_torch_save", "existing-output"): "the primitive replaces by contract",
    ("atomic_torch_save", "concurrent-writers"): "each writer renames a whole file",
    **{
        (w, "concurrent-writers"): "one output per call"
        for w in (
            "soup_safetensors",
            "soup_sharded",
            "soup_from_sharded",
            "export_ema_safetensors",
            "posthoc_ema_safetensors",
            "merge_adapters",
            "export_ema_py",
            "export_sparse_checkpoint",
            "write_posthoc_ema",
            "write_refined_schedule",
            "merge_peft_adapters",
        )
    },
    **{
        (w, f): reason
        for w in ("save_safetensors", "save_peft_adapter")
        for f, reason in (
            ("output-is-input", "the primitive: callers check (check_output)"),
            ("existing-output", "the primitive replaces by contract"),
            ("concurrent-writers", "each writer renames whole files"),
        )
    },
    **{
        (w, "output-is-directory"): "the output is a folder"
        for w in ("merge_adapters", "merge_peft_adapters", "save_peft_adapter")
    },
    **{
        (w, f): "a folder claim, not a file writer"
        for w in ("run_dir", "PostHocEMA")
        for f in FAULTS
        if f not in ("concurrent-writers", "read-only-dir")
    },
}

CELLS = [(w, f) for w in WRITERS for f in FAULTS if (w, f) not in NOT_APPLICABLE]


# --------------------------------------------------------------------------- checks


def _one_line(message: str, *names: Path) -> None:
    assert message and "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message and ".tmp" not in message, message
    for name in names:
        assert str(name) in message, f"{name} not named in: {message}"


def _refusal(writer: Writer, inputs: list[Path], out: Path, overwrite: bool = False) -> str:
    with pytest.raises(Refused) as refused:
        writer.write(inputs, out, overwrite)
    return str(refused.value)


def _no_heavy_work(monkeypatch: pytest.MonkeyPatch, writer: Writer) -> None:
    if writer.heavy is None:
        return
    module, name = writer.heavy.rsplit(".", 1)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{writer.heavy} ran before the output was checked")

    monkeypatch.setattr(f"{module}.{name}", forbidden)


def _content(path: Path) -> dict[str, bytes]:
    """A file's bytes, or every file's under a folder, by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file()}  # fmt: skip


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No new file in ``folder``: chmod 555, or (root ignores modes) EACCES from os.open/replace."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    real_open, real_replace, real_mkdir = os.open, os.replace, os.mkdir

    def inside(path: Any) -> bool:
        return Path(path).resolve().parent == folder.resolve()

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if inside(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real_replace(src, dst, **kwargs)

    def guarded_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", guarded_open)
        patch.setattr(os, "replace", guarded_replace)
        patch.setattr(os, "mkdir", guarded_mkdir)
        yield


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _forked(target: Callable[[int], Any], n: int = 8, timeout: float = 60) -> list[Any]:
    """Run ``target(i)`` in ``n`` forked processes released together; their results (or the text
    of their exceptions). A process still running after ``timeout`` fails the test."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.put((i, target(i)))
        except Exception as error:  # reported to the parent, which asserts on it
            results.put((i, f"{type(error).__name__}: {error}"))

    procs = [ctx.Process(target=run, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, "a concurrent writer died or hung"
    return [out[i] for i in range(n)]


def _in_child(target: Callable[[], Any], timeout: float = 60) -> tuple[int | None, Any]:
    """Run ``target`` in one forked process (no new interpreter to start): its exit code and what
    it returned (or the text of its exception)."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def run() -> None:
        try:
            results.put(target())
        except Exception as error:
            results.put(f"{type(error).__name__}: {error}")

    proc = ctx.Process(target=run)
    proc.start()
    proc.join(timeout)
    assert proc.exitcode is not None, "the child process hung"
    return proc.exitcode, results.get(timeout=1) if proc.exitcode == 0 else None


# --------------------------------------------------------------------------- the cells


def _output_is_input(w: Writer, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    inputs = w.inputs(tmp)
    target = inputs[-1]  # posthoc_ema: a snapshot inside the folder; adapters: an input folder
    out = w.clash(inputs) if w.clash else target  # an index and one of its shards
    before = _content(target), _content(out)
    _no_heavy_work(mp, w)
    message = _refusal(w, inputs, out, overwrite=True)  # an input is never replaced
    _one_line(message, out)
    assert (_content(target), _content(out)) == before


def _existing_output(name: str, w: Writer, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    inputs = w.inputs(tmp)
    out = tmp / f"out{w.suffix}"
    main = w.main(out)
    main.parent.mkdir(exist_ok=True)
    if name == "write_scores":  # a file of another kind under the score file's name
        torch.save(torch.zeros(3), out)
    else:
        main.write_bytes(b"an earlier result")
        _no_heavy_work(mp, w)
    before = main.read_bytes()
    message = _refusal(w, inputs, out)
    _one_line(message, out)
    assert ("--overwrite" in message) or name == "write_scores"
    assert main.read_bytes() == before


def _keeps_mode(name: str, w: Writer, tmp: Path) -> None:
    inputs = w.inputs(tmp)
    out = tmp / f"out{w.suffix}"
    main = w.main(out)
    w.write(inputs, out, False)
    main.chmod(0o600)
    written = main.stat().st_mtime_ns
    os.utime(main, ns=(written - 10**9, written - 10**9))
    w.write(inputs, out, True)
    assert oct(main.stat().st_mode & 0o777) == oct(0o600)
    assert main.stat().st_mtime_ns >= written, "the file was not replaced"
    if name == "write_scores":
        assert len(load_file(out)["run_names"]) == 2
    assert _temps(main.parent) == []


def _read_only_dir(w: Writer, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    inputs = w.inputs(tmp)
    folder = tmp / "ro"
    folder.mkdir()
    out = folder / f"out{w.suffix}"
    _no_heavy_work(mp, w)
    with _read_only(folder, mp):
        message = _refusal(w, inputs, out)
    _one_line(message, out)
    assert list(folder.iterdir()) == []


def _bare_trainer(root: Path, logger: Any = None) -> SimpleNamespace:
    """What ``run_dir`` reads of a Trainer (without a logger, or with ``logger``), on one
    process."""
    return SimpleNamespace(
        loggers=[logger] if logger is not None else [],
        default_root_dir=str(root),
        is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )


def _run_dir_read_only(tmp: Path, mp: pytest.MonkeyPatch) -> None:
    from lightning_ext._lightning import run_dir

    folder = tmp / "ro"
    folder.mkdir()
    with _read_only(folder, mp), pytest.raises(OSError) as refused:
        run_dir(_bare_trainer(folder), "files")
    _one_line(str(refused.value), folder / "lightning_logs")


def _posthoc_ema_read_only(tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """A snapshot_dir that takes no file is refused at fit start, not at the first snapshot."""
    from lightning_ext.callbacks import PostHocEMA
    from tests.helpers.models import Classifier
    from tests.helpers.resume import quiet_trainer

    folder = tmp / "ro"
    folder.mkdir()
    trainer, module = quiet_trainer(max_epochs=1), Classifier()
    cb = PostHocEMA(snapshot_dir=str(folder))
    cb.setup(trainer, module, "fit")
    with _read_only(folder, mp), pytest.raises((ValueError, OSError)) as refused:
        cb.on_fit_start(trainer, module)
    _one_line(str(refused.value), folder)
    assert "snapshot_dir" in str(refused.value) and list(folder.iterdir()) == []


def _output_is_directory(w: Writer, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    inputs = w.inputs(tmp)
    out = tmp / f"out_dir{w.suffix}"  # a folder under a name the writer takes
    out.mkdir()
    (out / "kept.txt").write_text("kept")
    _no_heavy_work(mp, w)
    message = _refusal(w, inputs, out)
    _one_line(message, out)
    assert "folder" in message, message
    assert [p.name for p in out.iterdir()] == ["kept.txt"]
    assert _temps(tmp) == []


def _disk_full(name: str, w: Writer, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    if name == "atomic_torch_save":  # the real thing: a file size limit in a child process
        out = tmp / "big.pt"
        out.write_bytes(b"the old file")

        def limited() -> str:  # ulimit -f 64 KiB, the write 256 KiB
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
            atomic_torch_save(torch.zeros(1 << 16), out)
            return "written"

        code, message = _in_child(limited)
        assert code == 0
        _one_line(message, out)
        assert message.startswith("OSError: ") and "too large" in message
        assert out.read_bytes() == b"the old file" and _temps(tmp) == []
        return
    inputs = w.inputs(tmp)
    out = tmp / f"out{w.suffix}"
    main = w.main(out)
    main.parent.mkdir(exist_ok=True)
    if name == "write_scores":
        _add_scores(out)
    else:
        main.write_bytes(b"the old file")
    before = main.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(os, "fsync", full)
    message = _refusal(w, inputs, out, True)
    _one_line(message, out)
    assert "No space left" in message
    assert main.read_bytes() == before and _temps(main.parent) == []


def _sigkill(name: str, w: Writer, tmp: Path) -> None:
    inputs = w.inputs(tmp)
    out = tmp / f"out{w.suffix}"
    main = w.main(out)
    main.parent.mkdir(exist_ok=True)
    if name == "atomic_torch_save":  # a real SIGKILL in the middle of the write

        def killed_mid_write() -> None:
            def write(handle: Any) -> None:
                handle.write(b"x" * 100_000)
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            atomic_write(out, write)

        code, _ = _in_child(killed_mid_write)
        assert code == -signal.SIGKILL
        stale = _temps(tmp)
        assert len(stale) == 1 and stale[0].startswith(f".{out.name}.")
    else:
        temp_name(main, _dead_pid()).write_bytes(b"x" * 1000)
    live = temp_name(main, os.getppid())  # a writer still running: its file stays
    live.write_bytes(b"still being written")
    remote = main.parent / f".{main.name}.{_dead_pid()}@another-host.0000.tmp"  # not judged
    remote.write_bytes(b"written from another host")
    w.write(inputs, out, False)
    assert _temps(main.parent) == sorted([live.name, remote.name])
    assert main.exists()


def _concurrent(name: str, tmp: Path) -> None:
    if name == "write_scores":
        path = tmp / "scores.pt"
        _forked(lambda i: _add_scores(path, seed=i, run_name=f"r{i}") and None)
        record = load_file(path)
        assert sorted(record["run_names"]) == [f"r{i}" for i in range(8)]
        assert record["runs"].shape == (8, 32)
    elif name == "run_dir":
        from lightning_ext._lightning import run_dir

        real_glob = Path.glob

        def slow_glob(self: Path, pattern: str) -> Iterator[Path]:
            found = list(real_glob(self, pattern))  # a slow file system: others list meanwhile
            time.sleep(0.2)
            return iter(found)

        def claim(i: int) -> str:
            Path.glob = slow_glob  # type: ignore[method-assign]  # in this child process only
            return str(run_dir(_bare_trainer(tmp), "files").parent)

        folders = _forked(claim)
        assert len(set(folders)) == 8, folders

        def logged(version: int | None) -> Callable[[int], str]:
            def start(i: int) -> str:  # a CSV logger picks its version by listing the folders
                from lightning.pytorch.loggers import CSVLogger

                logger = CSVLogger(tmp / f"csv{version}", version=version)
                return str(run_dir(_bare_trainer(tmp, logger=logger), "files").parent)

            return start

        for version in (None, 0):  # 0: all 8 were given the same version
            results = _forked(logged(version))
            owned = [r for r in results if not r.startswith("FileExistsError")]
            assert len(set(owned)) == len(owned) >= 1, results
            assert version is None or len(owned) == 1, results
            for refusal in (r for r in results if r not in owned):
                assert "is the run folder of another live run" in refusal, refusal
    elif name == "PostHocEMA":
        _posthoc_ema_claims(tmp)
    else:
        raise AssertionError(name)


def _posthoc_ema_claims(tmp: Path) -> None:
    """8 fits sharing one snapshot_dir reach fit start together: one owns it, 7 are refused
    naming the folder and the option; the owner resumed (same run id) is accepted."""
    from lightning_ext.callbacks import PostHocEMA
    from tests.helpers.models import Classifier
    from tests.helpers.resume import quiet_trainer

    folder = tmp / "snap"
    trainer, module = quiet_trainer(max_epochs=1), Classifier()

    def start(i: int) -> str:
        cb = PostHocEMA(snapshot_dir=str(folder))
        cb.setup(trainer, module, "fit")
        cb.on_fit_start(trainer, module)
        return f"owner {cb.run_id}"

    results = _forked(start)
    owners = [r for r in results if r.startswith("owner ")]
    assert len(owners) == 1, results
    for refusal in (r for r in results if not r.startswith("owner ")):
        assert "ValueError" in refusal and str(folder) in refusal and "snapshot_dir" in refusal
    resumed = PostHocEMA(snapshot_dir=str(folder))
    resumed.run_id = owners[0].split()[1]  # what load_state_dict restores on resume
    resumed.setup(trainer, module, "fit")
    resumed.on_fit_start(trainer, module)


@pytest.mark.parametrize(("writer", "fault"), CELLS, ids=["-".join(c) for c in CELLS])
def test_writer_edge(writer: str, fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    w = WRITERS[writer]
    if writer == "PostHocEMA" and fault == "read-only-dir":
        _posthoc_ema_read_only(tmp_path, monkeypatch)
    elif writer == "run_dir" and fault == "read-only-dir":
        _run_dir_read_only(tmp_path, monkeypatch)
    elif fault == "output-is-input":
        _output_is_input(w, tmp_path, monkeypatch)
    elif fault == "existing-output":
        _existing_output(writer, w, tmp_path, monkeypatch)
    elif fault == "existing-output-overwrite-keeps-mode":
        _keeps_mode(writer, w, tmp_path)
    elif fault == "read-only-dir":
        _read_only_dir(w, tmp_path, monkeypatch)
    elif fault == "output-is-directory":
        _output_is_directory(w, tmp_path, monkeypatch)
    elif fault == "disk-full":
        _disk_full(writer, w, tmp_path, monkeypatch)
    elif fault == "sigkill-mid-write":
        _sigkill(writer, w, tmp_path)
    else:
        _concurrent(writer, tmp_path)


def test_every_writer_and_fault_is_declared() -> None:
    """The matrix covers every writer in every fault, as a cell or with a reason."""
    for writer in WRITERS:
        for fault in FAULTS:
            assert ((writer, fault) in CELLS) != ((writer, fault) in NOT_APPLICABLE)
    assert all("-" not in writer for writer in WRITERS)  # the table splits ids at the first '-'


def test_edges_page_reports_each_outcome_in_words(tmp_path: Path) -> None:
    """tools/edges_table.py: one table per file in tests/edges, a cell per (target, fault) in
    words; a failing cell is not hidden, and the loaders' ids (targets holding hyphens) are split
    by that file's own split_id."""
    from tools import edges_table

    junit = tmp_path / "run.xml"
    case = '<testcase classname="tests.edges.test_{}" name="test_{}_edge[{}]">{}</testcase>'
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        + case.format("writers", "writer", "soup-output-is-input", "")
        + case.format("writers", "writer", "soup-disk-full", '<failure message="boom"/>')
        + case.format(
            "writers",
            "writer",
            "export_ema-read-only-dir",
            '<skipped type="pytest.xfail" message="a reason this test invents"/>',
        )
        + case.format("loaders", "loader", "load_file-empty", "")
        + "</testsuite></testsuites>"
    )
    page = edges_table.render(edges_table.read_junit(junit))
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in page.splitlines()
            if line.startswith("| **")}  # fmt: skip
    column = {fault: i for i, fault in enumerate(FAULTS)}
    assert rows["**soup**"][column["output-is-input"]].strip() == "holds"
    assert rows["**soup**"][column["disk-full"]].strip() == "**FAILED**"
    assert rows["**soup**"][column["concurrent-writers"]].strip().startswith("n/a [")
    assert rows["**export_ema**"][column["read-only-dir"]].strip().startswith("bug [")
    assert rows["**atomic_torch_save**"][column["sigkill-mid-write"]].strip() == "not run"
    from tests.edges.test_loaders import FAULTS as READ_FAULTS

    loader_row = rows["**load_file**"]
    assert loader_row[READ_FAULTS.index("empty")].strip() == "holds"
    assert loader_row[READ_FAULTS.index("missing")].strip() == "not run"
    assert loader_row[READ_FAULTS.index("non-finite")].strip().startswith("n/a [")
    assert "a reason this test invents" in page and "## `tests/edges/test_loaders.py`" in page
    assert "Every bad file gets one line" in page  # the reading rules, with the loaders' table


def test_docs_edges_page_agrees_with_the_matrix() -> None:
    """docs/edges.md shows this file's rows and columns and every cell holding: regenerate it
    (python -m tools.edges_table) when a writer, a fault or an outcome changes."""
    page = (REPO / "docs" / "edges.md").read_text()
    section = page.split("## `tests/edges/test_writers.py`")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert [c.strip(" `") for c in lines[0].split("|")[2:-1]] == list(FAULTS)
    rows = {line.split("|")[1].strip(" *"): line.split("|")[2:-1] for line in lines[2:]}
    assert list(rows) == list(TARGETS)
    for writer in TARGETS:
        for fault in FAULTS:
            cell = rows[writer][FAULTS.index(fault)].strip()
            if (writer, fault) in CELLS:
                assert cell == "holds", (writer, fault, cell)
            else:
                assert cell.startswith("n/a"), (writer, fault, cell)


def test_build_soup_plot_refusal_reaches_every_rank(tmp_path: Path) -> None:
    """Under DDP rank zero alone writes the picture, so it alone checks it: its refusal must stop
    rank one too, or rank one would wait alone in the scoring's collectives."""
    import torch.distributed as dist

    from lightning_ext.workflows.soup import _check_plot_output

    plot = tmp_path / "soup.png"
    plot.write_bytes(b"an earlier picture")

    def rank(i: int) -> str:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=i, world_size=2
        )
        try:
            _check_plot_output(plot, [], overwrite=False)
            return "went on"
        except ValueError as error:
            return f"refused: {error}"
        finally:
            dist.destroy_process_group()

    results = _forked(rank, n=2)
    assert all(r.startswith("refused") and "--overwrite" in r for r in results), results
