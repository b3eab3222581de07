"""Cost of DynamicSparseTraining on a 17-layer transformer encoder: step time, masking against its
memory-bandwidth bound, memory against the model's bytes, and one mask update.

The callback's hooks are driven by hand around a bare PyTorch training step (no Trainer), so the
ratio is against the cheapest possible dense step. All candidates are timed interleaved (round
robin, several repeats) in one process on one thread; the machine is shared, so read the ratios,
not the absolute times.

    python -m benchmarks.bench_sparse            # about 3 minutes on one core
    python -m benchmarks.bench_sparse --quick    # smoke run
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.callbacks import DynamicSparseTraining

VOCAB, DIM, HEADS, FF, LAYERS = 256, 128, 4, 512, 17
BATCH, TOKENS = 16, 16


class Encoder(nn.Module):
    """Token embedding, 17 post-norm encoder layers (d=128, 4 heads, FF 512), a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)
        self.automatic_optimization = True  # read by the callback as on a LightningModule

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def callback_bytes(cb: DynamicSparseTraining) -> int:
    own = list(cb._own_momentum.values())
    return storage_bytes(cb._masks + cb._multipliers + cb._ever + own + cb._dense)


def make_run(
    method: str | None, optimizer: str = "adamw", seed: int = 0, hold: bool = True
) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = Encoder()
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.0)
    x = torch.randint(0, VOCAB, (BATCH, TOKENS))
    y = torch.randint(0, VOCAB, (BATCH, TOKENS))
    trainer = SimpleNamespace(
        optimizers=[opt],
        estimated_stepping_batches=100_000,
        accumulate_grad_batches=1,
        global_step=0,  # the first step (held denominators written), then 1: no mask update
    )
    cb = None
    if method is not None:
        cb = DynamicSparseTraining(
            density=0.1, method=method, delta_t=100, plot=False, hold_denominators=hold
        )
        cb.setup(trainer, model, "fit")
        cb.on_fit_start(trainer, model)
        cb.on_train_start(trainer, model)  # steps count from here: the post-step hook works
        cb._log_due = False  # no LightningModule.log outside a Trainer

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        if cb is not None:
            cb.on_before_optimizer_step(trainer, model, opt)
        opt.step()  # the callback's post-step hook re-masks the weights

    step()  # optimizer state and gradients exist from here on
    trainer.global_step = 1  # never a multiple of delta_t nor of the hold period from here on
    return SimpleNamespace(model=model, opt=opt, cb=cb, trainer=trainer, step=step)


def masking_candidates(run: SimpleNamespace) -> dict[str, object]:
    """The callback's masking (gradients before the step, weights after), the same two passes
    with masks in the weights' dtype (the layout before this change), and the two plain
    memory-speed passes over the same tensors (scalar multiply: read + write, no mask)."""
    cb, opt, trainer, model = run.cb, run.opt, run.trainer, run.model
    params = cb._params
    grads = [p.grad for p in params]
    float_masks = [m.to(p.dtype) for m, p in zip(cb._masks, params)]

    def hooks() -> None:
        cb.on_before_optimizer_step(trainer, model, opt)
        cb._after_step(opt, (), {})

    @torch.no_grad()
    def float_mask_passes() -> None:
        torch._foreach_mul_(grads, float_masks)
        torch._foreach_mul_(params, float_masks)

    @torch.no_grad()
    def plain_passes() -> None:
        torch._foreach_mul_(grads, 1.0)
        torch._foreach_mul_(params, 1.0)

    return {"hooks": hooks, "float masks": float_mask_passes, "plain": plain_passes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats, inner = (3, 2) if args.quick else (9, 5)

    runs = {
        "dense": make_run(None),
        "rigl": make_run("rigl"),
        "rigl, hold_denominators=False": make_run("rigl", hold=False),
        "snfs": make_run("snfs"),
    }
    model_bytes = storage_bytes(list(runs["dense"].model.parameters()))
    n_params = sum(p.numel() for p in runs["dense"].model.parameters())
    targeted = sum(p.numel() for p in runs["rigl"].cb._params)

    steps = interleaved_timings({k: r.step for k, r in runs.items()}, repeats=repeats, inner=inner)
    dense = median(steps["dense"])
    rows = [["step (dense)", f"{1e3 * dense:.1f} ms", "1.00x", ""]]
    for method in ("rigl", "rigl, hold_denominators=False", "snfs"):
        t = median(steps[method])
        rows.append([f"step ({method}, density 0.1)", f"{1e3 * t:.1f} ms", f"{t / dense:.2f}x", ""])

    # Where the rest of the rigl step went: AdamW on mostly-zero moments (masked gradients keep
    # the inactive weights' state at zero), unless the callback holds the second moments.
    # Same optimizer step, hooks off: dense state, rigl state with and without the held values.
    sparse_state = make_run("rigl", hold=False)
    sparse_state.cb._remove_step_hooks()
    held_state = make_run("rigl")
    held_state.cb._remove_step_hooks()
    zeros, positive = torch.zeros(targeted), torch.rand(targeted) + 0.1
    optim = interleaved_timings(
        {
            "dense": runs["dense"].opt.step,
            "sparse": sparse_state.opt.step,
            "held": held_state.opt.step,
            "sqrt zeros": lambda: torch.sqrt(zeros),
            "sqrt positive": lambda: torch.sqrt(positive),
        },
        repeats=repeats,
        inner=inner,
    )
    o_dense, o_sparse = median(optim["dense"]), median(optim["sparse"])
    o_held = median(optim["held"])
    rows.append(
        [
            "AdamW step alone, rigl run's state with held second moments (dense run's state)",
            f"{1e3 * o_held:.1f} ms ({1e3 * o_dense:.1f} ms)",
            f"{(o_held - o_dense) / dense:+.3f}x step",
            "inactive exp_avg_sq held at 1 (the default, hold_denominators=True)",
        ]
    )
    rows.append(
        [
            "AdamW step alone, rigl run's state, zero second moments (dense run's state)",
            f"{1e3 * o_sparse:.1f} ms ({1e3 * o_dense:.1f} ms)",
            f"+{(o_sparse - o_dense) / dense:.3f}x step",
            f"sqrt of {targeted / 1e6:.1f}M zeros {1e3 * median(optim['sqrt zeros']):.1f} ms, "
            f"of positive values {1e3 * median(optim['sqrt positive']):.1f} ms",
        ]
    )

    masking = interleaved_timings(
        masking_candidates(runs["rigl"]), repeats=repeats, inner=inner * 4
    )
    plain = median(masking["plain"])
    # bound: the plain passes (2 x read + write fp32 = 16 bytes per element) scaled by the bytes
    # the masked passes move: + 2 mask reads of 1 byte (bool) or 4 bytes (fp32)
    for label, key, share in (
        ("masking hooks (bool masks, uint8 views)", "hooks", 18 / 16),
        ("same two passes, masks in fp32 (before)", "float masks", 24 / 16),
    ):
        t = median(masking[key])
        rows.append(
            [
                label,
                f"{1e3 * t:.2f} ms",
                f"{t / dense:.3f}x step",
                f"{t / (plain * share):.2f}x its bound ({1e3 * plain * share:.2f} ms)",
            ]
        )
    rows.append(
        ["two plain passes (grads, weights)", f"{1e3 * plain:.2f} ms", f"{plain / dense:.3f}x", ""]
    )

    sgd_snfs = make_run("snfs", optimizer="sgd")
    memory = [
        ["model parameters", f"{model_bytes / 2**20:.2f} MiB", "1.00x"],
        *[
            [
                f"callback state: {label}",
                f"{callback_bytes(cb) / 2**20:.2f} MiB",
                f"{callback_bytes(cb) / model_bytes:.3f}x",
            ]
            for label, cb in (
                ("rigl (bool masks + bit-packed ever-active record)", runs["rigl"].cb),
                ("snfs with AdamW (the optimizer's moments)", runs["snfs"].cb),
                ("snfs with plain SGD (own momentum)", sgd_snfs.cb),
            )
        ],
        [
            "before: masks in fp32 + bool ever-active (+ own momentum for snfs)",
            f"{(targeted * 5) / 2**20:.2f} MiB",
            f"{targeted * 5 / model_bytes:.3f}x (snfs {targeted * 9 / model_bytes:.3f}x)",
        ],
    ]

    updates = {}
    for method in ("rigl", "set", "snfs"):
        run = make_run(method, seed=1)
        updates[method] = lambda cb=run.cb: cb._update_masks(100)
    upd = interleaved_timings(updates, repeats=max(2, repeats // 3), inner=1, warmup=1)
    for method, times in upd.items():
        u = median(times)
        rows.append(
            [
                f"one mask update ({method})",
                f"{1e3 * u:.1f} ms",
                f"{u / dense:.2f}x step",
                f"{u / dense / 100:.3f}x amortised over delta_t=100",
            ]
        )

    body = (
        f"Model: {LAYERS}-layer transformer encoder (d={DIM}, {HEADS} heads, FF {FF}, vocabulary "
        f"{VOCAB}), {n_params / 1e6:.2f}M parameters ({targeted / 1e6:.2f}M targeted: Linear and "
        f"attention projections), AdamW, batch {BATCH}x{TOKENS} tokens, 1 CPU thread. Density 0.1 "
        "(ERK), delta_t = 100 and no mask update inside the timed window. Medians of "
        f"{repeats} interleaved repeats; the machine is shared with other jobs, so the times "
        "are noisy and only the side-by-side ratios mean something.\n\n"
        "The bandwidth bound of the masking is two passes over the targeted tensors (gradients "
        "before the step, weights after): the time of two plain in-place passes over the same "
        "tensors (scalar multiply: read + write, 16 bytes per element) scaled by the bytes the "
        "masked passes move (18 with 1-byte masks, 24 with fp32 masks).\n\n"
        + markdown_table(["what", "time", "vs dense step", "vs bound"], rows)
        + "\n\nMemory of the callback's own tensors against the model's parameter bytes "
        "(optimizer state not counted; the dense run has the same):\n\n"
        + markdown_table(["what", "bytes", "vs model"], memory)
    )
    if args.quick:  # a smoke run: print, keep the measured table
        print(body)
        return
    write_result(
        "bench_sparse_cpu",
        "DynamicSparseTraining cost (CPU)",
        body,
        "python -m benchmarks.bench_sparse",
    )


if __name__ == "__main__":
    main()
