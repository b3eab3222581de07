"""How the callbacks' cost grows with the model (issue 29): every per-step callback's overhead at
about 1M, 10M and 100M parameters, MLP and transformer, side by side in the same run with the
anchors a user would pick instead (Lightning's ``EMAWeightAveraging``, torch's ``AveragedModel``,
timm's ``ModelEmaV3``, ema-pytorch's ``EMA`` for the EMA; Lightning's ``ModelPruning`` for the
masking step).

    python -m benchmarks.bench_scaling --sizes 1 10              # ~5 CPU minutes
    python -m benchmarks.bench_scaling --sizes 100 --rounds 2 --steps 3 --out bench_scaling_100m_cpu

The fits are ``bench_suite``'s (``run_fit``: one ``Trainer.fit`` per configuration, rounds
rotated, process CPU time, held memory by ``held_storages``), with a batch that does not grow
with the model (MLP: 16 samples; transformer: 4 sequences of 16 tokens), so that the training
step's compute and every callback's tensor work both grow with the parameter count: a ratio to
plain that stays flat or falls as the model grows is the goal. timm and ema-pytorch are optional
(``pip install lightning-ext[bench]``); a missing anchor is reported as such. timm needs a
torchvision built for the installed torch (pip may replace torch to get one: ``pip install
--no-deps timm`` keeps yours); where ``import timm`` fails, its self-contained
``timm/utils/model_ema.py`` is loaded alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from benchmarks._common import RESULTS, markdown_table, median
from benchmarks._common import write_result as _write_result
from benchmarks._suite_models import Encoder
from benchmarks.bench_suite import CONFIGS, Config, Measured, _load, run_fit

MB = 2**20

# ------------------------------------------------------------------------------- models


def scaled_mlp(width: int) -> nn.Module:
    """256 inputs, three hidden layers of ``width``, 10 outputs: about 2 width^2 parameters."""
    return nn.Sequential(
        nn.Linear(256, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


# size in millions -> (builder, sample shape, batch): MLP widths and (layers, width) of the
# encoder chosen for ~1M, ~10M and ~100M parameters.
MLP_WIDTHS = {1: 640, 10: 2176, 100: 7000}
ENCODERS = {1: (5, 128), 10: (13, 256), 100: (14, 768)}


def model_spec(kind: str, size: int) -> tuple[Callable[[], nn.Module], tuple[int, ...], int]:
    if kind == "mlp":
        return (lambda: scaled_mlp(MLP_WIDTHS[size])), (256,), 16
    layers, dim = ENCODERS[size]
    return (lambda: Encoder(layers, dim)), (16, dim), 4


# ------------------------------------------------------------------------------ anchors


class _EveryStep(Callback):
    """An averaging object from another library, updated after every training step."""

    def __init__(self, build: Callable[[nn.Module], Any], update: Callable[[Any, nn.Module], Any]):
        self.build, self.update = build, update
        self.average: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.average = self.build(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self.update(self.average, pl_module)


def _averaged_model() -> Callback:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return _EveryStep(
        lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.999)),
        lambda avg, m: avg.update_parameters(m),
    )


def _timm_ema_class() -> Any:
    """timm's ``ModelEmaV3``; where ``import timm`` fails (timm needs a torchvision built for
    this torch), its self-contained ``timm/utils/model_ema.py`` is loaded alone."""
    try:
        from timm.utils.model_ema import ModelEmaV3

        return ModelEmaV3
    except ImportError:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
        module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.ModelEmaV3


def _timm() -> Callback:
    ema = _timm_ema_class()
    return _EveryStep(lambda m: ema(m, decay=0.999), lambda avg, m: avg.update(m))


def _ema_pytorch() -> Callback:
    from ema_pytorch import EMA as EmaPytorch

    return _EveryStep(
        lambda m: EmaPytorch(m, beta=0.999, update_after_step=0, update_every=1),
        lambda avg, m: avg.update(),
    )


def _lightning_ema() -> Callback:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return EMAWeightAveraging(decay=0.999)


class _PrunedFromStart(ModelPruning):
    """Lightning's ModelPruning with its masks applied before the first step (by default it
    prunes at epoch ends): 90% of every ``nn.Linear`` weight, global magnitude, masks applied by
    ``torch.nn.utils.prune``'s forward pre-hooks. Attention's projections are left out: its
    ``out_proj`` forward is never called, so a pre-hook would not mask it."""

    def __init__(self) -> None:
        super().__init__("l1_unstructured", amount=0.9, use_global_unstructured=True, verbose=0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        linears = [m for m in pl_module.modules() if type(m) is nn.Linear]
        self._parameters_to_prune = [(m, "weight") for m in linears]
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply_pruning(0.9)

    def held(self) -> int:
        """Its masks are module buffers (``weight_mask``), not the callback's attributes."""
        return sum(t.nbytes for m, _ in self._parameters_to_prune for t in [m.weight_mask])


def _optional(name: str, make: Callable[[], Callback]) -> Config | str:
    """The anchor's configuration, or why it is missing."""
    try:
        make()  # imports the library
    except ImportError as error:
        return f"{name}: not installed ({error})"
    return Config(name, lambda ctx: [make()])


def configurations() -> tuple[list[Config], list[str]]:
    """Every per-step callback of the suite (ContinualEvaluation aside: its cost is an
    evaluation every k steps, measured against the bare loop it replaces), then the anchors."""
    per_step = {
        "plain",
        "EMA",
        "PostHocEMA",
        "WARP (ema anchor)",
        "DST rigl 0.1 (no mask update)",
        "DST rigl 0.1, hold_denominators=False",
        "DST snfs 0.1 (no mask update)",
        "ScheduleRefinement",
        "DataPruningScores (online el2n)",
        "InfoBatch",
        "suite: EMA+PostHocEMA+DST+SR",
    }
    configs = [c for c in CONFIGS if c.name in per_step]
    missing = []
    anchors = [
        ("anchor: Lightning EMAWeightAveraging", _lightning_ema),
        ("anchor: torch AveragedModel (EMA, multi_avg_fn)", _averaged_model),
        ("anchor: timm ModelEmaV3", _timm),
        ("anchor: ema-pytorch EMA (update_every=1)", _ema_pytorch),
    ]
    for name, make in anchors:
        found = _optional(name, make)
        if isinstance(found, str):
            missing.append(found)
        else:
            configs.append(found)
    configs.append(
        Config("anchor: Lightning ModelPruning 0.9 (Linear)", lambda ctx: [_PrunedFromStart()])
    )
    return configs, missing


# ---------------------------------------------------------------------------- measuring


def measure(
    kind: str, size: int, configs: list[Config], args: argparse.Namespace
) -> tuple[dict[str, Measured], int]:
    build, shape, batch = model_spec(kind, size)
    torch.manual_seed(0)
    template = build()
    n_params = sum(p.numel() for p in template.parameters())
    run_fit(template, shape, batch, configs[0], args)  # warm up the process
    results = {c.name: Measured() for c in configs}
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
        for config in order:
            durations, in_hooks, held, _ = run_fit(template, shape, batch, config, args)
            entry = results[config.name]
            entry.rounds.append(durations)
            entry.hooks.append(in_hooks)
            entry.held = held
        print(f"{kind} {size}M: round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return results, n_params


def _pruning_held(kind: str, size: int) -> float:
    """ModelPruning's masks over the parameter bytes (float masks of the pruned weights)."""
    build, _, _ = model_spec(kind, size)
    module = build()
    total = sum(p.nbytes for p in module.parameters())
    masked = sum(m.weight.nbytes for m in module.modules() if type(m) is nn.Linear)
    return masked / total


def cell(m: Measured, plain: Measured, held: float) -> str:
    """step / plain [spread over rounds]; time inside the callback's per-step hooks as a share
    of the plain step (far less noisy: no training step in it); held memory."""
    ratios = [s / p for s, p in zip(m.round_means(), plain.round_means())]
    ratio = m.step_time / plain.step_time
    hooks = 100 * median(m.hooks) / plain.step_time
    return f"{ratio:.3f} [{min(ratios):.2f}-{max(ratios):.2f}]; {hooks:.1f}%; {held:.2f}x"


def merge(names: list[str], out: str) -> None:
    """One table from the tables of several runs (each too long for one 10-minute run): their
    columns side by side, rows by callback name, "-" where a run did not measure one; runs of
    the same model share its column (its plain step is then the last run's)."""
    columns: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    notes = []
    for name in names:
        text = (RESULTS / f"{name}.md").read_text()
        lines = [line for line in text.splitlines() if line.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")][1:]
        columns += [c for c in header if c not in columns]  # one model, several runs: one column
        for line in lines[2:]:
            row = [c.strip() for c in line.strip("|").split("|")]
            cells.setdefault(row[0], {}).update(zip(header, row[1:]))
        measured = next(line for line in text.splitlines() if line.startswith("Measured with"))
        machine = next(line for line in text.splitlines() if line.startswith("date "))
        settings = next(line for line in text.splitlines() if " rounds x " in line)
        command = measured[len("Measured with ") :]
        notes.append(f"- `{name}.md`: {command} {settings.split('.')[0]}; {machine}")
    rows = [[name, *(values.get(c, "-") for c in columns)] for name, values in cells.items()]
    body = (
        "Merged from the runs below (each cell: step time / plain [min-max over rounds]; time "
        "inside the callback's per-step hooks as a % of the plain step; held memory x the "
        "parameter bytes):\n\n"
        + "\n".join(notes)
        + "\n\n"
        + markdown_table(["callback(s)", *columns], rows)
    )
    command = "python -m benchmarks.bench_scaling --merge " + " ".join(names) + f" --out {out}"
    _write_result(out, "How the callbacks' cost grows with the model (issue 29)", body, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, choices=[1, 10, 100], default=[1, 10])
    parser.add_argument(
        "--models", nargs="+", choices=["mlp", "transformer"], default=["mlp", "transformer"]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per fit")
    parser.add_argument("--only", nargs="+", help="configuration names to run besides plain")
    parser.add_argument("--out", default="bench_scaling_cpu")
    parser.add_argument("--merge", nargs="+", help="result names to merge into --out, no runs")
    args = parser.parse_args()
    if args.merge:
        torch.set_num_threads(1)  # as the runs it merges (the result's machine line says so)
        merge(args.merge, args.out)
        return
    args.device = torch.device("cpu")
    torch.set_num_threads(1)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    configs, missing = configurations()
    if args.only:
        configs = [c for c in configs if c.name in ("plain", *args.only)]
    started, cpu_started = time.perf_counter(), time.process_time()
    columns: list[str] = []
    cells: dict[str, list[str]] = {c.name: [] for c in configs}
    plain_ms: list[str] = []
    for kind in args.models:
        for size in args.sizes:
            results, n_params = measure(kind, size, configs, args)
            param_bytes = 4 * n_params
            columns.append(f"{kind} {n_params / 1e6:.1f}M")
            plain = results["plain"]
            plain_ms.append(f"{plain.step_time * 1e3:.1f} ms")
            for name, m in results.items():
                held = m.held / param_bytes
                if name.startswith("anchor: Lightning ModelPruning"):
                    held = _pruning_held(kind, size)
                cells[name].append(cell(m, plain, held))
    rows = [["plain step (process CPU time)", *plain_ms]]
    rows += [[name, *values] for name, values in cells.items() if name != "plain"]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    body = (
        f"{args.rounds} rounds x (warm-up {args.warmup} + {args.steps} timed steps) per "
        f"configuration and model, configurations rotated each round, one process, 1 torch "
        f"thread, AdamW; step time = mean over step positions of the median over rounds, clock = "
        f"process CPU time. Each cell: step time / plain [min-max of the per-round ratios]; "
        f"time inside the callback's per-step hooks as a % of the plain step (median over "
        f"rounds; ModelPruning works inside forward and backward, outside any hook); "
        f"held memory x the model's parameter bytes (optimizer state and the model's own tensors "
        f"excluded; ModelPruning's float masks are module buffers, counted here by hand). "
        f"{elapsed:.0f} s wall, {cpu:.0f} s CPU. Load average (1, 5, 15 min) at the end: "
        f"{_load()}: the machine was shared with other jobs, so read the spread as the noise."
        + ("\n\nMissing anchors: " + "; ".join(missing) if missing else "")
        + "\n\n"
        + markdown_table(["callback(s)", *columns], rows)
    )
    command = "python -m benchmarks.bench_scaling " + " ".join(sys.argv[1:])
    _write_result(
        args.out, "How the callbacks' cost grows with the model (issue 29)", body, command.strip()
    )


if __name__ == "__main__":
    main()
