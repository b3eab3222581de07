"""The conformance matrix: every callback x every zoo module x {defaults, a typical option set}.

Each cell runs a real ``Trainer.fit`` (2 epochs of 2 batches) and either works, checked by a
property that can fail, or refuses before the first training step with a message naming the
option to use. What each cell must do is declared once, in ``expected_refusal`` (refusals) and
the ``check_*`` functions (properties); cells that fail today because of a known bug carry a
strict xfail naming it (``KNOWN_FAILURES``), so they flip to a failure the day the fix lands.

``tools/conformance_table.py`` turns this file's declarations and a run's outcomes into
``docs/conformance.md``.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_ext.callbacks import (
    EMA,
    WARP,
    ContinualEvaluation,
    DataPruningScores,
    DynamicSparseTraining,
    InfoBatch,
    ModelSoup,
    PostHocEMA,
    ScheduleFree,
    ScheduleRefinement,
)
from lightning_ext.callbacks.posthoc_ema import posthoc_ema_state_dict
from lightning_ext.data import IndexedDataset
from lightning_ext.data.sampling import InfoBatchSampler
from tests.helpers.zoo import (
    BATCH_SIZE,
    ZOO,
    Namespace,
    ZooEntry,
    eager_twin,
    lightning_namespace,
)

Config = Literal["defaults", "typical"]
CALLBACKS = (
    "EMA",
    "PostHocEMA",
    "ContinualEvaluation",
    "ModelSoup",
    "WARP",
    "DataPruningScores",
    "InfoBatch",
    "DynamicSparseTraining",
    "ScheduleRefinement",
    "ScheduleFree",
)
CONFIGS: tuple[Config, ...] = ("defaults", "typical")
MAX_EPOCHS, BATCHES_PER_EPOCH = 2, 2


# ------------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Refusal:
    """The cell must raise naming ``option``: before the first training step, or, for what only
    validation can reveal (a metric that is never logged, as Lightning's ModelCheckpoint reports
    it), at the first validation, before a second epoch is trained (``at_first_validation``)."""

    option: str
    why: str
    at_first_validation: bool = False


def _data_refusal(entry: ZooEntry) -> Refusal | None:
    """What a data-reading callback must refuse on ``entry`` (the shared ``_batch`` rules)."""
    if entry.batches == "tensor":
        return Refusal("unpack_batch", "batches hold inputs only: no targets to score")
    if entry.forward == "two_inputs":
        return Refusal("forward_fn", "forward(inputs, target) cannot be called on inputs alone")
    return None


def expected_refusal(callback: str, entry: ZooEntry, config: Config) -> Refusal | None:
    """None when the cell must work; otherwise the refusal it must give."""
    if (
        callback == "ContinualEvaluation"
        and config == "defaults"
        and entry.name == "causal_lm_dict"
    ):
        return Refusal("causal_lm_batch", "labels are the unshifted input_ids of a causal LM")
    if callback in ("ContinualEvaluation", "DataPruningScores"):
        return _data_refusal(entry)
    if callback == "InfoBatch":
        if config == "defaults":
            return Refusal("InfoBatchSampler", "the train DataLoader has no InfoBatchSampler")
        return Refusal("InfoBatch.loss", "training_step never hands over per-sample losses")
    if callback == "ScheduleFree" and config == "defaults":
        return Refusal("schedulefree", "the module's own optimizers are not schedule-free ones")
    if callback == "DynamicSparseTraining" and entry.name == "manual_two_optimizers":
        return Refusal("automatic optimization", "mask updates follow one optimizer's steps")
    if callback == "ModelSoup":
        monitor = ModelSoup().monitor if config == "defaults" else _soup_monitor(entry)
        if not entry.validates:
            return Refusal("uniform", "greedy soups score on validation data; the fit has none")
        if monitor not in entry.logged:
            return Refusal("monitor", f"the module never logs {monitor!r}", True)
    return None


def _soup_monitor(entry: ZooEntry) -> str:
    return entry.monitor or "val_loss"


# Cells that fail today because of a known bug, with the bug: each becomes a strict xfail, so it
# turns into a failure the day the fix lands and its entry must then be removed. Every bug the
# matrix found in its first run (issue 11) is fixed (the last, InfoBatch on a module that does
# not unpack the index, in issue 24: the first step's failure now names InfoBatch.loss).
KNOWN_FAILURES: dict[tuple[str, str, Config], str] = {}


# ------------------------------------------------------------------------------- fit harness


class TrainingSteps(Callback):
    """Counts training batches and keeps a copy of the live weights when training ends."""

    def __init__(self) -> None:
        self.batches = 0
        self.live_at_train_end: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.batches += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.live_at_train_end = _float_state(pl_module)


@dataclass
class Run:
    """One fit of a zoo module: what the properties inspect."""

    trainer: Any
    module: Any
    callback: Any
    steps: TrainingSteps
    train_data: Dataset
    initial: dict[str, Tensor] = field(default_factory=dict)


def _float_state(module: Any) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _dataset(loader: DataLoader | None) -> Dataset | None:
    return None if loader is None else loader.dataset


def make_trainer(tmp_path: Path, callbacks: list[Any], namespace: Namespace = "lightning") -> Any:
    pl = lightning_namespace(namespace)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=MAX_EPOCHS,
        limit_train_batches=BATCHES_PER_EPOCH,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def fit(
    entry: ZooEntry,
    make_callback: Callable[[Dataset, Dataset | None], Any],
    tmp_path: Path,
    *,
    seed: int = 0,
    namespace: Namespace = "lightning",
    train_loader: Callable[[DataLoader], DataLoader] | None = None,
) -> Run:
    """Build the zoo entry and its callback, and fit for 2 epochs of 2 batches."""
    torch.manual_seed(seed)
    module, train, val = entry(seed, namespace)
    if train_loader is not None:
        train = train_loader(train)
    callback = make_callback(train.dataset, _dataset(val))
    steps = TrainingSteps()
    trainer = make_trainer(
        tmp_path, [steps, callback], namespace
    )  # steps sees the live weights first
    run = Run(trainer, module, callback, steps, train.dataset, _float_state(module))
    trainer.fit(module, train, val)
    return run


def assert_refuses(refusal: Refusal, run_fit: Callable[[], Run]) -> None:
    """The fit raises naming the option, before any training batch ran."""
    steps_seen: list[TrainingSteps] = []
    original = TrainingSteps.__init__

    def remember(self: TrainingSteps) -> None:
        original(self)
        steps_seen.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainingSteps, "__init__", remember)
        with pytest.raises(Exception) as info:
            run_fit()
    assert refusal.option in str(info.value), (
        f"the refusal must name {refusal.option!r} ({refusal.why}); got "
        f"{type(info.value).__name__}: {info.value}"
    )
    limit = BATCHES_PER_EPOCH if refusal.at_first_validation else 0
    assert all(s.batches <= limit for s in steps_seen), (
        f"refused only after {max(s.batches for s in steps_seen)} training batches (at most "
        f"{limit} allowed)"
    )


def assert_finite_weights(module: Any) -> None:
    bad = [k for k, v in _float_state(module).items() if not torch.isfinite(v).all()]
    assert not bad, f"non-finite weights after fit: {bad}"


def _differs(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a.keys() & b.keys())


# ------------------------------------------------------------------------------- the cells


def check_ema(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """The EMA is updated at every optimizer step and applied at fit end; with
    ``validate_on="both"`` the unsuffixed metrics are exactly those of ``validate_on="ema"``."""
    options: dict[str, Any] = {} if config == "defaults" else {"decay": 0.9, "validate_on": "both"}
    run = fit(entry, lambda *_: EMA(**options), tmp_path / "run", namespace=namespace)
    assert run.callback.num_updates >= run.steps.batches - 1 >= 1
    assert _differs(_float_state(run.module), run.steps.live_at_train_end), (
        "the module does not hold the EMA weights after fit"
    )
    assert_finite_weights(run.module)
    if config == "typical" and entry.logged:
        reference = fit(
            entry,
            lambda *_: EMA(decay=0.9, validate_on="ema"),
            tmp_path / "ref",
            namespace=namespace,
        )
        ours, theirs = run.trainer.callback_metrics, reference.trainer.callback_metrics
        for name in entry.logged:
            assert name in ours and f"{name}_live" in ours, sorted(ours)
            assert float(ours[name]) == float(theirs[name]), (
                f"{name}: validate_on='both' gives {float(ours[name])}, 'ema' gives "
                f"{float(theirs[name])}"
            )


def check_posthoc_ema(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """Snapshots are written and any profile in range reconstructs to finite weights."""
    options: dict[str, Any] = (
        {}
        if config == "defaults"
        else {
            "sigma_rels": (0.05, 0.2),
            "snapshot_every_n_steps": 2,
            "snapshot_dir": str(tmp_path / "phema"),
        }
    )
    run = fit(entry, lambda *_: PostHocEMA(**options), tmp_path, namespace=namespace)
    assert run.callback.snapshots, "no snapshot written"
    state = posthoc_ema_state_dict(run.callback._dir, 0.1)
    module_keys = set(run.module.state_dict())
    assert state and set(state) <= module_keys, set(state) - module_keys
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert_finite_weights(run.module)


def check_continual(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """Finite curves: one evaluation before the first update, then every ``every_n_steps``."""
    every = 1 if config == "defaults" else 2

    def make(train: Dataset, val: Dataset | None) -> ContinualEvaluation:
        options: dict[str, Any] = {"eval_sets": [val if val is not None else train]}
        if config == "typical":
            options |= {"every_n_steps": 2, "subsample": 16, "export_dir": str(tmp_path / "ce")}
            options |= _lm_reading_options() if entry.batches == "dict" else {"metric": "loss"}
        return ContinualEvaluation(**options)

    refusal = expected_refusal("ContinualEvaluation", entry, config)
    if refusal is not None:
        assert_refuses(refusal, lambda: fit(entry, make, tmp_path, namespace=namespace))
        return
    run = fit(entry, make, tmp_path, namespace=namespace)
    records = run.callback.records
    # One evaluation before the first update, then at batch ends where global_step reached a
    # multiple of every_n_steps (manual optimization steps several optimizers per batch).
    expected = 1 + min(run.steps.batches, run.trainer.global_step // every)
    assert len(records) == expected, (len(records), expected)
    values = [float(v) for r in records for v in r["values"].values()]
    assert values and all(math.isfinite(v) for v in values), values
    assert_finite_weights(run.module)


def _lm_reading_options() -> dict[str, Any]:
    """How a user points a data-reading callback at a Hugging Face style causal LM."""
    from lightning_ext._batch import causal_lm_batch

    return {"unpack_batch": causal_lm_batch, "metric": "perplexity"}


def check_model_soup(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """The greedy soup starts from the best ingredient by ``mode`` (defaults: Lightning's
    ``mode="min"``), and its weights are finite."""
    options: dict[str, Any] = {}
    if config == "typical":
        options = {"monitor": _soup_monitor(entry), "mode": entry.mode, "dirpath": str(tmp_path)}
    refusal = expected_refusal("ModelSoup", entry, config)
    if refusal is not None:
        assert_refuses(
            refusal,
            lambda: fit(entry, lambda *_: ModelSoup(**options), tmp_path, namespace=namespace),
        )
        return
    run = fit(entry, lambda *_: ModelSoup(**options), tmp_path, namespace=namespace)
    soup = run.callback
    if config == "defaults":
        assert soup.mode == "min", "ModelSoup's default mode must follow Lightning's: 'min'"
    scores = soup.result["scores"]
    best = (max if soup.mode == "max" else min)(range(len(scores)), key=scores.__getitem__)
    assert len(scores) == MAX_EPOCHS and soup.result["chosen"][0] == best, soup.result
    assert_finite_weights(run.module)


def check_warp(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """The anchor starts at the initial weights, moves towards the policy, stays finite."""
    options: dict[str, Any] = {} if config == "defaults" else {"anchor": "sync", "tau": 2}
    run = fit(entry, lambda *_: WARP(**options), tmp_path, namespace=namespace)
    anchor = _float_state(run.callback.anchor_module)
    assert _differs(anchor, run.initial), "the anchor never moved"
    assert _differs(anchor, _float_state(run.module)), "the anchor is the policy itself"
    assert all(torch.isfinite(v).all() for v in anchor.values())
    assert_finite_weights(run.module)


def check_pruning_scores(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """One finite score per training example, written to ``output_path`` when given."""
    path = tmp_path / "scores.pt"
    options: dict[str, Any] = (
        {}
        if config == "defaults"
        else {"score": "grand", "at_epoch": None, "at_step": 2, "output_path": str(path)}
    )
    if config == "typical" and entry.batches == "dict":
        options["unpack_batch"] = _lm_reading_options()["unpack_batch"]
    refusal = expected_refusal("DataPruningScores", entry, config)
    make = lambda *_: DataPruningScores(**options)  # noqa: E731
    if refusal is not None:
        assert_refuses(refusal, lambda: fit(entry, make, tmp_path, namespace=namespace))
        return
    run = fit(entry, make, tmp_path, namespace=namespace)
    n = len(run.train_data)  # type: ignore[arg-type]
    scores = run.callback.scores
    assert scores is not None and scores.shape == (n,), None if scores is None else scores.shape
    assert torch.isfinite(scores).all()
    if config == "typical":
        from lightning_ext._io import load_file

        saved = load_file(path)["scores"]
        assert saved.shape == (n,) and torch.isfinite(saved).all()
    assert_finite_weights(run.module)


def _infobatch_loader(loader: DataLoader) -> DataLoader:
    """The train loader as InfoBatch documents it: an IndexedDataset behind an InfoBatchSampler."""
    dataset = IndexedDataset(loader.dataset)
    return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=InfoBatchSampler(dataset, seed=0))


def check_infobatch(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """A user module never calls ``InfoBatch.loss``: InfoBatch must refuse, never pretend to
    prune (with the hook in place, pruning itself is tested in test_pruning_callbacks.py)."""
    refusal = expected_refusal("InfoBatch", entry, config)
    assert refusal is not None
    loader = None if config == "defaults" else _infobatch_loader
    assert_refuses(
        refusal,
        lambda: fit(
            entry, lambda *_: InfoBatch(), tmp_path, train_loader=loader, namespace=namespace
        ),
    )


def check_sparse(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """Every targeted weight is masked at its budget (round(density * numel) ones), the global
    density is the target, and the weights outside the masks are zero."""
    options: dict[str, Any] = (
        {}
        if config == "defaults"
        else {"density": 0.5, "method": "set", "delta_t": 1, "end_fraction": 1.0}
    )
    refusal = expected_refusal("DynamicSparseTraining", entry, config)
    if refusal is not None:
        assert_refuses(
            refusal,
            lambda: fit(
                entry, lambda *_: DynamicSparseTraining(**options), tmp_path, namespace=namespace
            ),
        )
        return
    run = fit(entry, lambda *_: DynamicSparseTraining(**options), tmp_path, namespace=namespace)
    dst = run.callback
    # masks are keyed by names without torch.compile's "_orig_mod." (lightning_ext._modules)
    params = {n.replace("_orig_mod.", ""): p for n, p in run.module.named_parameters()}
    masks = dst.masks
    assert masks, "no weight was sparsified"
    total = kept = 0
    for (name, mask), count in zip(masks.items(), dst.counts):
        assert name in params, f"mask {name!r} names no parameter of the module"
        assert int(mask.sum()) == count, (name, int(mask.sum()), count)
        outside = params[name].detach().masked_select(~mask.bool())
        assert not outside.any(), f"{name}: weights outside the mask"
        total, kept = total + mask.numel(), kept + count
    dense = _dense_layer_weights(run.module) - {id(params[n]) for n in masks}
    assert not dense, f"{len(dense)} Linear/Conv weight(s) silently left dense"
    assert abs(kept / total - dst.density) < 0.02, (kept / total, dst.density)
    assert_finite_weights(run.module)
    if entry.name == "compiled_inner":
        eager = fit(
            eager_twin(entry),
            lambda *_: DynamicSparseTraining(**options),
            tmp_path / "eager",
            namespace=namespace,
        )
        compiled_masks = masks
        eager_masks = eager.callback.masks
        assert compiled_masks.keys() == eager_masks.keys()
        differ = [n for n, m in eager_masks.items() if not torch.equal(m, compiled_masks[n])]
        assert not differ, f"compiling the network changed the masks of {differ}"


def _dense_layer_weights(module: Any) -> set[int]:
    """ids of the weights of the module's Linear and Conv layers (the default targets)."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {id(m.weight) for m in module.modules() if isinstance(m, kinds)}


def check_schedule(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """One finite gradient norm per optimizer step for each optimizer, and a refined schedule of
    the same length."""
    out = tmp_path / "schedule"
    options: dict[str, Any] = (
        {} if config == "defaults" else {"norm": "l1", "smoothing": 0.0, "output_dir": str(out)}
    )
    run = fit(entry, lambda *_: ScheduleRefinement(**options), tmp_path, namespace=namespace)
    records = run.callback.grad_norms()
    assert len(records) == len(run.trainer.optimizers)
    for record in records:
        assert record.shape == (run.steps.batches,), (record.shape, run.steps.batches)
        assert torch.isfinite(record).all(), record
    if config == "typical":
        from lightning_ext._io import load_file

        written = list(out.glob("*.pt"))
        assert written, "no file written to output_dir"
        schedules = [load_file(p) for p in written]
        lengths = [
            s["schedule"].numel() for s in schedules if isinstance(s, dict) and "schedule" in s
        ]
        assert lengths == [run.steps.batches], lengths
    assert_finite_weights(run.module)


def _with_schedule_free_optimizers(entry: ZooEntry) -> ZooEntry:
    """The entry with each optimizer its module returns replaced by schedulefree's AdamW over the
    same parameters at the same LR (its LR schedulers dropped: schedule-free needs none)."""
    import dataclasses

    import schedulefree

    def swap(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        params = [p for group in opt.param_groups for p in group["params"]]
        return schedulefree.AdamWScheduleFree(params, lr=opt.param_groups[0]["lr"])

    def build(seed: int, namespace: Namespace) -> Any:
        module, *loaders = entry.build(seed, namespace)
        original = module.configure_optimizers

        def configure_optimizers() -> Any:
            out = original()
            out = out["optimizer"] if isinstance(out, dict) else out
            if isinstance(out, list | tuple) and isinstance(out[0], list | tuple):
                out = out[0]  # ([optimizers], [schedulers])
            return [swap(o) for o in out] if isinstance(out, list | tuple) else swap(out)

        module.configure_optimizers = configure_optimizers
        return (module, *loaders)

    return dataclasses.replace(entry, build=build)


def check_schedule_free(
    entry: ZooEntry, config: Config, tmp_path: Path, namespace: Namespace = "lightning"
) -> None:
    """With the module's own optimizers: refused before any step, naming schedulefree. With
    schedule-free ones: every step trains, and the module ends with the eval-mode weights."""
    refusal = expected_refusal("ScheduleFree", entry, config)
    if refusal is not None:
        assert_refuses(
            refusal, lambda: fit(entry, lambda *_: ScheduleFree(), tmp_path, namespace=namespace)
        )
        return
    run = fit(
        _with_schedule_free_optimizers(entry),
        lambda *_: ScheduleFree(),
        tmp_path,
        namespace=namespace,
    )
    assert run.steps.batches > 0 and run.trainer.global_step > 0
    assert all(not opt.param_groups[0]["train_mode"] for opt in run.trainer.optimizers)
    final = _float_state(run.module)
    assert _differs(run.steps.live_at_train_end, final), "fit end kept the train-mode weights"
    assert _differs(run.initial, final), "the weights never moved"
    assert_finite_weights(run.module)


CHECKS: dict[str, Callable[[ZooEntry, Config, Path], None]] = {
    "EMA": check_ema,
    "PostHocEMA": check_posthoc_ema,
    "ContinualEvaluation": check_continual,
    "ModelSoup": check_model_soup,
    "WARP": check_warp,
    "DataPruningScores": check_pruning_scores,
    "InfoBatch": check_infobatch,
    "DynamicSparseTraining": check_sparse,
    "ScheduleRefinement": check_schedule,
    "ScheduleFree": check_schedule_free,
}


def cells() -> Iterator[Any]:
    for callback in CALLBACKS:
        for zoo_name in ZOO:
            for config in CONFIGS:
                reason = KNOWN_FAILURES.get((callback, zoo_name, config))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(
                    callback, zoo_name, config, marks=marks, id=f"{callback}-{zoo_name}-{config}"
                )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("callback", "zoo_name", "config"), list(cells()))
def test_cell(callback: str, zoo_name: str, config: Config, tmp_path: Path) -> None:
    CHECKS[callback](ZOO[zoo_name], config, tmp_path)
    if config == "defaults":  # no path given: every file belongs to the run that wrote it
        assert_outputs_in_run_folders(tmp_path)


def assert_outputs_in_run_folders(root: Path) -> None:
    """Without explicit paths, a callback writes under ``run_dir`` (the logger's versioned
    ``.../version_N/``), so a second run never overwrites the first's files."""
    outside = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and not re.search(r"/version_\d+/", str(path.relative_to(root)))
    )
    assert not outside, f"written outside the run's versioned folder: {outside[:5]}"


def test_every_callback_and_zoo_entry_is_in_the_matrix() -> None:
    from lightning_ext import callbacks

    assert set(CALLBACKS) == set(callbacks.__all__) == set(CHECKS)
    assert set(ZOO) >= {
        "metrics_classifier",
        "batchnorm_cnn",
        "causal_lm_dict",
        "boring_model",
        "lightning_transformer",
        "manual_two_optimizers",
        "compiled_inner",
        "tied_weights",
    }
    assert all(re.fullmatch(r"[a-z_]+", name) for name in ZOO)


def test_table_reports_each_outcome_in_words(tmp_path: Path) -> None:
    """tools/conformance_table.py: refusals name their option, known bugs their reason, and a
    failing or unexpectedly passing cell is not hidden."""
    import importlib.util

    tool_path = Path(__file__).resolve().parents[2] / "tools" / "conformance_table.py"
    spec = importlib.util.spec_from_file_location("conformance_table", tool_path)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    reason = "known: a bug this test invents, to see its reason printed"
    with pytest.MonkeyPatch.context() as mp:  # dataclasses look their module up by name
        mp.setitem(sys.modules, "conformance_table", tool)
        spec.loader.exec_module(tool)
    junit = tmp_path / "run.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_cell[InfoBatch-batchnorm_cnn-defaults]"/>'
        '<testcase classname="t" name="test_cell[EMA-batchnorm_cnn-defaults]"/>'
        '<testcase classname="t" name="test_cell[EMA-metrics_classifier-typical]">'
        '<skipped type="pytest.xfail" message="the reason"/></testcase>'
        '<testcase classname="t" name="test_cell[WARP-tied_weights-typical]">'
        '<failure message="AssertionError: the anchor never moved"/></testcase>'
        '<testcase classname="t" name="test_cell[WARP-tied_weights-defaults]">'
        '<failure message="[XPASS(strict)] fixed"/></testcase>'
        "</testsuite></testsuites>"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(KNOWN_FAILURES, ("EMA", "metrics_classifier", "typical"), reason)
        page = tool.render(tool.read_junit(junit))
    callbacks = page[page.index("## Callbacks") : page.index("## Strategies")]
    row = {
        line.split("|")[1].strip(): line for line in callbacks.splitlines() if line.count("|") > 8
    }
    batchnorm = list(ZOO).index("batchnorm_cnn") + 2
    tied = list(ZOO).index("tied_weights") + 2
    assert "refuses (`InfoBatchSampler`) / not run" in row["**InfoBatch**"].split("|")[batchnorm]
    assert "works / not run" in row["**EMA**"].split("|")[batchnorm]
    assert "fixed: remove its xfail / **FAILED**" in row["**WARP**"].split("|")[tied]
    assert f"1. {reason}" in page
