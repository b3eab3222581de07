"""EMA benchmarks: update cost, training-step overhead, and quality on digits.

    python -m benchmarks.bench_ema            # all three parts (a few minutes on one CPU core)
    python -m benchmarks.bench_ema --part update|overhead|quality

Update cost: one EMA update of a 17-layer transformer encoder (206 parameter tensors) with
Lightning 2.6's EMAWeightAveraging path (torch.optim.swa_utils.AveragedModel.update_parameters
with get_ema_avg_fn, what its on_train_batch_end calls), with ours (the callback's ShadowWeights),
and with a bare ``torch._foreach_lerp_`` over the same tensors, interleaved in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import interleaved_timings, markdown_table, median, write_result


def encoder(layers: int = 17, dim: int = 128) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        torch.nn.LayerNorm(dim),
    )


def part_update() -> str:
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from lightning_ext.averaging import ShadowWeights, TrackedTensors

    model = encoder()
    params = list(model.parameters())
    n_tensors, n_params = len(params), sum(p.numel() for p in params)
    lightning = AveragedModel(model, avg_fn=get_ema_avg_fn(0.999), use_buffers=True)
    lightning.update_parameters(model)  # the first call only copies
    ours = ShadowWeights(TrackedTensors.from_module(model))
    bare = [p.detach().clone() for p in params]
    times = interleaved_timings(
        {
            "Lightning EMAWeightAveraging (AveragedModel)": lambda: lightning.update_parameters(
                model
            ),
            "lightning-ext EMA": lambda: ours.update_(0.999),
            "bare torch._foreach_lerp_": lambda: torch._foreach_lerp_(bare, params, 0.001),
        },
        repeats=9,
        inner=5,
    )
    base = median(times["bare torch._foreach_lerp_"])
    ours_t = median(times["lightning-ext EMA"])
    rows = [
        [name, median(t) * 1e3, min(t) * 1e3, median(t) / base, median(t) / ours_t]
        for name, t in times.items()
    ]
    table = markdown_table(
        ["update", "median ms", "min ms", "x bare foreach", "x lightning-ext"], rows
    )
    return (
        f"## Update cost\n\nModel: 17-layer transformer encoder, {n_tensors} parameter tensors, "
        f"{n_params / 1e6:.2f}M parameters, float32, CPU. 9 interleaved repetitions of 5 "
        f"updates each.\n\n{table}\n"
    )


class _StepClock:
    """Wall time from one batch start to the next: the whole step, EMA update included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())


def part_overhead(steps: int = 120, tokens: int = 16) -> str:
    """EMA updates on every other step (update_every_n_steps=2) of one fit: the steps with an
    update and the steps without alternate, so machine noise hits both alike. The callback runs
    with its defaults (``ema/decay`` logging on), as users run it."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_ext.callbacks import EMA

    class SeqTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = encoder()
            self.head = torch.nn.Linear(128, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.head(self.body(x).mean(1)), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    hook_times: list[float] = []

    class TimedEMA(EMA):
        """The callback's own cost: its batch-end hook, where the update runs."""

        def on_train_batch_end(self, *args, **kwargs):
            start = time.perf_counter()
            before = self.num_updates
            super().on_train_batch_end(*args, **kwargs)
            if self.num_updates != before:
                hook_times.append(time.perf_counter() - start)

    clock = type("Clock", (_StepClock, Callback), {})()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(steps * 16, tokens, 128, generator=g),
        torch.randint(0, 10, (steps * 16,), generator=g),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[clock, TimedEMA(decay=0.999, update_every_n_steps=2)],
    )
    trainer.fit(SeqTask(), torch.utils.data.DataLoader(data, batch_size=16))
    durations = [b - a for a, b in zip(clock.starts, clock.starts[1:])][4:]  # skip warm-up
    # Step k (0-based batch index) ends with global_step k+1; EMA updates when that is even.
    first = 4
    with_ema = [d for i, d in enumerate(durations, start=first) if (i + 1) % 2 == 0]
    without = [d for i, d in enumerate(durations, start=first) if (i + 1) % 2 == 1]
    ratio = median(with_ema) / median(without)
    hook_ms = median(hook_times[2:]) * 1e3
    rows = [
        ["steps without EMA update", len(without), median(without) * 1e3, "1"],
        ["steps with EMA update", len(with_ema), median(with_ema) * 1e3, f"{ratio:.4f}"],
    ]
    table = markdown_table(["steps", "count", "median ms/step", "ratio"], rows)
    return (
        f"## Training-step overhead\n\nSame encoder in a LightningModule, AdamW, batch 16 x "
        f"{tokens} tokens, one fit of {steps} steps with EMA(update_every_n_steps=2): steps with "
        f"and without an update alternate, so both see the same machine load. Overhead of an EMA "
        f"update every step = {100 * (ratio - 1):.2f}% of the step time (step-time ratio).\n"
        f"Time spent inside the callback's hooks, timed directly: median {hook_ms:.2f} ms per "
        f"updating step = {100 * hook_ms / (median(without) * 1e3):.2f}% of the median step "
        f"without an update. The machine is shared with other jobs: the step-time ratio "
        f"carries their noise, the hook time much less.\n\n{table}\n"
    )


def part_quality(seeds: int = 5, epochs: int = 12) -> str:
    import lightning.pytorch as pl

    from examples._digits import digits_splits
    from lightning_ext.callbacks import EMA
    from tests.helpers.models import Classifier

    live_acc, ema_acc = [], []
    for seed in range(seeds):
        splits = digits_splits(seed=seed)
        pl.seed_everything(seed, verbose=False)
        # A deliberately noisy schedule: constant high LR, small batches, no decay.
        model = Classifier(net="mlp", lr=0.1, momentum=0.9)
        ema = EMA(decay=0.99, apply_on_fit_end=False, log_decay=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[ema],
        )
        trainer.fit(
            model, torch.utils.data.DataLoader(splits["train"], batch_size=16, shuffle=True)
        )
        x, y = splits["test"].tensors
        with torch.no_grad():
            live_acc.append((model(x).argmax(-1) == y).float().mean().item())
            model.load_state_dict(ema.ema_state_dict())
            ema_acc.append((model(x).argmax(-1) == y).float().mean().item())

    def fmt(xs: list[float]) -> str:
        return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"

    wins = sum(e > v for e, v in zip(ema_acc, live_acc))
    rows = [["live weights", fmt(live_acc)], ["EMA (decay 0.99)", fmt(ema_acc)]]
    per_seed = ", ".join(f"{100 * v:.1f}/{100 * e:.1f}" for v, e in zip(live_acc, ema_acc))
    return (
        f"## Quality on digits with a noisy schedule\n\nMLP 64-32-32-10, SGD lr 0.1 momentum 0.9 "
        f"constant, batch 16, {epochs} epochs, {seeds} seeds (seed also picks the split); test "
        f"accuracy (%) mean ± std.\nPer seed live/EMA: {per_seed}. EMA better in {wins} of "
        f"{seeds} seeds.\n\n{markdown_table(['weights', 'test accuracy %'], rows)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["update", "overhead", "quality", "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = {"update": part_update, "overhead": part_overhead, "quality": part_quality}
    chosen = parts if args.part == "all" else {args.part: parts[args.part]}
    body = "\n".join(fn() for fn in chosen.values())
    suffix = "" if args.part == "all" else f"_{args.part}"
    write_result(
        f"bench_ema{suffix}_cpu",
        "EMA benchmarks",
        body,
        f"python -m benchmarks.bench_ema --part {args.part}",
    )


if __name__ == "__main__":
    main()
