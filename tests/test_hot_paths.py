"""Hot paths of the callbacks (issue 19): no per-step allocation, no per-step host sync.

After a few warm-up steps, the storages a callback holds (its EMA, masks, norm record, ...) must
stay where they are: a new address means the step allocated a buffer and dropped the old one.
Host syncs are counted with ``benchmarks._suite_models.HostSyncCounter`` (scalar reads such as
``.item()``/``bool(tensor)``, ``nonzero``-like ops, boolean-mask indexing, ``.cpu()``/
``.tolist()``), the CPU stand-in for ``torch.cuda.set_sync_debug_mode``, over steps that neither
update masks nor flush logs; plain training with the same module makes none, so any count is the
callback's. "Held" memory is the benchmark's definition (``held_storages``), so the tests and
``benchmarks/bench_suite.py`` measure the same thing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._suite_models import (
    HostSyncCounter,
    SuiteTask,
    held_storages,
    model_storages,
    random_data,
    train_loader,
)
from lightning_ext.callbacks import (
    EMA,
    WARP,
    ContinualEvaluation,
    DataPruningScores,
    DynamicSparseTraining,
    InfoBatch,
    PostHocEMA,
    ScheduleRefinement,
)
from tests.helpers.models import MLP

WARMUP, STEPS, BATCH = 3, 6, 16


class StepProbe(Callback):
    """At every batch start: the host syncs counted so far, and the storages ``watched`` holds."""

    def __init__(self, counter: HostSyncCounter | None, watched: Callback | None) -> None:
        self.counter, self.watched = counter, watched
        self.syncs: list[dict[str, int]] = []
        self.storages: list[set[int]] = []
        self.held_bytes: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.counter is not None:
            self.syncs.append(dict(self.counter.counts))
        if self.watched is not None:
            exclude = model_storages(pl_module, trainer.optimizers)
            held = held_storages(self.watched, exclude)
            self.storages.append(set(held))
            self.held_bytes.append(sum(held.values()))

    def syncs_per_step(self) -> list[dict[str, int]]:
        """Syncs of each step after the warm-up, by operation (empty dict: none)."""
        after = self.syncs[WARMUP:]
        return [
            {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
            for before, now in itertools.pairwise(after)
        ]


def fit(
    callbacks: list[Callback],
    *,
    count_syncs: bool = False,
    watch: Callback | None = None,
    infobatch: bool = False,
) -> StepProbe:
    """A short fit of an MLP with SGD (no sync of its own) on indexed random data: one epoch of
    exactly WARMUP + STEPS + 1 steps, so the per-sample callbacks see every sample."""
    torch.manual_seed(0)
    steps = WARMUP + STEPS + 1
    counter = HostSyncCounter() if count_syncs else None
    probe = StepProbe(counter, watch)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        log_every_n_steps=50,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[probe, *callbacks],
    )
    module = SuiteTask(MLP(), lr=0.01, optimizer="sgd")
    loader = train_loader(random_data((64,), steps * BATCH), BATCH, infobatch=infobatch)
    if counter is None:
        trainer.fit(module, loader)
    else:
        with counter.counting():
            trainer.fit(module, loader)
    return probe


def _dst(**kwargs: Any) -> DynamicSparseTraining:
    return DynamicSparseTraining(density=0.3, delta_t=1000, **kwargs)  # no mask update here


def _eval_set() -> torch.utils.data.Dataset:
    return random_data((64,), 32, seed=1)


# name -> (callback factory, needs InfoBatch's sampler). Every callback with per-step work.
PER_STEP: dict[str, tuple[Callable[[], Callback], bool]] = {
    "EMA": (EMA, False),
    "EMA-log_decay=False": (lambda: EMA(log_decay=False), False),
    "PostHocEMA": (lambda: PostHocEMA(snapshot_dir="phema"), False),
    "WARP": (WARP, False),
    "DST-rigl": (_dst, False),
    "DST-snfs": (lambda: _dst(method="snfs"), False),
    "ScheduleRefinement": (lambda: ScheduleRefinement(plot=False), False),
    "ContinualEvaluation": (
        lambda: ContinualEvaluation([_eval_set()], every_n_steps=100, export=False, plot=False),
        False,
    ),
    "DataPruningScores-online": (
        lambda: DataPruningScores(mode="online", output_path="scores.pt"),
        False,
    ),
    "InfoBatch": (InfoBatch, True),
}
# The callbacks whose per-step work runs over buffers of their own (the rest keep records).
BUFFERED = ["EMA", "PostHocEMA", "WARP", "DST-rigl", "DST-snfs", "ScheduleRefinement"]


def test_counter_sees_the_syncs_it_claims_to() -> None:
    originals = [torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy]
    make_tensor = torch.tensor
    counter = HostSyncCounter()
    x = torch.arange(4.0)
    with counter.counting():
        x.sum().item()
        bool(x[0])
        x[x > 1]
        x.tolist()
        x.cpu()
        x.nonzero()
        torch.tensor(1.0, device=x.device)
        torch.tensor(1.0)  # host memory only: not a sync
        x.mul_(2)  # not a sync
    assert counter.counts == {
        "aten::_local_scalar_dense": 2,
        "aten::index with a boolean mask": 1,
        "Tensor.tolist": 1,
        "Tensor.cpu": 1,
        "aten::nonzero": 1,
        "torch.tensor(..., device=...)": 1,
    }
    assert [torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy] == originals  # restored
    assert torch.tensor is make_tensor


def test_held_storages_counts_each_storage_once_and_not_the_models() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    own = torch.zeros(10)

    class Holder:
        pass

    holder = Holder()
    holder.views = [own, own[:5], {"again": own.view(2, 5)}]  # one storage, 40 bytes
    holder.other = (torch.ones(3, dtype=torch.float64),)  # 24 bytes
    holder.borrowed = [model.weight, model.weight.grad, *optimizer.state[model.weight].values()]
    held = held_storages(holder, model_storages(model, [optimizer]))
    assert sorted(held.values()) == [24, 40]


def test_plain_training_makes_no_host_sync_per_step() -> None:
    """The baseline: without callbacks this fit syncs nowhere, so the tests below see only
    what a callback adds."""
    steps = fit([], count_syncs=True).syncs_per_step()
    assert len(steps) == STEPS
    assert steps == [{}] * STEPS


@pytest.mark.parametrize("name", PER_STEP)
def test_no_host_sync_per_step(name: str) -> None:
    make, infobatch = PER_STEP[name]
    steps = fit([make()], count_syncs=True, infobatch=infobatch).syncs_per_step()
    assert len(steps) == STEPS
    assert steps == [{}] * STEPS, f"{name} syncs with the host in steady-state steps: {steps}"


@pytest.mark.parametrize("name", BUFFERED)
def test_per_step_buffers_stay_put(name: str) -> None:
    make, infobatch = PER_STEP[name]
    callback = make()
    seen = fit([callback], watch=callback, infobatch=infobatch).storages[WARMUP:]
    assert len(seen) == STEPS + 1
    assert seen[0], f"{name} holds no tensor of its own after {WARMUP} steps"
    moved = [i for i, now in enumerate(seen) if now != seen[0]]
    assert not moved, f"{name} reallocated its buffers at steps {[WARMUP + i for i in moved]}"


def test_dst_masks_cost_at_most_two_bytes_per_targeted_weight() -> None:
    """A boolean mask (1 byte) and the boolean ever-active record (1 byte) per targeted weight:
    issue 19 measured 1.24x the model's bytes with masks in the weights' float dtype."""
    callback = _dst()
    held = fit([callback], watch=callback).held_bytes[-1]
    targeted = sum(m.numel() for m in callback.masks.values())
    assert targeted > 0
    assert held <= 2 * targeted, f"{held} bytes held for {targeted} targeted weights"


# ----------------------------------------------------------------- issue 29: the new paths


class OpNames(TorchDispatchMode):
    """The aten operators run inside the block, with their arguments (what the l1 path uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("flat_limit", "piece"), [(1 << 20, 1000), (0, 1000), (0, 1 << 16)])
def test_l1_norm_avoids_the_unvectorised_l1_kernel_and_is_exact(
    flat_limit: int, piece: int, monkeypatch
) -> None:
    """ScheduleRefinement's l1 norm on the CPU: no ``ord=1`` norm kernel (not vectorised: 2.9x
    its bound), no allocation per step, and the float64 value to float32 rounding, through the
    flat path and through the packed-and-scratch path (``_AbsSums``: large tensors in pieces, or
    whole, with no reshape of their gradients) alike."""
    from lightning_ext.callbacks.schedule import _AbsSums, _NormRecorder

    monkeypatch.setattr(_NormRecorder, "FLAT_LIMIT", flat_limit)
    monkeypatch.setattr(_AbsSums, "PIECE", piece)  # 1000: large tensors split into pieces
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 40), (16,), (70, 70), (3000,), (5, 5)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    recorder = _NormRecorder(torch.optim.AdamW(params), "l1", None)
    assert bool(recorder._abs_groups) == (flat_limit == 0)
    scratch = [g.scratch for g in recorder._abs_groups]
    expected = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10 ** (step - 1)
        params[3].grad = None if step == 1 else params[3].grad  # a missing gradient: zeros
        grads = [p.grad.double() for p in params if p.grad is not None]
        expected.append(float(sum(g.abs().sum() for g in grads)))
        with OpNames() as ops:
            recorder.record()
        names = [name for name, _ in ops.calls]
        assert "aten._foreach_norm" not in names
        assert not any(n == "aten.linalg_vector_norm" and a[1:2] == (1,) for n, a in ops.calls)
        assert "aten.empty" not in names and "aten.empty_like" not in names
        if piece > 1000 and step != 1:  # one view: the small 2-D gradient's (issue 29)
            assert names.count("aten.view") == 1, names
    assert [g.scratch for g in recorder._abs_groups] == scratch  # the same buffers
    torch.testing.assert_close(
        recorder.values().double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-7, atol=0
    )


def test_dst_holds_adam_denominators_only_where_inactive() -> None:
    """The sparse step at dense speed: after a few AdamW steps, every inactive weight's
    ``exp_avg_sq`` is held positive (no ``sqrt`` of exact zeros) while its first moment and
    weight stay exactly zero."""
    callback = DynamicSparseTraining(density=0.3, delta_t=1000)
    probe = StepProbe(None, None)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[probe, callback],
    )
    module = SuiteTask(MLP(), lr=0.01, optimizer="adamw")
    trainer.fit(module, train_loader(random_data((64,), 4 * BATCH), BATCH))
    optimizer = trainer.optimizers[0]
    assert callback._hold_every > 0
    for p, mask in zip(callback._params, callback._masks):
        second = optimizer.state[p]["exp_avg_sq"]
        assert torch.all(second[~mask] > 0), "inactive exp_avg_sq left at exact zero"
        assert torch.all(optimizer.state[p]["exp_avg"][~mask] == 0)
        assert torch.all(p[~mask] == 0)


def test_large_tensors_are_masked_through_a_float_scratch_with_the_same_bits() -> None:
    """DST's masking of large float32 tensors: the mask piece is copied into a float scratch
    buffer and multiplied float by float (torch's float-by-uint8 kernel is a scalar casting loop,
    3.5x slower), giving the very bits of the direct product, signed zeros included."""
    from lightning_ext.functional.sparse import MASK_LARGE, MASK_PIECE, mask_multiply_

    gen = torch.Generator().manual_seed(0)
    big, small = torch.randn(MASK_LARGE + 7, generator=gen), torch.randn(100, generator=gen)
    masks = [(torch.rand(t.shape, generator=gen) < 0.3).view(torch.uint8) for t in (big, small)]
    expected = [big.clone(), small.clone()]
    torch._foreach_mul_(expected, masks)
    scratch = torch.empty(MASK_PIECE)
    with OpNames() as ops:
        mask_multiply_([big, small], masks, scratch)
    for got, want in zip([big, small], expected):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # -0.0 too
    products = [args for name, args in ops.calls if name == "aten.mul_"]
    assert len(products) == MASK_LARGE // MASK_PIECE + 1  # the large one's pieces, float by float
    assert all(a[1].dtype == torch.float32 for a in products)


class MaskPasses(Callback):
    """Per step, DynamicSparseTraining's masking passes (``_foreach_mul_`` by its uint8 masks)
    over the weights and over the gradients, told apart by the weights' storage."""

    def __init__(self) -> None:
        self.ops = OpNames()
        self.marks: list[int] = []
        self.weights: set[int] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {p.data_ptr() for p in pl_module.parameters()}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.marks.append(len(self.ops.calls))

    def per_step(self) -> list[tuple[int, int]]:
        """(weight passes, gradient passes) of each step after the warm-up."""
        out = []
        for a, b in itertools.pairwise(self.marks[WARMUP:]):
            calls = [args for name, args in self.ops.calls[a:b] if name == "aten._foreach_mul_"]
            passes = [args[0][0] for args in calls if args[1][0].dtype == torch.uint8]
            weights = sum(t.data_ptr() in self.weights for t in passes)
            out.append((weights, len(passes) - weights))
        return out


@pytest.mark.parametrize("remask", [False, True])
def test_dst_makes_one_masking_pass_per_step(remask: bool) -> None:
    """The gradients' pass only (issue 29: the optimizer keeps masked-gradient weights at zero,
    so the weights' pass after the step is skipped); both with ``remask_weights=True``."""
    probe = MaskPasses()
    with probe.ops:
        fit([probe, _dst(remask_weights=remask)])
    assert probe.per_step() == [(int(remask), 1)] * STEPS


def test_the_floor_benchmark_does_each_callbacks_tensor_work() -> None:
    """``benchmarks/bench_floor``'s bare loop adds exactly the per-step tensor work it claims
    (three lerps, one uint8 gradient pass, the l1 recorder) and keeps DST's inactive weights at
    zero with their denominators held, so that its floor is the callbacks' own work."""
    from benchmarks.bench_floor import PER_STEP, build_variant, train_step

    torch.manual_seed(0)
    template = MLP()
    suite = build_variant("suite", PER_STEP, template)
    x, y = torch.randn(BATCH, 64), torch.randint(0, 10, (BATCH,))
    train_step(suite, x, y)  # the first step creates the optimizer state and holds it
    with OpNames() as ops:
        train_step(suite, x, y)
    names = [name for name, _ in ops.calls]
    uint8_products = [
        args
        for name, args in ops.calls
        if name == "aten._foreach_mul_" and args[1][0].dtype == torch.uint8
    ]
    assert names.count("aten._foreach_lerp_") == 3  # EMA and PostHocEMA's two profiles
    assert len(uint8_products) == 1  # DST's gradient pass
    assert {"aten.abs", "aten.abs_"} & set(names) and "aten.sum" in names  # the l1 recorder
    state = suite.optimizer.state
    for p in suite.model.parameters():
        if p.dim() >= 2:
            inactive = p == 0
            assert int(inactive.sum()) == p.numel() - p.numel() // 10
            assert torch.all(state[p]["exp_avg_sq"][inactive] > 0)
