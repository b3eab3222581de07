"""The rules behind the read side of the edge matrix (issue 23): what is legitimate and copied
(a shared -inf mask buffer), what is refused with the option to allow it, and the input checks of
post-hoc EMA, schedules, score files, merge options and distributed checkpoint folders."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lightning_ext._finite import NonFiniteError
from lightning_ext._io import BadFileError
from lightning_ext.cli import main
from lightning_ext.io import distributed_checkpoint
from lightning_ext.io.ema import INDEX_FILE, posthoc_ema_state_dict
from lightning_ext.io.schedule import load_schedule
from lightning_ext.lr_scheduler import StoredScheduleLR

INF = float("inf")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``lightning-ext`` in this process: exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def masked(value: float, mask: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "mask": torch.tensor(mask)}


# ------------------------------------------------------------------------ soups
def test_a_minus_inf_buffer_shared_by_every_input_is_copied_into_the_merge(tmp_path):
    paths = []
    for i, value in enumerate((1.0, 3.0, 0.0)):  # two fine-tunes and the base
        paths.append(tmp_path / f"{i}.pt")
        torch.save(masked(value, [0.0, -INF]), paths[-1])
    out = tmp_path / "merged.pt"
    argv = ["soup", str(paths[0]), str(paths[1]), "--base", str(paths[2]), "-o", str(out)]
    code, err = run_cli([*argv, "--method", "task-arithmetic", "--scale", "0.5"])
    assert code == 0, err
    merged = torch.load(out)
    assert torch.equal(merged["mask"], torch.tensor([0.0, -INF]))  # -inf - -inf would be NaN
    assert torch.equal(merged["w"], torch.full((3,), 2.0))


def test_a_buffer_not_shared_by_every_input_is_refused_naming_it(tmp_path):
    torch.save(masked(1.0, [0.0, -INF]), tmp_path / "a.pt")
    torch.save(masked(2.0, [0.0, 0.0]), tmp_path / "b.pt")
    code, err = run_cli(["soup", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", "s.pt"])
    assert code == 2 and "a.pt" in err and "mask" in err and "--allow-nonfinite" in err
    assert not Path("s.pt").exists()


def test_nonfinite_weights_pass_with_the_explicit_opt_out(tmp_path):
    torch.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([1.0, 2.0])}, tmp_path / "b.pt")
    argv = ["soup", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "s.pt")]
    assert run_cli(argv)[0] == 2
    assert run_cli([*argv, "--allow-nonfinite"])[0] == 0
    assert torch.load(tmp_path / "s.pt")["w"].isnan().any()


def test_many_nonfinite_tensors_are_named_with_their_count(tmp_path):
    state = {f"layer{i}.weight": torch.tensor([float("nan")]) for i in range(5)}
    torch.save(state, tmp_path / "a.pt")
    code, err = run_cli(["soup", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "-o", "s.pt"])
    assert (
        code == 2 and "5 tensor(s): layer0.weight, layer1.weight, layer2.weight and 2 more" in err
    )


def test_run_soup_refuses_nonfinite_ingredients_before_scoring():
    from lightning_ext.workflows.soup import run_soup

    scored = []

    def scorer(state):
        scored.append(state)
        return 0.0

    ingredients = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([INF])}]
    with pytest.raises(NonFiniteError, match=r"ingredient 1 .* w"):
        run_soup(scorer, ingredients, method="uniform", progress_bar=False)
    assert not scored
    result = run_soup(scorer, ingredients, method="uniform", progress_bar=False,
                      allow_nonfinite=True)  # fmt: skip
    assert not torch.isfinite(result.state_dict["w"]).any()


class CountingSequence:
    """A lazy sequence (as SoupStrategy's ranks, broadcast one at a time) counting its reads."""

    def __init__(self, states):
        self.states, self.reads = states, 0

    def __len__(self):
        return len(self.states)

    def __getitem__(self, index):
        self.reads += 1
        return self.states[index]


def test_run_soup_checks_a_lazy_sequence_as_it_scores_it_never_reading_twice():
    from lightning_ext.workflows.soup import run_soup

    lazy = CountingSequence([{"w": torch.tensor([1.0])}, {"w": torch.tensor([float("nan")])}])
    with pytest.raises(NonFiniteError, match="ingredient 1"):
        run_soup(lambda state: 0.0, lazy, method="uniform", progress_bar=False)
    assert lazy.reads == 2  # each scored once, then refused before the soup is built


@pytest.mark.parametrize(
    ("option", "value"),
    [("--scale", "inf"), ("--scale", "nan"), ("--weights", "nan"), ("--gamma", "nan")],
)
def test_a_nonfinite_merge_option_is_one_line_naming_it(tmp_path, option, value):
    for name in ("a", "b", "base"):
        torch.save({"w": torch.ones(2)}, tmp_path / f"{name}.pt")
    method = {"--scale": "task-arithmetic", "--weights": "weighted", "--gamma": "breadcrumbs"}
    argv = ["soup", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", "s.pt"]
    argv += ["--method", method[option], option, value]
    if option == "--weights":
        argv.append("1")
    else:
        argv += ["--base", str(tmp_path / "base.pt"), "--density", "0.5"]
    code, err = run_cli(argv)
    assert code == 2 and f"{option} must be a finite number, got {value}" in err


def test_an_unimportable_recalibration_module_is_one_line_naming_the_option(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    argv = ["soup", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "-o", "s.pt"]
    code, err = run_cli([*argv, "--recalibrate-bn", "nomod:f", "--model", "builtins:dict"])
    assert code == 2 and err.startswith("lightning-ext soup: error: --recalibrate-bn nomod:f")


# ----------------------------------------------------------------------- post-hoc EMA
GAMMAS = [6.94, 16.97]


def snapshot_folder(tmp_path: Path, profiles: list[list[dict[str, torch.Tensor]]]) -> Path:
    """A PostHocEMA folder with one snapshot per entry of ``profiles`` (steps 1, 2, ...)."""
    folder = tmp_path / "snapshots"
    folder.mkdir()
    entries = []
    for step, weights in enumerate(profiles, start=1):
        entry = {"file": f"s{step}.pt", "step": step, "gammas": GAMMAS}
        torch.save({**entry, "weights": weights, "masks": {}}, folder / entry["file"])
        entries.append(entry)
    (folder / INDEX_FILE).write_text(json.dumps({"run_id": "r", "snapshots": entries}))
    return folder


def profile(value: float, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), **extra}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            [profile(1.0), {"renamed": torch.ones(2)}],
            "missing \\['w'\\], unexpected \\['renamed'\\]",
        ),
        ([profile(1.0), {"w": torch.ones(2, dtype=torch.bfloat16)}], "torch.bfloat16, not"),
        ([profile(1.0), {"w": torch.ones(3)}], "\\(3,\\)"),
        ([profile(1.0)], "1 profile\\(s\\) but the index lists 2"),
    ],
    ids=["renamed-key", "other-dtype", "other-shape", "missing-profile"],
)
def test_an_inconsistent_snapshot_is_refused_naming_it(tmp_path, second, message):
    folder = snapshot_folder(tmp_path, [[profile(0.0), profile(1.0)], second])
    with pytest.raises(BadFileError, match=message) as raised:
        posthoc_ema_state_dict(folder, 0.1)
    assert "s2.pt" in str(raised.value)


def test_repeated_steps_in_the_index_are_refused_naming_it(tmp_path):
    folder = snapshot_folder(tmp_path, [[profile(0.0), profile(1.0)]] * 2)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["snapshots"][1]["step"] = 1
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        BadFileError, match=f"{INDEX_FILE} lists step\\(s\\) \\[1\\] more than once"
    ):
        posthoc_ema_state_dict(folder, 0.1)


@pytest.mark.parametrize("gamma", [float("nan"), -1.0, 0.0])
def test_a_bad_gamma_in_the_index_is_refused_naming_it(tmp_path, gamma):
    folder = snapshot_folder(tmp_path, [[profile(0.0), profile(1.0)]])
    index = json.loads((folder / INDEX_FILE).read_text())
    index["snapshots"][0]["gammas"] = [gamma, 16.97]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    code, err = run_cli(["posthoc-ema", str(folder), "out.pt", "--sigma-rel", "0.1"])
    assert code == 2 and INDEX_FILE in err and "positive finite" in err


def test_an_index_that_is_not_json_is_named(tmp_path):
    folder = snapshot_folder(tmp_path, [[profile(0.0), profile(1.0)]])
    (folder / INDEX_FILE).write_text("{not json")
    code, err = run_cli(["posthoc-ema", str(folder), "out.pt", "--sigma-rel", "0.1"])
    assert code == 2 and f"{INDEX_FILE} is not a PostHocEMA index" in err


def test_a_shared_minus_inf_buffer_is_copied_not_combined(tmp_path):
    mask = torch.tensor([0.0, -INF])
    profiles = [[profile(s + g, mask=mask) for g in range(2)] for s in range(3)]
    state = posthoc_ema_state_dict(snapshot_folder(tmp_path, profiles), 0.1)
    assert torch.equal(state["mask"], mask)  # combined with signed coefficients: NaN
    assert torch.isfinite(state["w"]).all()


def test_nonfinite_snapshot_weights_are_refused_unless_allowed(tmp_path):
    profiles = [[profile(0.0), profile(1.0)], [profile(float("nan")), profile(1.0)]]
    folder = snapshot_folder(tmp_path, profiles)
    with pytest.raises(NonFiniteError, match=r"s2\.pt"):
        posthoc_ema_state_dict(folder, 0.1)
    assert posthoc_ema_state_dict(folder, 0.1, allow_nonfinite=True)["w"].isnan().all()


@dataclass
class Note:
    """An object beyond tensors in a snapshot: loaded only with trusted."""

    text: str


def test_posthoc_ema_reads_snapshots_with_objects_only_when_trusted(tmp_path):
    folder = snapshot_folder(tmp_path, [[profile(0.0), profile(1.0)]])
    snapshot = torch.load(folder / "s1.pt")
    torch.save({**snapshot, "note": Note("mine")}, folder / "s1.pt")
    argv = ["posthoc-ema", str(folder), str(tmp_path / "out.pt"), "--sigma-rel", "0.1"]
    code, err = run_cli(argv)
    assert code == 2 and "s1.pt" in err and "--trusted" in err
    assert run_cli([*argv, "--trusted"])[0] == 0


# ------------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.0, 0.0, 0.0], "every multiplier is 0"),
        ([1.0, -0.5, 0.0], "negative"),
        ([1.0, float("nan"), 0.0], "NaN or inf"),
    ],
    ids=["all-zero", "negative", "nan"],
)
def test_stored_schedule_lr_refuses_a_schedule_that_cannot_train(tmp_path, values, message):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=message):
        StoredScheduleLR(optimizer, values, total_steps=5)
    path = tmp_path / "schedule.pt"
    torch.save({"schedule": torch.tensor(values)}, path)
    with pytest.raises(ValueError, match=message) as raised:
        StoredScheduleLR(optimizer, str(path), total_steps=5)
    assert str(path) in str(raised.value)


def test_a_csv_schedule_with_a_header_is_read_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "schedule.csv"
    path.write_text("step,multiplier\n0,1.0\n1,0.5\n2,0.0\n")
    assert load_schedule(path).tolist() == [1.0, 0.5, 0.0]
    path.write_text("step,multiplier\n0,1.0\n1,half\n")
    with pytest.raises(BadFileError, match=r"schedule\.csv, line 3: 'half' is not a number"):
        load_schedule(path)


def test_refine_schedule_reads_a_csv_with_a_header(tmp_path):
    path = tmp_path / "norms.csv"
    path.write_text("step,grad_norm\n" + "".join(f"{i},{1 + i % 3}\n" for i in range(40)))
    code, err = run_cli(["refine-schedule", str(path), "--window", "5"])
    assert code == 0, err
    assert (tmp_path / "refined_schedule.pt").exists()


# ------------------------------------------------------------------------ score files
@pytest.mark.parametrize(
    ("record", "message"),
    [
        (torch.rand(8), "holds a Tensor, not a score file"),
        ({"scores": torch.rand(8), "fingerprint": {}}, "has no 'labels'"),
    ],
    ids=["bare-tensor", "no-labels"],
)
def test_prune_select_names_the_file_and_what_it_should_hold(tmp_path, record, message):
    torch.save(record, tmp_path / "scores.pt")
    argv = ["prune-select", str(tmp_path / "scores.pt"), "--keep", "0.5", "--out", "kept.pt"]
    code, err = run_cli(argv)
    assert code == 2 and "scores.pt" in err and message in err and "DataPruningScores" in err


# --------------------------------------------------------------- distributed checkpoints
@pytest.mark.parametrize("shard", ["../other/__0_0.distcp", "/tmp/__0_0.distcp"])
def test_a_shard_outside_the_folder_is_refused_before_anything_is_read(tmp_path, shard):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=str(folder), no_dist=True)
    metadata_file = folder / distributed_checkpoint.METADATA_FILE
    metadata = pickle.loads(metadata_file.read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = shard
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="outside the folder") as raised:
        distributed_checkpoint.load_distributed_checkpoint(folder)
    assert str(folder) in str(raised.value) and shard in str(raised.value)


# ------------------------------------------------------------------------------- EMA export
def ema_checkpoint(path: Path, shadow_w: torch.Tensor) -> Path:
    live = {"w": torch.ones(2), "mask": torch.tensor([0.0, -INF])}  # the mask: a buffer
    torch.save({"state_dict": live, "callbacks": {"EMA{}": {"shadow": {"w": shadow_w}}}}, path)
    return path


def test_export_ema_keeps_a_buffer_the_live_weights_hold_and_refuses_a_diverged_ema(tmp_path):
    ckpt = ema_checkpoint(tmp_path / "ok.ckpt", torch.full((2,), 0.5))
    assert run_cli(["export-ema", str(ckpt), str(tmp_path / "ok.pt")])[0] == 0
    assert torch.equal(torch.load(tmp_path / "ok.pt")["mask"], torch.tensor([0.0, -INF]))
    ckpt = ema_checkpoint(tmp_path / "bad.ckpt", torch.tensor([0.5, INF]))
    code, err = run_cli(["export-ema", str(ckpt), str(tmp_path / "bad.pt")])
    assert code == 2 and "bad.ckpt (EMA weights)" in err and "1 tensor(s): w" in err
    assert not (tmp_path / "bad.pt").exists()


def test_a_single_input_keeps_its_infinities_and_refuses_its_nan(tmp_path):
    from lightning_ext.io.ingredients import Ingredients

    torch.save(masked(1.0, [0.0, -INF]), tmp_path / "mask.pt")
    assert len(Ingredients([tmp_path / "mask.pt"]).validate()) == 1  # a soup of one checkpoint
    torch.save(masked(1.0, [0.0, float("nan")]), tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match="1 tensor\\(s\\): mask"):
        Ingredients([tmp_path / "nan.pt"]).validate()


def test_a_step_before_the_first_snapshot_names_the_range(tmp_path):
    # --step 2 with snapshots from step 4 said "need one gamma per snapshot step" (no option,
    # no range), while --step 100 said "[1, 16]", a range 2 lay inside
    folder = snapshot_folder(tmp_path, [[profile(s + g) for g in range(2)] for s in range(3)])
    index = json.loads((folder / INDEX_FILE).read_text())
    for entry in index["snapshots"]:
        entry["step"] += 3  # snapshots at steps 4, 5, 6
    (folder / INDEX_FILE).write_text(json.dumps(index))
    code, err = run_cli(["posthoc-ema", str(folder), "o.pt", "--sigma-rel", "0.1", "--step", "2"])
    assert code == 2 and "step must lie in [4, 6] (the first and the last snapshot's), got 2" in err
    assert posthoc_ema_state_dict(folder, 0.1, step=5)["w"].shape == (2,)
