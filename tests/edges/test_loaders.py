"""The read side of the edge matrix: every command and public loader that reads files x every way
a file can be bad (DESIGN.md principle 11, issue 23).

One test function, ``test_loader_edge``, with ids ``<target>-<fault>``. Each target builds valid
inputs in a fresh folder and names the one file a fault replaces; each cell asserts that the bad
file is refused with the fault's exception and a message naming the file (one line on stderr,
exit 2, no traceback, for the ``lightning-ext`` subcommands), that no pickle payload ran and that
no output was written. ``test_loader_target_reads_valid_input`` runs every target on its valid
inputs, so a refusal in the matrix is the fault's doing, not the fixture's.

``EXPECTED`` (what each fault must give), ``TARGETS`` (each with the faults that do not apply
and why) and ``split_id`` are module-level so that ``tools/edges_table.py`` can render the table
from the test ids (rows: targets, columns: ``FAULTS``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_ext._io import BadFileError, load_file
from lightning_ext.cli import main
from lightning_ext.io import distributed_checkpoint
from lightning_ext.io.adapters import CONFIG as ADAPTER_CONFIG
from lightning_ext.io.adapters import (
    WEIGHTS,
    load_peft_adapter,
    merge_peft_adapters,
    save_peft_adapter,
)
from lightning_ext.io.ema import (
    INDEX_FILE,
    ema_state_dict_from_checkpoint,
    export_ema,
    posthoc_ema_state_dict,
    write_posthoc_ema,
)
from lightning_ext.io.ingredients import Ingredients
from lightning_ext.io.safetensors import read_safetensors_layout, save_safetensors
from lightning_ext.io.schedule import load_grad_norms, load_schedule, write_grad_norms
from lightning_ext.io.scores import load_scores, write_scores
from lightning_ext.io.sparse import export_sparse_checkpoint

FAULTS = (
    "missing",
    "empty",
    "directory",
    "truncated",
    "zip-not-torch",
    "text",
    "legacy-pickle-payload",
    "zip-pickle-payload",
    "non-finite",
    "mismatched",
)


@dataclass(frozen=True)
class Expected:
    """What a fault must give: the exception (a CLI exits 2 with one line instead), a pattern
    its message matches besides the file's name, and the property in words (for the table)."""

    exception: type[BaseException]
    pattern: str | None
    property: str


#: Per fault, what every cell of that column asserts (a target may name its own pattern for
#: ``mismatched``, whose meaning is the target's: other keys, too few profiles, ...).
EXPECTED: dict[str, Expected] = {
    "missing": Expected(FileNotFoundError, r"no such file|not found|does not exist", "refused"),
    "empty": Expected(BadFileError, r"empty", "refused: 'is empty'"),
    "directory": Expected(BadFileError, r"directory|folder", "refused: 'is a directory'"),
    "truncated": Expected(BadFileError, r"truncated", "refused: 'truncated or corrupted'"),
    "zip-not-torch": Expected(
        BadFileError, r"zip archive|not a file written by torch", "refused: 'not a torch file'"
    ),
    "text": Expected(BadFileError, r"text file|not a number", "refused: 'a text file'"),
    "legacy-pickle-payload": Expected(
        BadFileError, r"trusted", "refused naming --trusted; payload not run"
    ),
    "zip-pickle-payload": Expected(
        BadFileError, r"trusted", "refused naming --trusted; payload not run"
    ),
    "non-finite": Expected(ValueError, r"NaN|non-finite", "refused naming the tensors"),
    "mismatched": Expected(ValueError, None, "refused naming what differs"),
}

MARKER = "payload_ran"


class Payload:
    """A pickle that creates ``MARKER`` when unpickled: the cell fails if the file exists."""

    def __init__(self, folder: Path) -> None:
        self.marker = str(folder / MARKER)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@dataclass
class Case:
    """One target on inputs in ``folder``: ``run()`` reads them; ``bad`` is the file a fault
    replaces; ``outputs`` must not exist after a refusal; ``command`` is the CLI subcommand."""

    run: Callable[[], Any]
    bad: Path
    outputs: list[Path] = field(default_factory=list)
    command: str | None = None
    named: str | None = None  # what the message must contain (default: the bad file's name)
    mismatch: str | None = None  # the pattern of the target's "mismatched" message
    expect: dict[str, Expected] = field(default_factory=dict)  # the target's own column rules
    pickle_file: bool = False  # a plain pickle (a folder's .metadata), not a torch file


Builder = Callable[[Path, str], Case]  # (folder, variant: "valid" | "non-finite" | "mismatched")


def _cli(argv: list[str]) -> Callable[[], Any]:
    return lambda: main(argv)


def _nan(shape: tuple[int, ...] = (3,)) -> torch.Tensor:
    value = torch.ones(shape)
    value.view(-1)[1] = float("nan")
    return value


# --------------------------------------------------------------------------- soups
def _state(variant: str) -> dict[str, torch.Tensor]:
    if variant == "non-finite":
        return {"w": _nan(), "b": torch.zeros(2)}
    if variant == "mismatched":
        return {"v": torch.ones(3), "b": torch.zeros(2)}
    return {"w": torch.ones(3), "b": torch.zeros(2)}


def _soup_files(folder: Path, variant: str, bad: int) -> list[Path]:
    """Three state-dict files (two ingredients and a base); file ``bad`` gets the variant."""
    paths = [folder / name for name in ("a.pt", "b.pt", "base.pt")]
    for i, path in enumerate(paths):
        state = _state(variant if i == bad else "valid")
        torch.save({k: v + i for k, v in state.items()}, path)
    return paths


def _soup_cli(bad: int) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        a, b, base = _soup_files(folder, variant, bad)
        out = folder / "soup.pt"
        argv = ["soup", str(a), str(b), "-o", str(out)]
        if bad == 2:
            argv += ["--method", "task-arithmetic", "--base", str(base)]
        return Case(_cli(argv), (a, b, base)[bad], [out], "soup", mismatch="missing|differ")

    return build


def _ingredients(bad: int) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        a, b, _ = _soup_files(folder, variant, bad)
        return Case(lambda: Ingredients([a, b]).validate(), (a, b)[bad], mismatch="missing|differ")

    return build


def _build_soup(bad: int) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        from lightning_ext.workflows.soup import build_soup

        a, b, base = _soup_files(folder, variant, bad)
        plot = folder / "soup.png"
        options: dict[str, Any] = {"method": "uniform", "dataloaders": [], "plot": plot}
        if bad == 2:
            options.update(method="task-arithmetic", base=base)
        # The module is never reached: every file is checked before any scoring.
        return Case(
            lambda: build_soup(torch.nn.Module(), [a, b], **options),
            (a, b, base)[bad],
            [plot],
            mismatch="missing|differ",
        )

    return build


# --------------------------------------------------------------------- distributed folders
def _dcp_folder(folder: Path, variant: str) -> Path:
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    weights = {"w": _nan() if variant == "non-finite" else torch.ones(3), "b": torch.zeros(2)}
    dcp.save({"state_dict": weights}, checkpoint_id=str(folder), no_dist=True)
    if variant == "mismatched":  # a shard placed outside the folder by its own metadata
        path = folder / distributed_checkpoint.METADATA_FILE
        metadata = pickle.loads(path.read_bytes())
        for info in metadata.storage_data.values():
            info.relative_path = "../other/__0_0.distcp"
        path.write_bytes(pickle.dumps(metadata))
    return folder


#: A folder whose .metadata is missing (or a folder itself) is no distributed checkpoint.
DCP_EXPECT = {
    fault: Expected(BadFileError, r"not a distributed checkpoint", "refused: 'no .metadata'")
    for fault in ("missing", "directory")
}


def _dcp(read: Callable[[Path], Any]) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        ckpt = _dcp_folder(folder / "ckpt", variant)
        return Case(
            lambda: read(ckpt),
            ckpt / distributed_checkpoint.METADATA_FILE,
            named="ckpt",
            mismatch="outside",
            expect=DCP_EXPECT,
            pickle_file=True,
        )

    return build


#: A shard file is checked against the sizes .metadata lists, then read by torch: a bad one is
#: missing, a directory, too short ("truncated") or "corrupted", named with its folder.
SHARD_EXPECT = {
    fault: Expected(BadFileError, r"missing|directory|truncated|corrupted", "refused")
    for fault in FAULTS
    if fault not in ("non-finite", "mismatched")
}


def _shard(folder: Path) -> Path:
    (shard,) = folder.glob("*.distcp")
    return shard


def _dcp_shard(folder: Path, variant: str) -> Case:
    ckpt = _dcp_folder(folder / "ckpt", variant)
    read = distributed_checkpoint.load_distributed_checkpoint
    return Case(lambda: read(ckpt), _shard(ckpt), named="ckpt", mismatch="outside",
                expect=SHARD_EXPECT)  # fmt: skip


def _soup_folder_shard(folder: Path, variant: str) -> Case:
    case = _soup_folders(folder, variant)
    case.bad, case.expect = _shard(folder / "second"), SHARD_EXPECT
    return case


def _soup_folders(folder: Path, variant: str) -> Case:
    first = _dcp_folder(folder / "first", "valid")
    second = _dcp_folder(folder / "second", variant)
    out = folder / "soup.pt"
    return Case(
        _cli(["soup", str(first), str(second), "-o", str(out)]),
        second / distributed_checkpoint.METADATA_FILE,
        [out],
        "soup",
        named="second",
        mismatch="outside",
        expect=DCP_EXPECT,
        pickle_file=True,
    )


# ------------------------------------------------------------------------------- EMA
def _ema_checkpoint(folder: Path, variant: str) -> Path:
    shadow = {"w": _nan() if variant == "non-finite" else torch.full((3,), 0.5)}
    state = {"shadow": shadow, "masks": {"gone": torch.ones(3)} if variant == "mismatched" else {}}
    path = folder / "ema.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "callbacks": {"EMA{}": state}}, path)
    return path


def _export_ema_cli(folder: Path, variant: str) -> Case:
    ckpt, out = _ema_checkpoint(folder, variant), folder / "ema.pt"
    return Case(_cli(["export-ema", str(ckpt), str(out)]), ckpt, [out], "export-ema", None, "gone")


def _export_ema(folder: Path, variant: str) -> Case:
    ckpt, out = _ema_checkpoint(folder, variant), folder / "ema.pt"
    return Case(lambda: export_ema(ckpt, out), ckpt, [out], mismatch="gone")


def _ema_state_dict(folder: Path, variant: str) -> Case:
    ckpt = _ema_checkpoint(folder, variant)
    return Case(lambda: ema_state_dict_from_checkpoint(ckpt), ckpt, mismatch="gone")


# ---------------------------------------------------------------------------- sparse
def _sparse_checkpoint(folder: Path, variant: str) -> Path:
    weights = {"w": _nan((2, 2)) if variant == "non-finite" else torch.ones(2, 2)}
    names = ["gone"] if variant == "mismatched" else ["w"]
    state = {"names": names, "masks": [torch.eye(2, dtype=torch.bool)]}
    path = folder / "sparse.ckpt"
    torch.save({"state_dict": weights, "callbacks": {"DynamicSparseTraining": state}}, path)
    return path


def _sparse_export_cli(folder: Path, variant: str) -> Case:
    ckpt, out = _sparse_checkpoint(folder, variant), folder / "sparse.pt"
    argv = ["sparse-export", str(ckpt), str(out), "--format", "dense"]
    return Case(_cli(argv), ckpt, [out], "sparse-export", mismatch="gone")


def _sparse_export(folder: Path, variant: str) -> Case:
    ckpt, out = _sparse_checkpoint(folder, variant), folder / "sparse.pt"
    return Case(
        lambda: export_sparse_checkpoint(ckpt, out, "dense"), ckpt, [out], None, None, "gone"
    )


# ---------------------------------------------------------------------- post-hoc EMA
GAMMAS = [6.94, 16.97]  # sigma_rel 0.15 and 0.05


def _snapshots(folder: Path, variant: str) -> tuple[Path, Path]:
    """A PostHocEMA folder of two snapshots; the second gets the variant."""
    snapshots = folder / "snapshots"
    snapshots.mkdir()
    entries = []
    for step in (1, 2):
        weights = [{"w": torch.full((3,), float(step + g))} for g in range(2)]
        if step == 2 and variant == "non-finite":
            weights[0]["w"] = _nan()
        if step == 2 and variant == "mismatched":
            weights = weights[:1]  # a profile missing
        entry = {"file": f"s{step}.pt", "step": step, "gammas": GAMMAS}
        torch.save({**entry, "weights": weights, "masks": {}}, snapshots / entry["file"])
        entries.append(entry)
    (snapshots / INDEX_FILE).write_text(json.dumps({"run_id": "r", "snapshots": entries}))
    return snapshots, snapshots / "s2.pt"


#: The index is JSON: a torch file, a pickle or text there is "not a PostHocEMA index"; its
#: non-finite case is a NaN gamma, its mismatched case a step listed twice.
INDEX_EXPECT = {
    **{
        fault: Expected(BadFileError, r"not a PostHocEMA index", "refused: 'not an index'")
        for fault in (
            "truncated",
            "zip-not-torch",
            "text",
            "legacy-pickle-payload",
            "zip-pickle-payload",
        )
    },
    "non-finite": Expected(BadFileError, r"positive finite", "refused naming the gamma"),
}


def _posthoc_index(folder: Path, variant: str) -> Case:
    snapshots, _ = _snapshots(folder, "valid")
    index = snapshots / INDEX_FILE
    entries = json.loads(index.read_text())
    if variant == "non-finite":
        entries["snapshots"][1]["gammas"] = [float("nan"), 16.97]
    if variant == "mismatched":
        entries["snapshots"][1]["step"] = 1
    index.write_text(json.dumps(entries))
    return Case(lambda: posthoc_ema_state_dict(snapshots, 0.1), index, mismatch="more than once",
                expect=INDEX_EXPECT)  # fmt: skip


def _posthoc_cli(folder: Path, variant: str) -> Case:
    snapshots, bad = _snapshots(folder, variant)
    out = folder / "posthoc.pt"
    argv = ["posthoc-ema", str(snapshots), str(out), "--sigma-rel", "0.1"]
    return Case(_cli(argv), bad, [out], "posthoc-ema", mismatch="profile")


def _posthoc(folder: Path, variant: str) -> Case:
    snapshots, bad = _snapshots(folder, variant)
    return Case(lambda: posthoc_ema_state_dict(snapshots, 0.1), bad, mismatch="profile")


def _write_posthoc(folder: Path, variant: str) -> Case:
    snapshots, bad = _snapshots(folder, variant)
    out = folder / "posthoc.pt"
    return Case(lambda: write_posthoc_ema(snapshots, 0.1, out), bad, [out], mismatch="profile")


# -------------------------------------------------------------------------- pruning
LABELS = torch.arange(64) % 4


def _score_file(folder: Path, variant: str) -> Path:
    path = folder / "scores.pt"
    write_scores(path, torch.rand(64), LABELS, score="el2n", run_name=None, task="classification")
    if variant != "valid":
        record = load_file(path)
        if variant == "non-finite":
            record["scores"] = _nan((64,))
        else:  # 10 scores for 64 labels
            record["scores"] = torch.rand(10)
        torch.save(record, path)
    return path


def _prune_select_cli(folder: Path, variant: str) -> Case:
    scores, out = _score_file(folder, variant), folder / "kept.pt"
    argv = ["prune-select", str(scores), "--keep", "0.5", "--out", str(out)]
    return Case(_cli(argv), scores, [out], "prune-select", mismatch="10 scores but 64 labels")


def _load_scores(folder: Path, variant: str) -> Case:
    scores = _score_file(folder, variant)
    return Case(lambda: load_scores(scores), scores, mismatch="10 scores but 64 labels")


def _pruned_subset(folder: Path, variant: str) -> Case:
    from lightning_ext.data.indexed import pruned_subset

    scores = _score_file(folder, variant)
    data = TensorDataset(torch.zeros(64, 2), LABELS)
    return Case(lambda: pruned_subset(data, scores, 0.5), scores, mismatch="10 scores but 64")


# ------------------------------------------------------------------------- schedules
def _norms_file(folder: Path, variant: str) -> Path:
    path = folder / "grad_norms.pt"
    norms = [_nan((50,)) if variant == "non-finite" else torch.rand(50) + 0.5]
    write_grad_norms([] if variant == "mismatched" else norms, ["l2"], path)
    return path


def _refine_cli(folder: Path, variant: str) -> Case:
    norms = _norms_file(folder, variant)
    outputs = [folder / "refined_schedule.pt", folder / "refined_schedule.json"]
    argv = ["refine-schedule", str(norms), "--window", "5"]
    return Case(_cli(argv), norms, outputs, "refine-schedule", mismatch="no gradient-norm")


def _load_grad_norms(folder: Path, variant: str) -> Case:
    norms = _norms_file(folder, variant)
    return Case(lambda: load_grad_norms(norms), norms, mismatch="no gradient-norm")


def _schedule_file(folder: Path, variant: str) -> Path:
    path = folder / "refined_schedule.pt"
    values = torch.linspace(1, 0, 20, dtype=torch.float64)
    if variant == "non-finite":
        values[3] = float("nan")
    if variant == "mismatched":
        values = values - 0.5  # negative multipliers
    torch.save({"schedule": values}, path)
    return path


def _load_schedule(folder: Path, variant: str) -> Case:
    path = _schedule_file(folder, variant)
    return Case(lambda: load_schedule(path), path, mismatch="negative")


def _stored_schedule_lr(folder: Path, variant: str) -> Case:
    from lightning_ext.lr_scheduler import StoredScheduleLR

    path = _schedule_file(folder, variant)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return Case(lambda: StoredScheduleLR(optimizer, str(path), 10), path, mismatch="negative")


# ---------------------------------------------------------------------- the one rule
def _load_file(mmap: bool) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        path = folder / "weights.pt"
        torch.save({"w": torch.ones(3)}, path)
        return Case(lambda: load_file(path, mmap=mmap), path)

    return build


# ------------------------------------------------------------------------- safetensors
def _not_safetensors(payload: bool = False) -> Expected:
    what = "refused as not safetensors" + ("; payload not run" if payload else "")
    return Expected(BadFileError, r"not a safetensors file", what)


#: Under a .safetensors name a torch zip, a pickle or text is "not a safetensors file": no pickle
#: is ever opened, so no payload can run and no --trusted helps.
SAFETENSORS_EXPECT = {
    "zip-not-torch": _not_safetensors(),
    "text": _not_safetensors(),
    "legacy-pickle-payload": _not_safetensors(True),
    "zip-pickle-payload": _not_safetensors(True),
}


def _st_file(path: Path, variant: str, shift: float = 0.0) -> Path:
    save_safetensors({k: v + shift for k, v in _state(variant).items()}, path)
    return path


def _st_files(folder: Path, variant: str) -> tuple[Path, Path]:
    """Two safetensors ingredients; the second gets the variant."""
    return _st_file(folder / "a.safetensors", "valid"), _st_file(
        folder / "b.safetensors", variant, 1.0
    )


def _load_st(read: Callable[[Path], Any]) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        path = _st_file(folder / "w.safetensors", variant)
        return Case(lambda: read(path), path, expect=SAFETENSORS_EXPECT)

    return build


def _st_sharded(folder: Path, variant: str) -> Path:
    """A state dict in two shards beside its index; mismatched: the index names a shard
    outside its folder."""
    index = folder / "model.safetensors.index.json"
    save_safetensors(_state("valid"), index, max_shard_bytes=8)
    if variant == "mismatched":
        body = json.loads(index.read_text())
        body["weight_map"]["w"] = "../other/model-00001-of-00002.safetensors"
        index.write_text(json.dumps(body))
    return index


#: The index is JSON: a torch file, a pickle or text there is "not a safetensors index".
ST_INDEX_EXPECT = {
    fault: Expected(BadFileError, r"not a safetensors index", "refused: 'not an index'")
    for fault in ("truncated", "zip-not-torch", "text", "legacy-pickle-payload",
                  "zip-pickle-payload")
}  # fmt: skip


def _st_index(folder: Path, variant: str) -> Case:
    index = _st_sharded(folder, variant)
    return Case(lambda: load_file(index), index, mismatch="outside", expect=ST_INDEX_EXPECT)


#: A shard the index names: missing is said as such, naming the index and the shard.
ST_SHARD_EXPECT = {
    **SAFETENSORS_EXPECT,
    "missing": Expected(FileNotFoundError, r"missing", "refused: 'shard missing'"),
}


def _st_shard(folder: Path, variant: str) -> Case:
    index = _st_sharded(folder, variant)
    shard = folder / "model-00002-of-00002.safetensors"
    return Case(lambda: load_file(index), shard, expect=ST_SHARD_EXPECT)


def _soup_st_cli(folder: Path, variant: str) -> Case:
    a, b = _st_files(folder, variant)
    out = folder / "soup.safetensors"
    argv = ["soup", str(a), str(b), "-o", str(out)]
    return Case(_cli(argv), b, [out], "soup", mismatch="missing|differ", expect=SAFETENSORS_EXPECT)


def _ingredients_st(folder: Path, variant: str) -> Case:
    a, b = _st_files(folder, variant)
    return Case(lambda: Ingredients([a, b]).validate(), b, mismatch="missing|differ",
                expect=SAFETENSORS_EXPECT)  # fmt: skip


def _build_soup_st(folder: Path, variant: str) -> Case:
    from lightning_ext.workflows.soup import build_soup

    a, b = _st_files(folder, variant)
    plot = folder / "soup.png"
    return Case(
        lambda: build_soup(torch.nn.Module(), [a, b], method="uniform", dataloaders=[], plot=plot),
        b,
        [plot],
        mismatch="missing|differ",
        expect=SAFETENSORS_EXPECT,
    )


def _hf_folders(folder: Path, variant: str) -> tuple[Path, Path]:
    """Two Hugging Face-style folders; the second's model.safetensors gets the variant."""
    first, second = folder / "hf_a", folder / "hf_b"
    for i, hf in enumerate((first, second)):
        hf.mkdir()
        _st_file(hf / "model.safetensors", variant if i else "valid", float(i))
        (hf / "config.json").write_text("{}")
    return first, second


def _ingredients_hf(folder: Path, variant: str) -> Case:
    first, second = _hf_folders(folder, variant)
    return Case(lambda: Ingredients([first, second]).validate(), second / "model.safetensors",
                named="hf_b", mismatch="missing|differ", expect=HF_EXPECT)  # fmt: skip


#: A folder without a model.safetensors file is neither a Hugging Face folder nor a distributed
#: checkpoint, and the message says both.
HF_EXPECT = {
    **SAFETENSORS_EXPECT,
    **{
        fault: Expected(BadFileError, r"no model\.safetensors", "refused: 'no weights'")
        for fault in ("missing", "directory")
    },
}


def _soup_hf_cli(folder: Path, variant: str) -> Case:
    first, second = _hf_folders(folder, variant)
    out = folder / "soup.safetensors"
    argv = ["soup", str(first), str(second), "-o", str(out)]
    return Case(_cli(argv), second / "model.safetensors", [out], "soup", named="hf_b",
                mismatch="missing|differ", expect=HF_EXPECT)  # fmt: skip


def _soup_hf_sharded_cli(folder: Path, variant: str) -> Case:
    """A sharded Hugging Face folder (index and two shards) beside a single-file one; the
    sharded folder's second shard is the bad file."""
    single, sharded = folder / "hf_a", folder / "hf_b"
    single.mkdir()
    _st_file(single / "model.safetensors", "valid")
    sharded.mkdir()
    _st_sharded(sharded, variant)
    out = folder / "soup.safetensors"
    argv = ["soup", str(single), str(sharded), "-o", str(out)]
    shard = sharded / "model-00002-of-00002.safetensors"
    return Case(_cli(argv), shard, [out], "soup", mismatch="outside", expect=ST_SHARD_EXPECT)


# ---------------------------------------------------------------------- PEFT adapters
ADAPTER_WEIGHTS = WEIGHTS[0]


def _adapter(folder: Path, variant: str, seed: int, bad: str = "weights") -> Path:
    """A rank-2 LoRA adapter folder on one linear layer (4 -> 3), its weights as safetensors or
    ``adapter_model.bin`` (bad="bin"); non-finite: a NaN in the weights, or a NaN lora_alpha
    (bad="config"); mismatched: a config whose r is not the weights' rank."""
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.lin"
    state = {f"{prefix}.lora_A.weight": torch.randn(2, 4, generator=g),
             f"{prefix}.lora_B.weight": torch.randn(3, 2, generator=g)}  # fmt: skip
    if variant == "non-finite" and bad != "config":
        state[f"{prefix}.lora_B.weight"][0, 0] = float("nan")
    alpha = float("nan") if variant == "non-finite" and bad == "config" else 4
    config = {"peft_type": "LORA", "r": 4 if variant == "mismatched" else 2, "lora_alpha": alpha,
              "target_modules": ["lin"], "base_model_name_or_path": "tiny"}  # fmt: skip
    save_peft_adapter(folder, state, config)
    if bad == "bin":
        torch.save(load_file(folder / ADAPTER_WEIGHTS), folder / "adapter_model.bin")
        (folder / ADAPTER_WEIGHTS).unlink()
    return folder


#: An adapter folder whose weights file is missing (or a folder) has no adapter weights.
ADAPTER_EXPECT = {
    **SAFETENSORS_EXPECT,
    "missing": Expected(FileNotFoundError, r"no adapter_model", "refused: 'no weights'"),
}
ADAPTER_BIN_EXPECT = {"missing": ADAPTER_EXPECT["missing"]}


def _adapters(folder: Path, variant: str, bad: str) -> tuple[Path, Path, Path, dict]:
    """Two adapters; the second's weights (bad="weights"/"bin") or config gets the variant."""
    first = _adapter(folder / "lora_a", "valid", 0, bad)
    second = _adapter(folder / "lora_b", variant, 1, bad)
    named = {"weights": ADAPTER_WEIGHTS, "bin": "adapter_model.bin", "config": ADAPTER_CONFIG}
    expect = {"weights": ADAPTER_EXPECT, "bin": ADAPTER_BIN_EXPECT, "config": CONFIG_EXPECT}
    return first, second, second / named[bad], expect[bad]


#: The config is JSON: anything else is "not a readable JSON config"; non-finite is a NaN
#: lora_alpha, mismatched an r other than the weights' rank.
CONFIG_EXPECT = {
    **{
        fault: Expected(BadFileError, r"not valid JSON", "refused: 'not JSON'")
        for fault in (
            "empty",
            "truncated",
            "zip-not-torch",
            "text",
            "legacy-pickle-payload",
            "zip-pickle-payload",
        )
    },
    "missing": Expected(FileNotFoundError, r"no adapter_config", "refused: 'not an adapter'"),
    "non-finite": Expected(ValueError, r"non-finite lora_alpha", "refused naming lora_alpha"),
}


def _load_adapter(bad: str) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        _, second, file, expect = _adapters(folder, variant, bad)
        return Case(lambda: load_peft_adapter(second), file, expect=expect)

    return build


def _merge_adapters_cli(bad: str) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        first, second, file, expect = _adapters(folder, variant, bad)
        out = folder / "merged"
        argv = ["merge-adapters", str(first), str(second), "-o", str(out)]
        return Case(_cli(argv), file, [out], "merge-adapters", mismatch="r=4", expect=expect)

    return build


def _merge_adapters(bad: str) -> Builder:
    def build(folder: Path, variant: str) -> Case:
        first, second, file, expect = _adapters(folder, variant, bad)
        out = folder / "merged"
        return Case(lambda: merge_peft_adapters([first, second], out), file, [out],
                    mismatch="r=4", expect=expect)  # fmt: skip

    return build


CONFIG_CELL = "a rank other than the config's r: the -config row"
CONFIG_READ = "the config is read as written: merging checks it (the merge rows)"

#: target -> (builder, faults that do not apply, with the reason shown in the table)
TARGETS: dict[str, tuple[Builder, dict[str, str]]] = {
    "cli-soup-first": (_soup_cli(0), {}),
    "cli-soup-second": (_soup_cli(1), {}),
    "cli-soup-base": (_soup_cli(2), {}),
    "cli-soup-folder": (_soup_folders, {"zip-pickle-payload": "a .metadata is a plain pickle"}),
    "cli-soup-folder-shard": (_soup_folder_shard, {}),
    "cli-export-ema": (_export_ema_cli, {}),
    "cli-sparse-export": (_sparse_export_cli, {}),
    "cli-posthoc-ema": (_posthoc_cli, {}),
    "cli-prune-select": (_prune_select_cli, {}),
    "cli-refine-schedule": (_refine_cli, {}),
    "load_file": (_load_file(False), {"non-finite": "raw loader", "mismatched": "raw loader"}),
    "load_file-mmap": (_load_file(True), {"non-finite": "raw loader", "mismatched": "raw loader"}),
    "Ingredients-first": (_ingredients(0), {}),
    "Ingredients-second": (_ingredients(1), {}),
    "build_soup-ingredient": (_build_soup(1), {}),
    "build_soup-base": (_build_soup(2), {}),
    "load_distributed_checkpoint": (
        _dcp(distributed_checkpoint.load_distributed_checkpoint),
        {"non-finite": "raw loader", "zip-pickle-payload": "a .metadata is a plain pickle"},
    ),
    "load_distributed_checkpoint-shard": (_dcp_shard, {"non-finite": "raw loader"}),
    "read_layout": (
        _dcp(distributed_checkpoint.read_layout),
        {"non-finite": "no values read", "zip-pickle-payload": "a .metadata is a plain pickle"},
    ),
    "ema_state_dict_from_checkpoint": (_ema_state_dict, {}),
    "export_ema": (_export_ema, {}),
    "export_sparse_checkpoint": (_sparse_export, {}),
    "posthoc_ema_state_dict": (_posthoc, {}),
    "write_posthoc_ema": (_write_posthoc, {}),
    "posthoc_ema_state_dict-index": (_posthoc_index, {}),
    "load_scores": (_load_scores, {}),
    "pruned_subset": (_pruned_subset, {}),
    "load_grad_norms": (
        _load_grad_norms,
        {"non-finite": "read as recorded: refine-schedule refuses or drops them"},
    ),
    "load_schedule": (_load_schedule, {}),
    "StoredScheduleLR": (_stored_schedule_lr, {}),
    "load_file-safetensors": (
        _load_st(load_file),
        {"non-finite": "raw loader", "mismatched": "raw loader"},
    ),
    "read_safetensors_layout": (
        _load_st(read_safetensors_layout),
        {"non-finite": "no values read", "mismatched": "raw loader"},
    ),
    "load_file-safetensors-index": (_st_index, {"non-finite": "raw loader"}),
    "load_file-safetensors-shard": (
        _st_shard,
        {"non-finite": "raw loader", "mismatched": "raw loader"},
    ),
    "cli-soup-safetensors": (_soup_st_cli, {}),
    "cli-soup-hf-folder": (_soup_hf_cli, {}),
    "cli-soup-hf-sharded": (
        _soup_hf_sharded_cli,
        {"non-finite": "raw loader", "mismatched": "an index's cell: load_file-safetensors-index"},
    ),
    "Ingredients-hf-folder": (_ingredients_hf, {}),
    "build_soup-safetensors": (_build_soup_st, {}),
    "Ingredients-safetensors": (_ingredients_st, {}),
    "load_peft_adapter": (
        _load_adapter("weights"),
        {"mismatched": CONFIG_CELL},
    ),
    "load_peft_adapter-bin": (
        _load_adapter("bin"),
        {"mismatched": CONFIG_CELL},
    ),
    "load_peft_adapter-config": (
        _load_adapter("config"),
        {"non-finite": CONFIG_READ, "mismatched": CONFIG_READ},
    ),
    "cli-merge-adapters": (_merge_adapters_cli("weights"), {"mismatched": CONFIG_CELL}),
    "cli-merge-adapters-bin": (_merge_adapters_cli("bin"), {"mismatched": CONFIG_CELL}),
    "cli-merge-adapters-config": (_merge_adapters_cli("config"), {}),
    "merge_peft_adapters": (_merge_adapters("weights"), {"mismatched": CONFIG_CELL}),
    "merge_peft_adapters-config": (_merge_adapters("config"), {}),
}


# -------------------------------------------------------------------------- faults
def _apply(fault: str, path: Path, folder: Path, pickle_file: bool) -> None:
    """Replace the valid file at ``path`` by the fault."""
    data = path.read_bytes()
    path.unlink()
    if fault == "missing":
        return
    if fault == "directory":
        path.mkdir()
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "zip-not-torch":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes/readme.txt", "not weights")
    elif fault == "text":
        path.write_text("101\n0.5\n")
    elif fault == "legacy-pickle-payload" and pickle_file:
        path.write_bytes(pickle.dumps(Payload(folder)))
    elif fault == "legacy-pickle-payload":
        with open(path, "wb") as handle:
            torch.save(Payload(folder), handle, _use_new_zipfile_serialization=False)
    elif fault == "zip-pickle-payload":
        torch.save(Payload(folder), path)
    else:
        raise AssertionError(fault)


def split_id(test_id: str) -> tuple[str, str]:
    """``"cli-soup-first-zip-not-torch"`` -> ``("cli-soup-first", "zip-not-torch")``: targets and
    faults both hold hyphens, so the fault is found as a suffix."""
    for fault in sorted(FAULTS, key=len, reverse=True):
        if test_id.endswith(f"-{fault}"):
            return test_id[: -len(fault) - 1], fault
    raise ValueError(f"{test_id!r} is not <target>-<fault>")


#: The cells a target does not have, with the reason (for tools/edges_table.py's "n/a" cells).
NOT_APPLICABLE = {
    (target, fault): reason
    for target, (_, skipped) in TARGETS.items()
    for fault, reason in skipped.items()
}


def _cells() -> list[Any]:
    cells = []
    for target, (_, skipped) in TARGETS.items():
        for fault in FAULTS:
            if fault not in skipped:
                cells.append(pytest.param(target, fault, id=f"{target}-{fault}"))
    return cells


def _run_cli(case: Case) -> str:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = case.run()
        except SystemExit as exit_:
            code = exit_.code
    message = stderr.getvalue().strip()
    assert code == 2, f"exit {code}: {message}"
    assert "Traceback" not in message
    errors = [line for line in message.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"lightning-ext {case.command}: error: ")
    return errors[0]


@pytest.mark.parametrize(("target", "fault"), _cells())
def test_loader_edge(target: str, fault: str, tmp_path: Path) -> None:
    build, _ = TARGETS[target]
    variant = fault if fault in ("non-finite", "mismatched") else "valid"
    case = build(tmp_path, variant)
    if variant == "valid":
        _apply(fault, case.bad, tmp_path, case.pickle_file)
    expected = case.expect.get(fault, EXPECTED[fault])
    pattern = case.mismatch if fault == "mismatched" else expected.pattern
    if case.command is not None:
        message = _run_cli(case)
    else:
        with pytest.raises(expected.exception) as raised:
            case.run()
        message = str(raised.value)
        assert "\n" not in message.strip()
    assert (case.named or case.bad.name) in message
    if pattern is not None:
        assert re.search(pattern, message), message
    assert not (tmp_path / MARKER).exists(), "the pickle payload ran"
    assert not any(path.exists() for path in case.outputs), "an output was written"


@pytest.mark.parametrize("target", list(TARGETS))
def test_loader_target_reads_valid_input(target: str, tmp_path: Path) -> None:
    """The matrix's fixtures are valid: each target runs on them (build_soup up to scoring)."""
    build, _ = TARGETS[target]
    case = build(tmp_path, "valid")
    if target.startswith("build_soup"):
        with pytest.raises(RuntimeError, match="Unexpected key"):  # past the files: scoring
            case.run()
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        result = case.run()
    if case.command is not None:
        assert result == 0


def test_every_cell_id_splits_into_its_target_and_fault() -> None:
    for cell in _cells():
        assert split_id(cell.id) == cell.values


def test_every_command_that_asks_for_trusted_has_it(tmp_path: Path) -> None:
    """The pickle cells' refusals say "--trusted": every command among them must take it (issue
    23 found posthoc-ema naming an option it did not have; merge-adapters had none either)."""
    from lightning_ext.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for target, (build, skipped) in TARGETS.items():
        if "legacy-pickle-payload" in skipped or not target.startswith("cli-"):
            continue
        (tmp_path / target).mkdir()
        command = build(tmp_path / target, "valid").command
        assert command is not None
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert "--trusted" in options, command
