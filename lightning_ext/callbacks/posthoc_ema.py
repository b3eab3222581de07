"""Post-hoc EMA (Karras et al. 2024): choose the EMA length after training.

Two power-function EMAs are tracked during training and snapshotted every n steps; afterwards any
EMA profile (any ``sigma_rel``, any step up to the last snapshot) is reconstructed as the
least-squares combination of the snapshots. Nothing else in the Lightning ecosystem offers this.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ext._io import claim_file
from lightning_ext._lightning import is_wandb_logger, run_dir
from lightning_ext._masks import apply_masks_, sparse_masks_for
from lightning_ext._plot import new_figure, write_png
from lightning_ext.averaging import (
    Selection,
    ShadowWeights,
    TrackedTensors,
    nonfinite_message,
    parse_dtype,
    refuse_nonfinite_parameters,
)
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import WhenToUpdate
from lightning_ext.functional.ema import power_ema_beta, power_profile, sigma_rel_to_gamma
from lightning_ext.io.ema import (
    CLAIM_FILE,
    INDEX_FILE,
    adopt_snapshots,
    posthoc_ema_state_dict,
    snapshot_coefficients,
    write_posthoc_ema,
    write_snapshot,
)

__all__ = ["PostHocEMA", "posthoc_ema_state_dict", "write_posthoc_ema"]

PLOT_FILE = "profiles.png"
PLOT_SIGMA_RELS = (0.03, 0.07, 0.15, 0.25)


class PostHocEMA(DeclaredState, WhenToUpdate):
    """Track power-function EMAs with relative widths ``sigma_rels`` and snapshot them to disk.

    When the EMAs move is one overridable method, ``should_update(step_idx, epoch_idx)``
    (Lightning's ``WeightAveraging`` protocol; default: every ``update_every_n_steps``-th
    optimizer step). The power EMAs count updates, not steps: a snapshot's ``step`` is the
    number of updates it holds.

    Args:
        sigma_rels: relative standard deviations of the tracked profiles (paper: 0.05 and 0.10).
        snapshot_every_n_steps: write a snapshot of every profile every n EMA updates (and one at
            the end of training). More snapshots give a more accurate reconstruction.
        snapshot_dir: where snapshots go (default: ``run_dir(trainer, "posthoc_ema")``, the run's
            own versioned folder). The folder is claimed at fit start (a claim file created
            exclusively, holding the run's id): a folder of another run, even one started at the
            same instant, is refused; the same run resumed is accepted.
        update_every_n_steps: update the EMAs every n optimizer steps.
        device: where the EMAs live (``None``: beside each weight; ``"cpu"`` to offload).
        buffers: ``"average"`` the statistics buffers (BatchNorm's running mean and variance) or
            ``"copy"`` them; every other buffer (counters, constants, any buffer holding a
            non-finite value such as an additive ``-inf`` mask) is always copied, and the
            reconstruction takes its value from the last snapshot it uses.
        plot: write ``profiles.png`` (target vs reconstructed EMA profiles) at the end of fit.
        dtype: the dtype of the tracked averages and snapshots (``"float32"`` for bf16 or fp16
            weights); None: each weight's own.
        include: track only the tensors whose names match one of these shell-style patterns.
        exclude: leave out the tensors whose names match one of these patterns.
        trainable_only: leave out frozen parameters (``requires_grad=False``). Tensors left out
            are neither tracked nor written: a reconstruction holds the tracked tensors only, to
            load over the model with ``load_state_dict(..., strict=False)``.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every_n_steps: int = 500,
        snapshot_dir: str | None = None,
        update_every_n_steps: int = 1,
        device: str | None = None,
        buffers: Literal["average", "copy"] = "average",
        plot: bool = True,
        dtype: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        trainable_only: bool = False,
    ) -> None:
        super().__init__()
        if not sigma_rels:
            raise ValueError("sigma_rels must name at least one profile, e.g. (0.05, 0.10)")
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # validates each sigma_rel
        if snapshot_every_n_steps < 1 or update_every_n_steps < 1:
            raise ValueError("snapshot_every_n_steps and update_every_n_steps must be >= 1")
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_dir = snapshot_dir
        self.update_every_n_steps = update_every_n_steps
        self.device = torch.device(device) if device is not None else None
        self.buffers = buffers
        self.plot = plot
        self.dtype = parse_dtype(dtype, "PostHocEMA")
        self.selection = Selection.of(include, exclude, trainable_only)
        self.num_updates = 0
        self.snapshots: list[dict[str, Any]] = []
        self.run_id = uuid.uuid4().hex
        self._masks_announced = False
        self._nonfinite_warned = False
        self._shadows: list[ShadowWeights] = []
        self._loaded: list[dict[str, Tensor]] | None = None
        self._loaded_dir: str | None = None
        self._dir: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_rels=tuple(self.sigma_rels))

    @property
    def folder(self) -> Path | None:
        """Where this run's snapshots, index and picture go (known from ``setup`` on)."""
        return self._dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)  # one id for all ranks
        if self.snapshot_dir is not None:
            self._dir = Path(self.snapshot_dir)
        else:
            self._dir = run_dir(trainer, "posthoc_ema")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint (if any) was restored: a resumed run carries its own run_id.
        problem = self._claim_problem() if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ValueError(problem)
        self._relocate_loaded_snapshots(trainer)
        if not self._shadows:
            refuse_nonfinite_parameters(pl_module, "PostHocEMA")
            tracked = TrackedTensors.from_module(
                pl_module,
                average_buffers=self.buffers == "average",
                selection=self.selection,
                who="PostHocEMA",
            )
            _refuse_sharded(tracked)
            self._shadows = [
                ShadowWeights(tracked, self.device, dtype=self.dtype) for _ in self.gammas
            ]
        if self._loaded is not None:
            for shadow, state in zip(self._shadows, self._loaded):
                shadow.load_state_dict(state, "PostHocEMA state in the checkpoint")
            self._loaded = None

    def _claim_problem(self) -> str | None:
        """Claim the folder for this run (exclusive create of the claim file), or say why not."""
        assert self._dir is not None
        problem = self._foreign_index_problem()
        if problem:
            return problem
        try:
            owner = claim_file(self._dir / CLAIM_FILE, self.run_id)
        except OSError as err:  # returned, not raised: the other ranks wait for the answer
            return f"PostHocEMA cannot claim snapshot_dir {self._dir}: {err}"
        if owner == self.run_id:
            return None
        return (
            f"{self._dir} belongs to another PostHocEMA run ({owner}, claimed in "
            f"{self._dir / CLAIM_FILE}): two runs writing there would overwrite each other's "
            "snapshots. Give each run its own snapshot_dir (or leave snapshot_dir unset for the "
            "run's own folder), or resume that run from its checkpoint (ckpt_path=...)."
        )

    def _foreign_index_problem(self) -> str | None:
        """Why writing into the folder would clobber another run's snapshots, or None."""
        assert self._dir is not None
        index = self._dir / INDEX_FILE
        if not index.exists():
            return None
        other = json.loads(index.read_text()).get("run_id")
        if other == self.run_id:
            return None
        return (
            f"{index} belongs to another PostHocEMA run ({other or 'unknown id'}): writing here "
            "would overwrite its index and orphan its snapshots. Give a new snapshot_dir, leave "
            "snapshot_dir unset to use this run's own folder, or resume that run from its "
            "checkpoint (ckpt_path=...)."
        )

    def _relocate_loaded_snapshots(self, trainer: pl.Trainer) -> None:
        """A run resumed into a new folder brings the snapshots written before into it, so that
        its index names files of its own folder (readable from any working directory)."""
        assert self._dir is not None
        old, self._loaded_dir = self._loaded_dir, None
        if old is None or Path(old).resolve() == self._dir.resolve():
            return
        problem = None
        if trainer.is_global_zero:
            try:
                adopt_snapshots(old, self._dir, self.snapshots)
            except FileNotFoundError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise FileNotFoundError(problem)
        self.snapshots = [{**e, "file": Path(e["file"]).name} for e in self.snapshots]

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Every ``update_every_n_steps``-th optimizer step; never at an epoch's end. Override
        it to choose other moments (as Lightning's ``WeightAveraging``).

        Args:
            step_idx: the zero-based index of the optimizer step just taken
                (``trainer.global_step - 1``), or None at an epoch's end.
            epoch_idx: the zero-based index of the epoch just ended, or None after a step.

        Returns:
            True to update the tracked EMAs now.
        """
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.num_updates += 1
        for gamma, shadow in zip(self.gammas, self._shadows):
            shadow.update_(power_ema_beta(self.num_updates, gamma))
        if self.num_updates % self.snapshot_every_n_steps == 0:
            self._snapshot(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_updates and (
            not self.snapshots or self.snapshots[-1]["step"] != self.num_updates
        ):
            self._snapshot(trainer)
        if self.plot and self.snapshots and trainer.is_global_zero:
            assert self._dir is not None
            picture = plot_profiles(self.snapshots, self._dir / PLOT_FILE)
            if picture is not None:
                for logger in trainer.loggers:
                    if is_wandb_logger(logger):
                        logger.log_image(key="posthoc_ema/profiles", images=[str(picture)])  # type: ignore[attr-defined]

    def _snapshot(self, trainer: pl.Trainer) -> None:
        name = f"phema_{self.num_updates:010d}.pt"
        entry = {
            "file": name,
            "step": self.num_updates,
            "gammas": self.gammas,
            "sigma_rels": self.sigma_rels,
            "global_step": trainer.global_step,
        }
        masks = self._current_masks(trainer)
        if masks:  # the file holds the masks applied; the index says that there are some
            entry["masked"] = True
        if trainer.is_global_zero:  # ranks hold identical EMAs under DDP: write once
            assert self._dir is not None
            weights = [
                {k: v.detach().cpu().clone() for k, v in s.state_dict().items()}
                for s in self._shadows
            ]
            for profile in weights:  # the running averages stay raw: only what is written
                apply_masks_(profile, masks)
            self._warn_nonfinite(weights)
            write_snapshot(
                self._dir,
                entry,
                weights,
                masks,
                run_id=self.run_id,
                earlier=self.snapshots,
                copied=self._shadows[0].tracked.copied_names,
            )
        self.snapshots.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "posthoc_ema/snapshots": float(len(self.snapshots)),
                    "posthoc_ema/updates": float(self.num_updates),
                },
                step=trainer.global_step,
            )

    def _warn_nonfinite(self, weights: list[dict[str, Tensor]]) -> None:
        """Once per fit: a snapshot of a diverged run is NaN; name the tensors."""
        if self._nonfinite_warned:
            return
        averaged = self._shadows[0].tracked.averaged_names
        for profile in weights:
            message = nonfinite_message(
                {n: profile[n] for n in averaged},
                f"PostHocEMA: snapshot {self.num_updates} (written all the same)",
            )
            if message:
                self._nonfinite_warned = True
                rank_zero_warn(message)
                return

    def _current_masks(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The sparse-training masks of the tracked tensors (empty when not trained sparse)."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        masks = sparse_masks_for(callbacks, self._shadows[0].tracked.averaged_names)
        if masks and not self._masks_announced:
            self._masks_announced = True
            rank_zero_info(
                f"PostHocEMA: the model is trained sparse: each snapshot is written with the "
                f"current masks applied to {len(masks)} tensors (stored in the snapshot under "
                "'masks'); reconstructions re-apply the masks of the last snapshot they use."
            )
        return masks

    STATE = ("num_updates", "snapshots", "run_id", "last_epoch_update")

    def state_dict(self) -> dict[str, Any]:
        shadows = [s.state_dict() for s in self._shadows] if self._shadows else self._loaded
        return {
            **super().state_dict(),
            "gammas": self.gammas,
            "shadows": shadows,
            # absolute: a resume from another working directory finds the folder again
            "dir": str(self._dir.resolve()) if self._dir is not None else self._loaded_dir,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [round(g, 9) for g in state_dict["gammas"]] != [round(g, 9) for g in self.gammas]:
            raise ValueError(
                f"checkpoint PostHocEMA profiles (gammas {state_dict['gammas']}) differ from this "
                f"callback's {self.gammas}: construct it with the same sigma_rels to resume"
            )
        super().load_state_dict(state_dict)
        self._loaded = state_dict["shadows"]
        self._loaded_dir = state_dict.get("dir")


def plot_profiles(
    entries: list[dict[str, Any]],
    path: str | Path,
    sigma_rels: Sequence[float] = PLOT_SIGMA_RELS,
) -> Path | None:
    """One picture of what the snapshots can give: for a few ``sigma_rels``, the EMA profile
    (weight of each training step) wanted at the last snapshot, dashed, and the one the
    reconstruction achieves, solid. None (with one warning) when matplotlib is missing.

    Args:
        entries: the snapshots of ``index.json``, in step order.
        path: where to write the PNG.
        sigma_rels: the widths to draw.

    Returns:
        The path written, or None without matplotlib.
    """
    fig = new_figure(figsize=(6, 3.5))
    if fig is None:
        rank_zero_warn("matplotlib is not installed: no PostHocEMA profile plot (pip install it)")
        return None
    last = entries[-1]["step"]
    tau = torch.linspace(0, last, 400, dtype=torch.float64)[1:]
    ax = fig.subplots()
    for sigma_rel in sigma_rels:
        usable, x = snapshot_coefficients(entries, sigma_rel, last)
        gammas = [g for e in usable for g in e["gammas"]]
        steps = [float(e["step"]) for e in usable for _ in e["gammas"]]
        rebuilt = sum(
            xi * power_profile(torch.tensor(g, dtype=torch.float64), torch.tensor(t), tau)
            for xi, g, t in zip(x, gammas, steps)
        )
        wanted = power_profile(
            torch.tensor(sigma_rel_to_gamma(sigma_rel), dtype=torch.float64),
            torch.tensor(float(last), dtype=torch.float64),
            tau,
        )
        (line,) = ax.plot(tau.numpy(), rebuilt.numpy(), label=f"sigma_rel {sigma_rel}")
        ax.plot(tau.numpy(), wanted.numpy(), ls="--", color=line.get_color(), lw=0.8)
    ax.set(
        xlabel="EMA update (training step)",
        ylabel="weight of the step",
        title=f"Post-hoc EMA from {len(entries)} snapshots: wanted (dashed), rebuilt (solid)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(fig, path)


def _refuse_sharded(tracked: TrackedTensors) -> None:
    """Snapshots are written by rank 0 alone: with FSDP2 (DTensor) parameters they would hold
    rank 0's shards only."""
    if tracked.sharded:
        raise ValueError(
            "PostHocEMA does not support sharded (FSDP2 / ModelParallelStrategy) parameters: its "
            f"snapshots are written by rank 0, which holds only its shards of e.g. "
            f"{next(iter(tracked.sharded))!r}. Use EMA (sharded support, exact resume) or a DDP "
            "strategy."
        )
