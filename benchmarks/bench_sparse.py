"""Cost of DynamicSparseTraining: masking overhead at non-update steps, and one mask update.

The callback's hooks are driven by hand around a bare PyTorch training step (no Trainer), so the
ratio is against the cheapest possible dense step: a harsher test than inside Lightning, whose own
per-step overhead would hide part of the cost. Target: overhead under 10% at non-update steps.

    python benchmarks/bench_sparse.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.callbacks import DynamicSparseTraining


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 16 * 16, 10),
    )


def setup(make, x, method="rigl", optimizer="adamw"):
    torch.manual_seed(0)
    model = make()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    y = torch.randint(0, 10, (x.shape[0],))
    trainer = SimpleNamespace(
        optimizers=[opt],
        estimated_stepping_batches=10_000,
        accumulate_grad_batches=1,
        global_step=1,
    )
    cb = None
    if method is not None:
        cb = DynamicSparseTraining(density=0.1, method=method, delta_t=100)
        cb.setup(trainer, model, "fit")
        cb.on_fit_start(trainer, model)
        cb._log_due = False  # no LightningModule.log outside a Trainer

    def hooks() -> None:
        cb.on_before_optimizer_step(trainer, model, opt)
        cb.on_train_batch_end(trainer, model, None, None, 0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if cb is not None:
            cb.on_before_optimizer_step(trainer, model, opt)
        opt.step()
        if cb is not None:
            cb.on_train_batch_end(trainer, model, None, None, 0)

    step()  # optimizer state and gradients exist from here on
    return step, hooks, cb, trainer


def main() -> None:
    torch.set_num_threads(1)
    cases = {
        "MLP 784-1024-1024-10, batch 128": (lambda: mlp(1024), torch.randn(128, 784)),
        "CNN 32x32x3, batch 32": (cnn, torch.randn(32, 3, 32, 32)),
    }
    rows = []
    for label, (make, x) in cases.items():
        for optimizer in ("sgd", "adamw"):
            dense, *_ = setup(make, x, None, optimizer)
            masked, hooks, *_ = setup(make, x, "rigl", optimizer)
            t = interleaved_timings(
                {"dense": dense, "masked": masked, "hooks": hooks}, repeats=7, inner=5
            )
            d, m, h = (median(t[k]) for k in ("dense", "masked", "hooks"))
            rows.append(
                [
                    label,
                    optimizer,
                    "step, non-update",
                    1e3 * d,
                    1e3 * m,
                    f"{100 * (m / d - 1):+.1f}%",
                    f"{100 * h / d:.1f}%",
                ]
            )
        updates = {}
        for method in ("rigl", "set", "snfs"):
            _, _, cb, trainer = setup(make, x, method=method)
            updates[method] = lambda cb=cb, trainer=trainer: cb._update_masks(trainer, 100)
        t = interleaved_timings(updates, repeats=5, inner=2, warmup=1)
        for method, times in t.items():
            u = median(times)
            rows.append(
                [
                    label,
                    "adamw",
                    f"mask update ({method})",
                    1e3 * d,
                    1e3 * u,
                    f"{u / d:.2f}x step",
                    f"{100 * u / d / 100:.1f}% amortised",
                ]
            )
    body = (
        "Density 0.1 (ERK). Medians of interleaved repeats (shared, noisy machine). Dense step: "
        "zero_grad, forward, backward, optimizer step on the dense model. With callback: the same "
        "on the sparse model with the callback's hooks. Hooks alone: the callback's two "
        "multi-tensor multiplications (gradients before the step, weights after) timed by "
        "themselves, as a share of the dense step: the masking overhead proper. The whole-step "
        "difference also contains numerical effects of sparse values on this CPU (AdamW's sqrt "
        "of mostly-zero second moments is several times slower than on dense values). A mask "
        "update runs once every Delta T = 100 steps; its amortised cost is its time / 100.\n\n"
        + markdown_table(
            [
                "model",
                "optimizer",
                "what",
                "dense step (ms)",
                "with callback (ms)",
                "whole-step change",
                "hooks alone",
            ],
            rows,
        )
    )
    write_result(
        "sparse", "DynamicSparseTraining overhead (CPU)", body, "python benchmarks/bench_sparse.py"
    )


if __name__ == "__main__":
    main()
