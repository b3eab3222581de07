"""Overhead of recording gradient norms (ScheduleRefinement), side by side with plain training.

Two levels, each timed interleaved in one run:
- a plain torch training step vs the same step plus the callback's recording (per-tensor norms
  stacked into a preallocated device buffer, reduced and copied to the host in chunks), and plus
  the previous recording (one allocating ``gradient_norm`` and a buffer write per step);
- Lightning ``Trainer.fit`` over a fixed number of steps without vs with ``ScheduleRefinement``.

    python -m benchmarks.bench_schedule
"""

from __future__ import annotations

import logging
import tempfile
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.callbacks import ScheduleRefinement
from lightning_ext.callbacks.schedule import _NormRecorder
from lightning_ext.functional import gradient_norm, refine_schedule


class Transformer(nn.Module):
    """A small pre-norm transformer over the 8 rows of an 8x8 input: 2 layers, width 32."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(8, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos).mean(1))


class PreviousRecording:
    """The recording this callback did before: an allocating multi-tensor norm per step (grads
    gathered over param groups, dtype checks) and a copy into a growing device buffer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.count = optimizer, 0
        self.buffer = torch.empty(1024)

    def record(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]  # fmt: skip
        value = gradient_norm(grads, "l2")
        if self.count == self.buffer.numel():
            self.count = 0
        self.buffer[self.count].copy_(value)
        self.count += 1


def make_net(kind: str) -> nn.Module:
    if kind == "transformer":
        return Transformer()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))  # fmt: skip
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )  # fmt: skip


def raw_step_candidates(kind: str, device: str, batch: int) -> dict:
    torch.manual_seed(0)
    net = make_net(kind).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    record, previous = _NormRecorder(opt, "l2", None), PreviousRecording(opt)

    def step(recorder: _NormRecorder | PreviousRecording | None) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if recorder is not None:
            recorder.record()
        opt.step()

    def recording_alone() -> None:  # on the gradients the last step left behind
        record.record()
        if record.count > 10_000:
            record.values()
            record._host.clear()

    return {
        "plain step": lambda: step(None),
        "step + recording": lambda: step(record),
        "step + previous recording": lambda: step(previous),
        "recording alone": recording_alone,
        "previous recording alone": previous.record,
    }


class Module(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = make_net(kind)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class RecordingOnly(ScheduleRefinement):
    """The per-step part alone: the one-off refinement at fit end is timed separately."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grad_norms()  # the host copy of the record is part of the cost


def fit_candidates(kind: str, device: str, batch: int, steps: int, workdir: str) -> dict:
    data = TensorDataset(torch.rand(batch * steps, 64), torch.randint(0, 10, (batch * steps,)))
    loader = DataLoader(data, batch_size=batch)

    def fit(with_callback: bool) -> None:
        callbacks = [RecordingOnly(output_dir=workdir, plot=False)] if with_callback else []
        trainer = pl.Trainer(max_epochs=1, accelerator=device, devices=1, logger=False,
                             callbacks=callbacks, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        trainer.fit(Module(kind), train_dataloaders=loader)

    return {
        "Trainer.fit": lambda: fit(False),
        "Trainer.fit + ScheduleRefinement": lambda: fit(True),
    }


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for kind, batch in (("mlp", 128), ("cnn", 128), ("transformer", 64)):
        times = interleaved_timings(raw_step_candidates(kind, device, batch), repeats=15, inner=50)
        base = median(times["plain step"])
        for what, name in (
            ("training step", "step + recording"),
            ("training step, previous recording", "step + previous recording"),
        ):
            rec = median(times[name])
            rows.append([kind, what, f"{1e3 * base:.3f}", f"{1e3 * rec:.3f}",
                         f"{100 * (rec / base - 1):+.2f}%"])  # fmt: skip
        for what, name in (
            ("recording alone vs plain step", "recording alone"),
            ("previous recording alone vs plain step", "previous recording alone"),
        ):
            alone = median(times[name])
            rows.append([kind, what, f"{1e3 * base:.3f}", f"{1e3 * alone:.3f}",
                         f"{100 * alone / base:+.2f}%"])  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for kind in ("mlp", "cnn", "transformer"):
            steps = 100
            cands = fit_candidates(kind, device, 128, steps, workdir)
            times = interleaved_timings(cands, repeats=9, inner=1, warmup=1)
            base, rec = (
                median(times["Trainer.fit"]),
                median(times["Trainer.fit + ScheduleRefinement"]),
            )
            rows.append([kind, f"Trainer.fit, {steps} steps (per step)",
                         f"{1e3 * base / steps:.3f}", f"{1e3 * rec / steps:.3f}",
                         f"{100 * (rec / base - 1):+.2f}%"])  # fmt: skip
    refine_times = interleaved_timings(
        {"refine": lambda: refine_schedule(torch.rand(10_000) + 0.5)}, repeats=5, inner=1
    )
    refine_ms = 1e3 * median(refine_times["refine"])
    body = (
        f"Device: {device}. Batch 128 of 8x8 inputs; SGD with momentum. Medians of interleaved "
        "repeats; 'overhead' is the with-recording time over the plain time, minus 1 (for "
        "'recording alone': its time over the plain step's, the least noisy figure). The fit "
        "rows include Trainer start-up; the one-off work at fit end (refining the schedule: "
        f"{refine_ms:.0f} ms for a 10,000-step record; plus writing the files and plot) is "
        "excluded there and stated here. The machine is shared with other jobs: side-by-side "
        "ratios of whole steps move by a few percent between runs; the 'alone' rows are the "
        "steadiest figures.\n\n"
        + markdown_table(["model", "what", "plain (ms)", "with recording (ms)", "overhead"], rows)
    )
    write_result(f"bench_schedule_{device}", f"ScheduleRefinement recording overhead ({device})",
                 body, "python -m benchmarks.bench_schedule")  # fmt: skip


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    main()
