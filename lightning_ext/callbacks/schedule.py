"""ScheduleRefinement: record gradient norms, refine the LR schedule, apply a stored one.

Defazio et al. (2023): the per-step gradient norms of one run give a better schedule for the next.
The callback records the norm of the gradient the optimizer actually steps with (in
``on_before_optimizer_step``: after AMP unscaling, after accumulation, after the DDP all-reduce,
before clipping), writes the refined schedule, its diagnostics and a plot at fit end, and in
drop-in mode drives the learning rate of an unchanged module from a stored schedule. Either way
it warns, with figures, when the schedule is degenerate.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_ext._lightning import run_dir, skipped_epoch_end, stepping_batches
from lightning_ext.averaging import local_shard
from lightning_ext.callbacks._steps import ExactResume
from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.schedule import (
    REFERENCE_WINDOW,
    combine_norm_parts,
    curve_shortfall,
    curve_value_at,
    refine_schedule,
    resample_schedule,
    schedule_diagnostics,
)
from lightning_ext.io.schedule import (
    DEFAULT_OPTIONS,
    GRAD_NORMS_FILE,
    PAPER_OPTIONS,
    PLOT_FILE,
    SCHEDULE_FILE,
    behind_warning,
    degenerate_warning,
    load_curve,
    load_grad_norms,
    load_schedule,
    write_grad_norms,
    write_refined_schedule,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "PAPER_OPTIONS",
    "ScheduleRefinement",
    "load_grad_norms",
    "write_refined_schedule",
]

#: The drop-in run warns when its monitored value falls behind the recorded run's at matched
#: progress by more than this fraction, from ``WATCH_FROM`` of the run on: chosen for val_loss
#: on the tuning half of benchmarks/bench_schedule_battery.py (val accuracy: 0.1 from 0.3;
#: docs/schedule_refinement.md). Earlier in a run, schedules differ by design.
BEHIND_MARGIN = 0.05
WATCH_FROM = 0.9

_ADAM_LIKE = ("adam", "adagrad", "adadelta", "rmsprop", "adafactor", "lamb", "lion")
#: Strategies whose gradients are shards the callback cannot sum across ranks (FSDP1's flat
#: parameters, DeepSpeed's partitions). ModelParallelStrategy (FSDP2's DTensors) is supported.
_REFUSED_SHARDED = ("FSDP", "DeepSpeed")


def norm_for_optimizer(optimizer: Optimizer) -> Literal["l1", "l2"]:
    """l1 for Adam-type (coordinate-wise adaptive) optimizers, l2 for SGD-like ones (the paper).

    Args:
        optimizer: the optimizer; judged by its class name (Adam, AdamW, ... are Adam-type).

    Returns:
        ``"l1"`` or ``"l2"``: the gradient norm whose schedule the refinement derives.

    Examples:
        >>> import torch
        >>> params = [torch.nn.Parameter(torch.zeros(1))]
        >>> [norm_for_optimizer(opt(params)) for opt in (torch.optim.AdamW, torch.optim.SGD)]
        ['l1', 'l2']
    """
    name = type(optimizer).__name__.lower()
    return "l1" if any(key in name for key in _ADAM_LIKE) else "l2"


def replica_count(param: Tensor) -> int:
    """On how many ranks the same local values of a DTensor live (its Replicate mesh dims, as in
    HSDP): their partial norms are counted once by weighting each rank's by 1 / this.

    Args:
        param: a DTensor or a plain tensor.

    Returns:
        The product of the sizes of its replicated mesh dimensions; 1 for a plain tensor.
    """
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:  # a plain tensor: this rank's values only
        return 1
    count = 1
    for dim, placement in enumerate(param.placements):  # type: ignore[attr-defined]
        if placement.is_replicate():
            count *= mesh.size(dim)
    return count


def sharding_problem(params: list[Tensor], world_size: int) -> str | None:
    """Why the global gradient norm cannot be summed from these parameters' local shards over
    all ranks, or None when it can (every parameter a DTensor over a mesh spanning the world,
    sharded or replicated on each mesh dim).

    Args:
        params: the optimizer's parameters.
        world_size: the number of ranks in the job.

    Returns:
        The first problem found, naming the parameter, or None.
    """
    for i, p in enumerate(params):
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            return f"parameter {i} {tuple(p.shape)} is not a DTensor (not fully_shard-ed)"
        if mesh.size() != world_size:
            return f"parameter {i} lives on a {mesh.size()}-rank mesh of a {world_size}-rank job"
        placements = getattr(p, "placements", ())
        if any(not (pm.is_shard() or pm.is_replicate()) for pm in placements):
            return f"parameter {i} has placements {placements} (only Shard/Replicate)"
    return None


def global_norms_from_shards(parts: Tensor, shares: Tensor, norm: Literal["l1", "l2"]) -> Tensor:
    """Global step norms from each rank's per-tensor norms of its shards (rows: steps, columns:
    tensors): the local sums of squares (l2) or of l1 norms, summed over ranks in ONE all_reduce
    for all rows, then the square root for l2. A non-finite part stays non-finite.

    Args:
        parts: ``(steps, tensors)``, this rank's norm of each tensor's local shard.
        shares: ``(tensors,)``, each tensor's weight, ``1 / replica_count``.
        norm: ``"l1"`` or ``"l2"``.

    Returns:
        ``(steps,)``, the global norms, the same on every rank. Outside a process group: this
        rank's.
    """
    import torch.distributed as dist

    power = parts.square() if norm == "l2" else parts
    sums = (power * shares).sum(dim=-1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums.sqrt() if norm == "l2" else sums


class _NormRecorder:
    """The gradient norm of one optimizer's parameters at every step, with no host sync and no
    allocation per step beyond the norm kernels' outputs.

    Each step writes partial norms into one row of a preallocated ``(CHUNK, n_parts)`` device
    buffer. Rows are reduced to step norms and copied to the host in one go when the buffer is
    full or when the values are read (logging every ``log_every_n_steps``, checkpoints, fit end).
    On accelerators the partial norms are per tensor (one fused ``_foreach_norm`` per
    device/dtype group, ``stack(out=...)``). On the CPU, where ``_foreach_norm`` is one kernel
    per tensor, float32 groups of up to ``FLAT_LIMIT`` elements are copied into a preallocated
    flat buffer and normed in one kernel: measured 2.3x cheaper on a small transformer, where
    per-kernel overhead dominates. Past about a million elements the copy costs more than it
    saves (a 3.4M-parameter transformer: 7.1 ms against 5.1 ms per step in the hook, and a full
    gradient-sized buffer held), so larger groups take the per-tensor path.

    l1 norms on the CPU avoid torch's l1 norm kernel, which is not vectorised (``_foreach_norm``
    and ``vector_norm`` with ``ord=1`` ran at 2.9x the bandwidth bound, 2.2x the l2 kernel):
    a flat group is ``abs_`` then summed in its own buffer; a larger group packs its small
    tensors into one buffer (``_AbsSums``) and writes each large one's ``abs`` through a scratch
    buffer small enough to stay in the cache, summed with torch's vectorised ``sum``. Same value
    (closer to a float64 sum than the l1 kernel's sequential accumulation), a third of the time.

    Sharded (FSDP2): the columns are the norms of each rank's local shards, and reading them is a
    collective (``global_norms_from_shards``: one all_reduce per chunk of steps).
    """

    CHUNK = 256
    FLAT_LIMIT = 1 << 20

    def __init__(
        self,
        optimizer: Optimizer,
        norm: Literal["l1", "l2"],
        history: Tensor | None,
        sharded: bool = False,
    ):
        self.norm, self.order = norm, (2 if norm == "l2" else 1)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.sharded = sharded
        #: per column, the share of its partial sum that is this rank's (1 / replica count)
        self._shares: Tensor | None = None
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            groups[(p.device, p.dtype)].append(p)
        self._groups: list[tuple[list[Tensor], slice, Tensor, torch.dtype | None]] = []
        self._flat_groups: list[tuple[list[Tensor], int, Tensor]] = []
        self._abs_groups: list[_AbsSums] = []
        start = 0
        for (device, dtype), members in groups.items():
            zero = torch.zeros((), dtype=dtype, device=device)  # stands in for a missing grad
            size = sum(p.numel() for p in members)
            flat_ok = not sharded and device.type == "cpu" and dtype == torch.float32
            if flat_ok and size <= self.FLAT_LIMIT:
                flat = torch.empty(size, dtype=dtype, device=device)
                self._flat_groups.append((members, start, flat))
                start += 1
                continue
            if flat_ok and norm == "l1":
                self._abs_groups.append(_AbsSums(members, start))
                start = self._abs_groups[-1].stop
                continue
            low = dtype in (torch.float16, torch.bfloat16)  # norms of half grads in float32
            cols = slice(start, start + len(members))
            self._groups.append((members, cols, zero, torch.float32 if low else None))
            start += len(members)
        device = params[0].device if params else torch.device("cpu")
        self._rows = torch.empty(self.CHUNK, max(start, 1), dtype=torch.float32, device=device)
        if sharded:  # no flat groups: one column per parameter, in group order
            ordered = [p for members, _, _, _ in self._groups for p in members]
            shares = [1.0 / replica_count(p) for p in ordered] or [0.0]
            self._shares = torch.tensor(shares, dtype=torch.float32, device=device)
        self._filled = 0
        self._host: list[Tensor] = [] if history is None else [history.detach().float().cpu()]

    def record(self) -> None:
        if self._filled == self.CHUNK:
            self._move_to_host()
        row = self._rows[self._filled]
        for params, col, flat in self._flat_groups:
            views = [p.grad.reshape(-1) for p in params if p.grad is not None]
            if len(views) < len(params):  # a missing gradient counts as zeros (rare)
                views = [torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                         for p in params]  # fmt: skip
            torch.cat(views, out=flat)
            if self.order == 1:  # the flat buffer is ours: abs in place, vectorised sum
                torch.sum(flat.abs_(), 0, out=row[col])
            else:
                torch.linalg.vector_norm(flat, 2, out=row[col])
        for group in self._abs_groups:
            group.write(row)
        for params, cols, zero, dtype in self._groups:
            grads = [zero if p.grad is None else local_shard(p.grad) for p in params]
            parts = torch._foreach_norm(grads, self.order, dtype=dtype)
            if parts[0].device == row.device:
                torch.stack(parts, out=row[cols])
            else:
                row[cols].copy_(torch.stack(parts), non_blocking=True)
        self._filled += 1

    def _move_to_host(self) -> None:
        """Reduce the pending rows to step norms on the host. Sharded: a collective (one
        all_reduce for the whole chunk), so every rank must call it at the same step."""
        if self._filled:
            rows = self._rows[: self._filled]
            if self._shares is None:
                norms = combine_norm_parts(rows, self.norm)
            else:
                norms = global_norms_from_shards(rows, self._shares, self.norm)
            self._host.append(norms.cpu())
            self._filled = 0

    def reduced_values(self) -> Tensor:
        """The norms already reduced to the host, without a collective (for error paths, where
        the other ranks may not be there to join one)."""
        if not self._host:
            return torch.empty(0, dtype=torch.float32)
        return torch.cat(self._host).clone()

    @property
    def count(self) -> int:
        return sum(h.numel() for h in self._host) + self._filled

    def values(self) -> Tensor:
        """Every recorded norm on the CPU (a host sync: for logging, checkpoints and fit end)."""
        self._move_to_host()
        if len(self._host) > 1:
            self._host = [torch.cat(self._host)]
        return self._host[0].clone() if self._host else torch.empty(0, dtype=torch.float32)


class _AbsSums:
    """Partial l1 norms of float32 CPU gradients into consecutive columns of a row: the small
    tensors packed into one buffer (one column), each large one's ``abs`` written through a
    scratch buffer of at most ``PIECE`` elements (one column per piece), each summed by torch's
    vectorised ``sum``: two kernel calls per piece into views made once, no allocation per step.
    No ``reshape`` per step where none is needed (a 1-D gradient joins the packed buffer as it is,
    a one-piece gradient's ``abs`` goes into a scratch view of its own shape): on the 208 tensors
    of the 3.4M-parameter transformer those Python calls were a sixth of the recording."""

    SMALL = 4096
    PIECE = 1 << 16  # 256 KB of float32: stays in a core's L2 cache between abs and sum

    def __init__(self, params: list[Tensor], start: int) -> None:
        self.small = [p for p in params if p.numel() < self.SMALL]
        self.flat_small = [p.dim() == 1 for p in self.small]  # joins the cat as it is
        self.packed = torch.empty(sum(p.numel() for p in self.small), dtype=torch.float32)
        large = [p for p in params if p.numel() >= self.SMALL]
        biggest = max((p.numel() for p in large), default=0)
        self.scratch = torch.empty(min(biggest, self.PIECE), dtype=torch.float32)
        bounds = [[(a, min(a + self.PIECE, p.numel())) for a in range(0, p.numel(), self.PIECE)]
                  for p in large]  # fmt: skip
        self.parts = torch.empty(1 + sum(len(b) for b in bounds), dtype=torch.float32)
        self.start, self.stop = start, start + self.parts.numel()
        # per one-piece tensor: (param, scratch view of its shape, the same flat, out)
        self.whole: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        # per larger tensor: (param, [(start, stop, scratch view, out)])
        self.large: list[tuple[Tensor, list[tuple[int, int, Tensor, Tensor]]]] = []
        col = 1
        for p, pieces in zip(large, bounds):
            if len(pieces) == 1:
                flat = self.scratch[: p.numel()]
                self.whole.append((p, flat.view(p.shape), flat, self.parts[col]))
                col += 1
                continue
            views = []
            for a, b in pieces:
                views.append((a, b, self.scratch[: b - a], self.parts[col]))
                col += 1
            self.large.append((p, views))

    def write(self, row: Tensor) -> None:
        """Write this group's partial l1 norms into ``row[start:stop]`` (sum them for the norm).
        A missing gradient counts as zeros."""
        parts = self.parts
        if self.small:
            grads = [p.grad for p in self.small]
            if all(g is not None for g in grads):
                views = [g if one else g.reshape(-1)  # type: ignore[union-attr]
                         for g, one in zip(grads, self.flat_small)]  # fmt: skip
            else:  # a missing gradient counts as zeros (rare)
                views = [torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                         for p in self.small]  # fmt: skip
            torch.cat(views, out=self.packed)  # type: ignore[arg-type]
            torch.sum(self.packed.abs_(), 0, out=parts[0])
        else:
            parts[0].zero_()
        for p, shaped, flat, out in self.whole:
            if p.grad is None:
                out.zero_()
                continue
            torch.abs(p.grad, out=shaped)
            torch.sum(flat, 0, out=out)
        for p, pieces in self.large:
            grad = p.grad
            if grad is None:
                for _, _, _, out in pieces:
                    out.zero_()
                continue
            whole = grad.reshape(-1)
            for a, b, part, out in pieces:
                torch.abs(whole[a:b], out=part)
                torch.sum(part, 0, out=out)
        row[self.start : self.stop].copy_(parts)


class ScheduleRefinement(ExactResume):
    """Record per-step gradient norms, refine the LR schedule at fit end, apply a stored schedule.

    Args:
        norm: ``"l2"`` (SGD-like), ``"l1"`` (Adam-like), or ``"auto"`` to choose per optimizer.
        smoothing: ``"reference"``: the reference code's median filter (``window`` steps at the
            record's resolution; records under 10,000 steps are first interpolated to 10,000
            points, so it spans 10% of the run); a float: a window of that fraction of the run;
            0: none.
        window: the median window in steps for ``smoothing="reference"`` (odd; reference: 1001).
        power: exponent p of the weights w = G^-p (None: the paper's 2 for l2, 1 for l1).
        exclude_initial: leading fraction of the run whose norms (an initial transient or warm-up)
            are replaced by the first norm after it.
        floor: the schedule never falls below this fraction of linear decay.
        blend: mix this fraction of linear decay into the refined schedule.
        record: record norms and write ``grad_norms.pt``, ``refined_schedule.pt`` (+ ``.json``
            diagnostics) and a plot.
        output_dir: where those files go (default: ``run_dir(trainer, "schedule")``, the run's own
            versioned folder).
        schedule_path: drop-in mode: drive every optimizer's LR from this stored schedule,
            resampled to the run, times each param group's base LR. The module's own LR schedulers
            are removed (with a warning).
        total_steps: the optimizer steps the stored schedule spans (default: the Trainer's
            ``estimated_stepping_batches``).
        plot: write ``refined_schedule.png`` (needs matplotlib).
        monitor: the validation metric whose curve a recording run keeps in its files (at each
            validation, against progress = optimizer steps done / ``total_steps``), so that a
            drop-in run can compare itself against it.
        mode: ``"min"`` (``monitor`` is a loss) or ``"max"``.
        behind_margin: a run given a recorded curve (drop-in, or ``reference_path``) warns, once,
            when its ``monitor`` falls behind the recorded one at matched progress by more than
            this fraction of the recorded value.
        watch_from: ... from this fraction of the run on (earlier, schedules differ by design).
        reference_path: the record (a schedule file or ``grad_norms.pt``) whose validation curve
            this run is compared against; default ``schedule_path``. Set it to watch a run whose
            LR comes from ``StoredScheduleLR``.

    Logs ``schedule/grad_norm`` and (drop-in) ``schedule/lr_scale`` per optimizer step to the
    Trainer's loggers every ``log_every_n_steps`` steps, and the diagnostics plus the plot at fit
    end. Warns with figures when the refined or the applied schedule is degenerate. Given a
    recorded curve, logs ``schedule/recorded_<monitor>`` and ``schedule/behind`` at each
    validation and warns with figures when the run falls behind.

    Raises:
        ValueError: an unknown ``norm`` or ``mode``, ``total_steps`` below 2, ``behind_margin``
            or ``watch_from`` out of range, or ``record=False`` without a ``schedule_path`` or
            ``reference_path`` (the callback would do nothing).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import ScheduleRefinement
        >>> refine = ScheduleRefinement()  # record the norms, write the refined schedule
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[refine], logger=False)

        A second run then follows the refined schedule:
        ``ScheduleRefinement(record=False, schedule_path=".../refined_schedule.pt")``.
    """

    def __init__(
        self,
        norm: Literal["auto", "l1", "l2"] = "auto",
        smoothing: float | Literal["reference"] = "reference",
        window: int = REFERENCE_WINDOW,
        power: float | None = DEFAULT_OPTIONS["power"],
        exclude_initial: float = DEFAULT_OPTIONS["exclude_initial"],
        floor: float = DEFAULT_OPTIONS["floor"],
        blend: float = DEFAULT_OPTIONS["blend"],
        record: bool = True,
        output_dir: str | None = None,
        schedule_path: str | None = None,
        total_steps: int | None = None,
        plot: bool = True,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        behind_margin: float = BEHIND_MARGIN,
        watch_from: float = WATCH_FROM,
        reference_path: str | None = None,
    ) -> None:
        if norm not in ("auto", "l1", "l2"):
            raise ValueError(f"norm must be 'auto', 'l1' or 'l2', got {norm!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 <= behind_margin < float("inf"):
            raise ValueError(f"behind_margin is a fraction >= 0, got {behind_margin}")
        check_unit_range("watch_from", watch_from, hint=" (a fraction of the run)")
        if total_steps is not None and total_steps < 2:
            raise ValueError(f"total_steps must be >= 2, got {total_steps}")
        if not record and schedule_path is None and reference_path is None:
            raise ValueError(
                "record=False and no schedule_path or reference_path: the callback would do nothing"
            )
        self.refine_options: dict[str, Any] = {
            "smoothing": smoothing,
            "window": window,
            "power": power,
            "exclude_initial": exclude_initial,
            "floor": floor,
            "blend": blend,
        }
        refine_schedule([1.0, 1.0], **self.refine_options)  # validates the options up front
        self.norm, self.smoothing, self.record = norm, smoothing, record
        self.output_dir, self.schedule_path = output_dir, schedule_path
        self.total_steps, self.plot = total_steps, plot
        self.monitor, self.mode = monitor, mode
        self.behind_margin, self.watch_from = behind_margin, watch_from
        self.reference_path = reference_path
        #: this run's validation curve: progress (fraction of the run) and ``monitor`` values
        self._curve: dict[str, list[float]] = {"progress": [], "values": []}
        self._reference: dict[str, Any] | None = None
        self._warned_behind = False
        self._warned_missing = False
        self._monitor_missing = False
        self._total: int | None = None
        self._stored: Tensor | None = None
        self._values: list[float] = []
        self._norms: list[Literal["l1", "l2"]] = []
        self._records: list[_NormRecorder] = []
        self._optimizers: list[Optimizer] = []
        self._sharded = False
        self._steps: list[int] = []
        self._index: dict[int, int] = {}
        self._logged_norms: list[int] = []
        self._logged_steps = 0
        self._restored: dict[str, Any] | None = None
        self._out: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(norm=self.norm, schedule_path=self.schedule_path)

    # --- set-up -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._records = []  # a new fit: a checkpoint loaded from here on waits for on_fit_start
        strategy = type(trainer.strategy).__name__
        if self.record and any(key in strategy for key in _REFUSED_SHARDED):
            raise ValueError(
                f"ScheduleRefinement records the gradient norm from each rank's local gradients, "
                f"which under {strategy} are shards: use DDP, or ModelParallelStrategy with "
                "fully_shard (FSDP2, whose shard norms it sums across ranks), or record=False to "
                "only apply a stored schedule"
            )
        if self.schedule_path is not None:
            stored = load_schedule(self.schedule_path)
            if stored.numel() < 2 or not torch.isfinite(stored).all():
                raise ValueError(
                    f"schedule {self.schedule_path!r} must hold at least 2 finite values, got "
                    f"{stored.numel()}: pass a schedule written by refine-schedule"
                )
            self._stored = stored
        reference = self.reference_path or self.schedule_path
        self._reference = None if reference is None else load_curve(reference)
        if reference is not None and self._reference is None:
            rank_zero_info(
                f"ScheduleRefinement: {reference!r} holds no validation curve of the recording "
                "run (recorded without validation, or by an older version), so this run cannot "
                "compare itself against it"
            )
        if self.record:
            # run_dir may broadcast: every rank calls it here, at the same point.
            self._out = Path(self.output_dir) if self.output_dir else run_dir(trainer, "schedule")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("ScheduleRefinement needs an optimizer from configure_optimizers")
        self._index = {id(opt): i for i, opt in enumerate(optimizers)}
        self._optimizers = list(optimizers)
        self._sharded = self.record and self._check_sharded(trainer, optimizers)
        restored, self._restored = self._restored or {}, None
        self._start_records(restored)
        if self.record:
            rank_zero_info(f"ScheduleRefinement records {', '.join(self._norms)} gradient norms")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The run's length is read once the training loader exists: read earlier, it would
        # keep a resumed run's loader from being fast-forwarded.
        total = self.total_steps or stepping_batches(trainer)
        self._total = int(total) if total != float("inf") and total >= 1 else None
        if self.record:  # a validation Lightning skips on this resume is missing from the curve
            skipped_epoch_end(trainer)
        if self._stored is not None:
            self._take_over_learning_rates(trainer, self._optimizers, self._stored)

    def _start_records(self, restored: dict[str, Any]) -> None:
        """The recorders and step counts, continuing a checkpoint's record when given one."""
        optimizers = self._optimizers
        self._norms = restored.get("norms") or [
            norm_for_optimizer(opt) if self.norm == "auto" else self.norm for opt in optimizers
        ]
        if len(self._norms) != len(optimizers):
            raise ValueError(
                f"checkpoint has {len(self._norms)} gradient-norm records for "
                f"{len(optimizers)} optimizers: resume with the same configure_optimizers"
            )
        history = restored.get("grad_norms") or [None] * len(optimizers)
        self._records = [
            _NormRecorder(opt, n, h, self._sharded)
            for opt, n, h in zip(optimizers, self._norms, history)
        ]
        self._steps = list(restored.get("steps") or [0] * len(optimizers))
        curve = restored.get("curve") or {"progress": [], "values": []}
        self._curve = {"progress": list(curve["progress"]), "values": list(curve["values"])}
        self._warned_behind = bool(restored.get("warned_behind", False))
        self._logged_norms = [r.count for r in self._records]  # resumed steps were logged before
        self._logged_steps = self._steps[0]

    def _check_sharded(self, trainer: pl.Trainer, optimizers: list[Optimizer]) -> bool:
        """Whether the gradients are FSDP2 shards (ModelParallelStrategy), whose norms are then
        summed across ranks when read; refuses parameters that cannot be summed that way."""
        if "ModelParallel" not in type(trainer.strategy).__name__:
            return False
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        problem = sharding_problem(params, trainer.world_size)
        if problem is not None:
            raise ValueError(
                f"ScheduleRefinement under {type(trainer.strategy).__name__} sums each rank's "
                f"gradient-shard norms over all ranks, but {problem}: fully_shard every module "
                "with parameters in configure_model, or record=False to only apply a schedule"
            )
        return True

    def _take_over_learning_rates(
        self, trainer: pl.Trainer, optimizers: list[Optimizer], stored: Tensor
    ) -> None:
        total = self.total_steps or stepping_batches(trainer)
        if total == float("inf") or total < 2:
            raise ValueError(
                f"cannot stretch the stored schedule over {total} steps: set total_steps= on "
                "ScheduleRefinement (or max_steps / max_epochs on the Trainer)"
            )
        applied = resample_schedule(stored, int(total))
        self._values = applied.tolist()
        found = schedule_diagnostics(applied)
        if found.problems() and self._steps[0] == 0:
            what = (
                f"ScheduleRefinement(schedule_path={self.schedule_path!r}) applies a schedule that"
            )
            rank_zero_warn(degenerate_warning(what, found.as_dict(), found.problems()))
        if trainer.lr_scheduler_configs:
            names = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs]
            rank_zero_warn(
                f"ScheduleRefinement(schedule_path={self.schedule_path!r}) drives the learning "
                f"rate, so the module's own LR scheduler(s) {names} are removed for this fit"
            )
            trainer.strategy.lr_scheduler_configs = []
        for opt in optimizers:
            for group in opt.param_groups:
                # ``initial_lr`` is where torch schedulers keep the base LR; it is restored with
                # the optimizer state on resume, so the base never drifts to a scaled value.
                group.setdefault("initial_lr", float(group["lr"]))

    # --- per step -----------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        index = self._index.get(id(optimizer))
        if index is None:
            raise ValueError(
                "ScheduleRefinement saw an optimizer that is not in trainer.optimizers"
            )
        if self.record:
            self._records[index].record()
        if self._values:
            scale = self._values[min(self._steps[index], len(self._values) - 1)]
            for group in optimizer.param_groups:
                lr = group["initial_lr"] * scale
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        self._steps[index] += 1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Lightning's connectors set this Trainer attribute at run time.
        every_n = trainer.log_every_n_steps  # type: ignore[attr-defined]
        if self._steps and self._steps[0] - self._logged_steps >= every_n:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Send every step's values since the last flush to the loggers, one row per optimizer
        step: one host copy per ``log_every_n_steps`` steps. (``pl_module.log`` every step was
        measured at 0.5-1 ms per call on CPU, costlier than the recording itself.)"""
        rows: dict[int, dict[str, float]] = defaultdict(dict)
        many = len(self._records) > 1
        if self.record and trainer.loggers:
            for i, record in enumerate(self._records):
                start, self._logged_norms[i] = self._logged_norms[i], record.count
                if record.count > start:
                    for step, value in enumerate(record.values()[start:].tolist(), start):
                        rows[step][f"schedule/grad_norm{i if many else ''}"] = value
        if self._values:
            for step in range(self._logged_steps, self._steps[0]):
                rows[step]["schedule/lr_scale"] = self._values[min(step, len(self._values) - 1)]
        self._logged_steps = self._steps[0]
        for step in sorted(rows):
            for logger in trainer.loggers:
                logger.log_metrics(rows[step], step=step)

    # --- validation curve ---------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._steps or self._total is None:
            return
        progress = self._steps[0] / self._total
        if self.record:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                self._monitor_missing = True
            else:
                self._curve["progress"].append(progress)
                self._curve["values"].append(float(value))
        if self._reference is not None:
            self._compare(trainer, progress)

    def _compare(self, trainer: pl.Trainer, progress: float) -> None:
        """Log the recorded curve beside this run's and warn, once, when this run is behind."""
        ref = self._reference
        assert ref is not None
        value = trainer.callback_metrics.get(ref["monitor"])
        if value is None:
            if not self._warned_missing:
                rank_zero_warn(
                    f"ScheduleRefinement: the record's monitor {ref['monitor']!r} is not logged "
                    f"at validation by this run (logged: {sorted(trainer.callback_metrics)}), so "
                    "it cannot compare itself against the run it was refined from: log it, or "
                    "record again with monitor= set to a metric this module logs"
                )
                self._warned_missing = True
            return
        recorded = curve_value_at(ref["progress"], ref["values"], progress)
        if recorded is None:  # before the recorded run's first validation, or after its last
            return
        behind = curve_shortfall(ref["progress"], ref["values"], progress, float(value),
                                 ref["mode"])  # fmt: skip
        assert behind is not None
        metrics = {f"schedule/recorded_{ref['monitor']}": recorded, "schedule/behind": behind}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if progress + 1e-9 >= self.watch_from and behind > self.behind_margin:
            if not self._warned_behind:
                what = f"ScheduleRefinement({self.reference_path or self.schedule_path!r})"
                rank_zero_warn(behind_warning(what, ref["monitor"], progress, float(value),
                                              recorded, behind, self.behind_margin))  # fmt: skip
            self._warned_behind = True

    def curve(self) -> dict[str, Any]:
        """This run's validation curve: ``{"monitor", "mode", "progress", "values"}``."""
        return {"monitor": self.monitor, "mode": self.mode, **{k: list(v) for k, v in
                                                               self._curve.items()}}  # fmt: skip

    # --- outputs ------------------------------------------------------------------------------

    def grad_norms(self) -> list[Tensor]:
        """The recorded norms so far, one CPU tensor per optimizer."""
        return [r.values() for r in self._records]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        self._write(trainer, refine=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._records:
            self._write(trainer, refine=False)

    def _write(self, trainer: pl.Trainer, *, refine: bool) -> None:
        if not self.record or self._out is None:
            return
        if not refine and any(r.sharded for r in self._records):
            # An exception may have struck one rank only: no collective here. The steps not yet
            # reduced across ranks (at most one chunk) are left out of grad_norms.pt.
            records = [r.reduced_values() for r in self._records]
        else:
            records = self.grad_norms()
        if not trainer.is_global_zero:
            return
        curve = self.curve() if self._curve["values"] else None
        if refine and curve is None and self._monitor_missing:
            rank_zero_warn(
                f"ScheduleRefinement: monitor={self.monitor!r} was never logged at validation "
                f"(logged: {sorted(trainer.callback_metrics)}), so the record holds no validation "
                "curve and a drop-in run cannot compare itself against this one: set monitor= to "
                "a metric the module logs in validation"
            )
        write_grad_norms(records, self._norms, self._out / GRAD_NORMS_FILE, curve=curve)
        if not refine:
            return
        if min(int(torch.isfinite(r).sum()) for r in records) < 2:
            rank_zero_warn("ScheduleRefinement: fewer than 2 finite gradient norms, no refinement")
            return
        plot = self._out / PLOT_FILE if self.plot else None
        payload = write_refined_schedule(
            records,
            self._norms,
            self._out / SCHEDULE_FILE,
            plot_path=plot,
            drop_nonfinite=True,
            overwrite=True,  # the run's own folder: a resumed run refines again
            curve=curve,
            **self.refine_options,
        )
        summary = {"schedule/recorded_steps": float(records[0].numel())}
        summary.update({f"schedule/{k}": v for k, v in payload["diagnostics"][0].items()})
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
            if plot is not None and plot.exists() and hasattr(logger, "log_image"):
                logger.log_image(key="schedule/refined", images=[str(plot)])
        rank_zero_info(f"ScheduleRefinement wrote {self._out / SCHEDULE_FILE}")

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "norms": list(self._norms),
            "grad_norms": self.grad_norms(),
            "steps": list(self._steps),
            "curve": {k: list(v) for k, v in self._curve.items()},
            "warned_behind": self._warned_behind,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._records:
            # Strategies that restore after setup (ModelParallel, FSDP, DeepSpeed) load the
            # callback state after on_fit_start, when the recorders already exist.
            self._start_records(dict(state_dict))
        else:
            self._restored = dict(state_dict)
