"""WARP stage 1: the anchor of a KL-regularised fine-tuning, kept by a callback.

The anchor is a frozen copy of the LightningModule, held by this callback (so it is not in the
module's ``parameters()`` or ``state_dict()`` and no optimizer ever sees it), always in eval mode.
Three ways to move it, for comparison:

- ``"ema"`` (WARP, Rame et al. 2024): after every optimizer step,
  ``anchor <- (1 - mu) * anchor + mu * policy`` with ``mu = 0.01``;
- ``"init"``: the frozen initialisation of the fit, the usual RLHF reference;
- ``"sync"`` (TR-DPO style, as TRL's SyncRefModelCallback): every ``tau`` optimizer steps,
  ``anchor <- alpha * policy + (1 - alpha) * anchor``.

A ``training_step`` gets the anchor's outputs in one line, with no change elsewhere::

    ref_logits = WARP.anchor(self)(tokens)   # frozen: no graph is built through the anchor

Sparse training (a callback with ``masks_by_name()``, e.g. DynamicSparseTraining): an average of
masked policies is not sparse, so after every optimizer step the anchor is re-masked with the
current masks, whatever its kind; the anchor always lies in the policy's sparse subspace.

FSDP2 (ModelParallelStrategy with ``fully_shard``): a sharded module cannot be deep-copied, so
the anchor is kept as a copy of each rank's local shards (like ``EMA``), updated shard-locally
with no communication; calling the anchor copies its shards into the module's, runs the forward
(FSDP2 gathers them as usual, a collective on every rank) and copies the policy back.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ext._masks import apply_masks_, count_outside_masks, find_mask_source, masks_for
from lightning_ext.averaging import (
    Selection,
    ShadowWeights,
    TrackedTensors,
    full_tensors,
    nonfinite_message,
    parse_dtype,
    refuse_nonfinite_parameters,
)
from lightning_ext.callbacks._steps import WhenToUpdate
from lightning_ext.functional._checks import check_unit_range

AnchorKind = Literal["ema", "init", "sync"]
# Parameters partitioned outside the module (DeepSpeed) or flattened into FSDP1's flat shards
# cannot be matched to an anchor copy; FSDP2 (ModelParallelStrategy + fully_shard) can.
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "its parameters are partitioned outside the module",
    "FSDPStrategy": "FSDP1's flat parameter shards cannot be copied into an anchor module",
}


class WARP(WhenToUpdate):
    """Keep the KL anchor of a fine-tuning: an EMA of the policy, its initialisation, or a
    periodically synchronised copy.

    Args:
        anchor: ``"ema"`` (WARP's exponential moving average), ``"init"`` (frozen at the start of
            the fit) or ``"sync"`` (TR-DPO-style periodic soft update).
        mu: EMA rate of the ``"ema"`` anchor: weight of the current policy in each update.
        alpha: weight of the policy in each ``"sync"`` update (1 copies the policy: a hard sync).
        tau: optimizer steps between ``"sync"`` updates.
        include: keep an anchor copy only of the tensors whose names match one of these
            shell-style patterns (None: all).
        exclude: keep no anchor copy of the tensors whose names match one of these patterns.
        trainable_only: keep no anchor copy of frozen parameters (``requires_grad=False``): a
            LoRA or partially frozen policy shares its frozen base with the anchor instead of
            holding it twice. Tensors left out are the policy's own in the anchor (shared
            storage), which for frozen ones is exact.
        dtype: the dtype of the anchor's average (``"float32"``: an fp32 anchor of bf16 or
            fp16 weights, whose small ``mu`` steps those dtypes round away, as EMA's
            ``dtype``); None: each weight's own. The anchor's forward runs in the module's
            dtypes, on a cast copy refreshed after every update; ``anchor_state_dict`` and
            checkpoints keep the average in ``dtype``.

    When the anchor moves is one overridable method, ``should_update(step_idx, epoch_idx)``
    (Lightning's ``WeightAveraging`` protocol, asked after every optimizer step and at every
    epoch end; default: every step for ``"ema"``, every ``tau``-th for ``"sync"``). Each update
    moves it by ``mu`` (``"ema"``) or ``alpha`` (``"sync"``); an ``"init"`` anchor never moves.

    Logged (every ``log_every_n_steps``): ``warp/anchor_distance``, the L2 distance between the
    policy's and the anchor's weights, and ``warp/anchor_updates``. The KL itself depends on the
    task, so the module computes and logs it from ``WARP.anchor(self)(...)``. When the model is
    trained sparse, a rank-zero info line at the start and at the end of training says how many
    anchor weights were re-zeroed outside the masks.

    Raises:
        ValueError: an unknown ``anchor``, ``mu`` or ``alpha`` outside (0, 1], or ``tau`` not a
            positive integer.
        RuntimeError: at setup, under DeepSpeed or FSDPStrategy (FSDP1): use DDP or
            ModelParallelStrategy with ``fully_shard`` (FSDP2).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import WARP
        >>> warp = WARP(anchor="ema", mu=0.01)
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[warp], logger=False)

        In the module's ``training_step``: ``reference = WARP.anchor(self)(batch)``, then a KL
        between the policy's and the reference's outputs.
    """

    def __init__(
        self,
        anchor: AnchorKind = "ema",
        mu: float = 0.01,
        alpha: float = 0.6,
        tau: int = 512,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        trainable_only: bool = False,
        dtype: str | None = None,
    ) -> None:
        if anchor not in ("ema", "init", "sync"):
            raise ValueError(f"anchor must be 'ema', 'init' or 'sync', got {anchor!r}")
        check_unit_range("mu", mu, low_open=True, hint=" (WARP uses 0.01)")
        check_unit_range("alpha", alpha, low_open=True)
        if int(tau) != tau or tau < 1:
            raise ValueError(f"tau must be a positive number of optimizer steps, got {tau}")
        self.selection = Selection.of(include, exclude, trainable_only)
        self.dtype = parse_dtype(dtype, "WARP")
        self.kind: AnchorKind = anchor
        self.mu, self.alpha, self.tau = float(mu), float(alpha), int(tau)
        self.updates = 0
        self.rezeroed = 0  # anchor weights zeroed outside the sparse masks in this fit, all ranks
        self._anchor: nn.Module | None = None
        self._shadow: ShadowWeights | None = None  # the anchor's tensors (local shards: FSDP2)
        self._mask_source: Any = None
        self._rezeroed_now: Tensor | None = None  # this fit's count, summed without host syncs
        self._pending_state: dict[str, Any] | None = None
        # (the anchor module's tensor, its shadow) where dtype makes them differ: the forward
        # runs on a cast copy of the shadow, refreshed by _refresh_cast
        self._cast: list[tuple[Tensor, Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(anchor=self.kind)

    # -- the public accessor ---------------------------------------------------------------
    @staticmethod
    def anchor(pl_module: pl.LightningModule) -> nn.Module:
        """The frozen anchor of ``pl_module``'s current fit: call it like the module itself.

        Under FSDP2 every call is a collective (the module's forward gathers the shards): call
        it on every rank, in the same order, as the policy's own forward.
        """
        trainer = pl_module._trainer
        # Lightning's connectors set this Trainer attribute at run time.
        callbacks = trainer.callbacks if trainer else []  # type: ignore[attr-defined]
        found = [cb for cb in callbacks if isinstance(cb, WARP)]
        if len(found) != 1:
            raise RuntimeError(
                f"WARP.anchor needs exactly one lightning_ext.callbacks.WARP among the Trainer's "
                f"callbacks, found {len(found)}: add WARP() to Trainer(callbacks=[...])"
            )
        if found[0]._anchor is None:
            raise RuntimeError("the WARP anchor exists from on_fit_start on: call it during fit")
        return found[0]._anchor

    @property
    def anchor_module(self) -> nn.Module | None:
        """The anchor held by this callback (None before the fit starts). Under FSDP2 it holds
        no weights of its own: use ``anchor_state_dict()`` to read them."""
        return self._anchor

    @property
    def sharded(self) -> bool:
        """Whether the anchor holds local shards of FSDP2 (DTensor) parameters."""
        return self._shadow is not None and bool(self._shadow.tracked.sharded)

    def anchor_state_dict(self) -> dict[str, Tensor]:
        """The anchor's weights as full tensors, by parameter and buffer name (detached copies).

        Under FSDP2 this gathers the shards: call it on every rank.
        """
        if self._shadow is None:
            raise RuntimeError("the WARP anchor exists from on_fit_start on: call it after fit")
        left_out = full_tensors(self._shadow.tracked.untracked)  # the policy's own tensors
        full = {**left_out, **self._shadow.full_state_dict()}
        return {k: v.detach().clone() for k, v in full.items()}

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        name = type(trainer.strategy).__name__
        if name in _REFUSED_STRATEGIES:
            raise RuntimeError(
                f"WARP does not support {name}: {_REFUSED_STRATEGIES[name]}. Use DDP, or "
                "ModelParallelStrategy with fully_shard (FSDP2), where the anchor is shard-local."
            )
        if stage == "fit" and self.kind == "sync" and self.tau > trainer.max_steps > 0:
            raise ValueError(
                f"tau={self.tau} exceeds max_steps={trainer.max_steps}: the 'sync' anchor would "
                "never move; lower tau or use anchor='init'"
            )
        self._mask_source = find_mask_source(trainer.callbacks)  # type: ignore[attr-defined]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build_anchor(pl_module)
        self.updates = 0
        self.rezeroed = 0
        self._rezeroed_now = None
        if self._pending_state is not None:  # load_state_dict came first
            self._apply_state(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # an epoch end skipped by the resume
        # From here on the sparse-training masks are in place (and restored on resume, which
        # ModelParallelStrategy does after on_fit_start): the anchor, a copy of the module taken
        # at fit start, may predate them.
        masks = self._mask_anchor()
        if masks:
            zeroed = self._take_rezeroed(trainer)
            rank_zero_info(
                f"WARP: the model is trained sparse ({type(self._mask_source).__name__}, "
                f"{len(masks)} tensors): the {self.kind!r} anchor keeps its current masks, "
                f"re-applied after every optimizer step; {zeroed} anchor weights re-zeroed at "
                "the start of training."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._shadow is not None and self.kind != "init":
            message = nonfinite_message(
                self._shadow.averaged_state(), "WARP: the anchor", across_ranks=self.sharded
            )
            if message:
                rank_zero_warn(message)
        if self._rezeroed_now is not None:
            zeroed = self._take_rezeroed(trainer)
            rank_zero_info(
                f"WARP: {zeroed} anchor weights re-zeroed outside the sparse-training masks "
                f"during training ({self.rezeroed} in this fit, {self.updates} anchor updates)."
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self._anchor, _ShardedAnchor):
            self._anchor.release()  # the swap buffers; the shadow stays for inspection

    def _build_anchor(self, pl_module: pl.LightningModule) -> None:
        refuse_nonfinite_parameters(pl_module, "WARP")
        # buffers: averages_buffer decides; tensors the selection leaves out are not copied
        tracked = TrackedTensors.from_module(pl_module, selection=self.selection, who="WARP")
        shadow = ShadowWeights(tracked, background=False, dtype=self.dtype)
        self._cast = []
        if tracked.sharded:  # FSDP2 forbids deepcopy: swap the shards in for each anchor call
            self._anchor = _ShardedAnchor(pl_module, shadow)
        else:
            anchor = copy.deepcopy(pl_module)  # LightningModule.__getstate__ drops the trainer
            anchor.requires_grad_(False)
            anchor.eval()
            mine = dict(anchor.named_parameters()) | dict(anchor.named_buffers())
            for name, tensor in zip(shadow.tracked.names, shadow.tensors):
                mine[name].grad = None  # a module fitted before may carry gradients
                if tensor.dtype != mine[name].dtype:  # dtype: the forward runs on a cast copy
                    self._cast.append((mine[name].data, tensor))
                    continue
                # one storage for the update and the forward: the anchor's tensors *are* the
                # shadow (which also frees the deep copy's own storage)
                mine[name].data = tensor
            for name, live in tracked.untracked.items():  # left out: the policy's own storage
                mine[name].data = live.data
                mine[name].grad = None
            self._anchor = anchor
        self._shadow = shadow
        self._refresh_cast()  # a narrower dtype than the module's rounds the anchor too

    # -- updates ---------------------------------------------------------------------------
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every optimizer step (``"ema"``), every ``tau``-th (``"sync"``), never
        (``"init"``); never at an epoch's end. Override it to choose other moments.

        Args:
            step_idx: the zero-based index of the optimizer step just taken
                (``trainer.global_step - 1``), or None at an epoch's end.
            epoch_idx: the zero-based index of the epoch just ended, or None after a step.

        Returns:
            True to move the anchor towards the policy now.
        """
        if step_idx is None or self.kind == "init":
            return False
        return self.kind == "ema" or (step_idx + 1) % self.tau == 0

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.kind == "init":
            raise ValueError(
                "WARP(anchor='init') is frozen, but should_update asked it to move: use "
                "anchor='ema' (moves by mu) or anchor='sync' (moves by alpha)"
            )
        self._move_towards_policy(self.mu if self.kind == "ema" else self.alpha)

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        super().on_optimizer_step_done(trainer, pl_module)  # should_update decides
        self._mask_anchor()  # every kind: the masks may have moved (RigL, SET)
        # Lightning's connectors set this Trainer attribute at run time.
        if step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            distance = self._distance(trainer)
            pl_module.log("warp/anchor_distance", distance, on_step=True, on_epoch=False)
            pl_module.log("warp/anchor_updates", float(self.updates), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _move_towards_policy(self, weight: float) -> None:
        assert self._shadow is not None
        self._shadow.update_(1.0 - weight)  # anchor <- (1 - w) anchor + w policy; ints copied
        self.updates += 1
        self._refresh_cast()

    @torch.no_grad()
    def _refresh_cast(self) -> None:
        """The forward's cast copy of the shadow (``dtype``), after the shadow changed."""
        if self._cast:
            for anchor, shadow in self._cast:
                anchor.copy_(shadow)

    def _mask_anchor(self) -> dict[str, Tensor]:
        """Zero the anchor outside the current sparse-training masks (local shards under
        FSDP2, like the masks), counting the weights that were not zero yet."""
        if self._mask_source is None or self._shadow is None:
            return {}
        masks = masks_for(self._mask_source, self._shadow.tracked.averaged_names)
        if masks:
            state = self._shadow.state_dict()
            count = count_outside_masks(state, masks)
            previous = self._rezeroed_now
            self._rezeroed_now = count if previous is None else previous + count.to(previous)
            apply_masks_(state, masks)
            self._refresh_cast()
        return masks

    def _take_rezeroed(self, trainer: pl.Trainer) -> int:
        """The weights re-zeroed since the last call, summed over ranks (a collective when
        sharded: every rank holds other shards; under DDP the ranks agree already)."""
        count = self._rezeroed_now if self._rezeroed_now is not None else torch.zeros(())
        if self.sharded:
            count = trainer.strategy.reduce(count, reduce_op="sum")
        self._rezeroed_now = torch.zeros_like(count)
        value = int(count)
        self.rezeroed += value
        return value

    @torch.no_grad()
    def _distance(self, trainer: pl.Trainer) -> Tensor:
        """The L2 distance between policy and anchor (whole tensors: summed over shards)."""
        assert self._shadow is not None
        tracked = self._shadow.tracked
        diffs = [
            (live.detach().float() - anchor.float()).pow(2).sum()
            for live, anchor in zip(tracked.averaged, self._shadow.averaged)
        ]
        if not diffs:
            return torch.zeros(())
        total = torch.stack([d.to(diffs[0].device) for d in diffs]).sum()
        if self.sharded:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return total.sqrt()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._anchor is None or self._shadow is None:
            anchor = None
        elif self._saves_shadow:
            # full tensors (rank 0 writes the callback state for every rank), and only the
            # tracked ones: what a selection leaves out is the policy's, saved with the model;
            # in dtype (the anchor module holds a cast copy)
            anchor = self._shadow.full_state_dict()
        else:
            anchor = self._anchor.state_dict()
        return {
            "anchor_kind": self.kind,
            "mu": self.mu,
            "alpha": self.alpha,
            "tau": self.tau,
            "updates": self.updates,
            "last_epoch_update": self.last_epoch_update,
            "anchor": anchor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["anchor_kind"] != self.kind:
            raise ValueError(
                f"checkpoint holds a WARP anchor of kind {state_dict['anchor_kind']!r} but this "
                f"callback keeps {self.kind!r}: resume with WARP(anchor="
                f"{state_dict['anchor_kind']!r})"
            )
        if self._anchor is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    @property
    def _saves_shadow(self) -> bool:
        """The state holds the shadow's tensors (not the anchor module's state dict)."""
        assert self._shadow is not None
        return self.sharded or bool(self._shadow.tracked.untracked) or bool(self._cast)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._anchor is not None and self._shadow is not None
        saved = state["anchor"]
        if saved is not None:
            if self._saves_shadow:
                # full tensors (or another run's shards): each rank keeps its own
                names = self._shadow.tracked.names
                self._shadow.load_state_dict(
                    {n: saved[n] for n in names if n in saved}, "WARP anchor in the checkpoint"
                )
            else:
                self._anchor.load_state_dict(saved)
        self._refresh_cast()
        self.updates = int(state["updates"])
        self.last_epoch_update = int(state.get("last_epoch_update", -1))


class _ShardedAnchor(nn.Module):
    """The anchor of an FSDP2 module: the policy module run on the anchor's shards.

    A sharded module cannot be deep-copied (FSDP2 refuses), and a second sharded copy would
    need the user's ``configure_model``. Instead each call copies the policy's local shards
    aside, copies the anchor's in, runs the module in eval mode without gradients and puts
    the policy back. ``reshard()`` around the call matters: FSDP2's root keeps its gathered
    parameters after a forward (for its backward), so without it the anchor's forward would
    read the policy's gathered weights, and the policy's backward the anchor's; resharded,
    each forward and the backward gather the shards they need.
    """

    def __init__(self, module: pl.LightningModule, shadow: ShadowWeights) -> None:
        super().__init__()
        self._target = [module]  # a list: not registered as a submodule (no second state dict)
        self._shadow = shadow
        self._backup: list[Tensor] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self._target[0]
        live = self._shadow.tracked.tensors
        modes = [(sub, sub.training) for sub in module.modules()]
        with torch.no_grad():
            if self._backup is None:  # allocated once, reused by every call
                self._backup = [torch.empty_like(t) for t in live]
            torch._foreach_copy_(self._backup, live)
            _reshard(module)
            try:
                self._shadow.copy_to_live_()
                module.eval()
                return module(*args, **kwargs)
            finally:
                for sub, training in modes:
                    sub.training = training
                torch._foreach_copy_(live, self._backup)
                _reshard(module)

    def release(self) -> None:
        self._backup = None


def _reshard(module: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters, so the next use gathers the shards."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
