"""EMA of a LightningModule's weights: evaluate on the average, train on the live weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ext._lightning import run_validation_epoch_apart
from lightning_ext._masks import find_mask_source, masks_for
from lightning_ext.averaging import (
    Selection,
    ShadowWeights,
    TrackedTensors,
    nonfinite_message,
    parse_dtype,
    refuse_nonfinite_parameters,
)
from lightning_ext.averaging import fsdp2_modules as _fsdp2_modules
from lightning_ext.averaging import reshard as _reshard
from lightning_ext.callbacks._state import DeclaredState
from lightning_ext.callbacks._steps import WhenToUpdate
from lightning_ext.functional._checks import check_unit_range
from lightning_ext.functional.ema import ema_decay_at
from lightning_ext.io.ema import (
    EMA_IN_STATE_DICT,
    LIVE_STATE_KEY,
    ema_state_dict_from_checkpoint,
    export_ema,
    masked_state,
)

__all__ = ["EMA", "ema_state_dict_from_checkpoint", "export_ema"]

WeightsChoice = Literal["ema", "live"]
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy",)
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")
_FSDP1 = "FSDPStrategy"


class EMA(DeclaredState, WhenToUpdate):
    """Keep an exponential moving average of the weights and evaluate on it.

    After every ``update_every_n_steps``-th optimizer step (from ``start_step``):
    ``ema <- d * ema + (1 - d) * theta`` with ``d = decay`` or, with ``warmup_gamma`` set, timm's
    warm-up ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``. Gradient accumulation
    gives one update per optimizer step. The EMA starts as a copy of the weights at fit start (or
    when averaging begins at ``start_step``).

    When and how fast are two overridable methods, the options being their defaults:
    ``should_update(step_idx, epoch_idx)`` (Lightning's ``WeightAveraging`` protocol: asked after
    every optimizer step and at every epoch end) and ``decay_at(num_updates)`` (timm's
    ``get_decay``). A subclass overriding them resumes exactly like the class itself.

    Args:
        decay: EMA decay in (0, 1).
        update_every_n_steps: average every n optimizer steps.
        start_step: first optimizer step that updates the EMA; the EMA is re-copied from the live
            weights there, so it never remembers weights from before it.
        warmup_gamma: decay warm-up scale (warm-up is off when None).
        warmup_power: decay warm-up exponent.
        buffers: ``"average"`` the statistics buffers (BatchNorm's running mean and variance)
            like parameters, or ``"copy"`` them from the live model. Every other buffer is always
            copied (counters, constants, any buffer holding a non-finite value such as an
            additive ``-inf`` mask): ``lightning_ext.averaging.averages_buffer``.
        device: where the EMA lives (``None``: beside each weight). ``"cpu"`` offloads a GPU
            model's EMA; the host-side averaging then runs in a background thread.
        validate_on: weights used by validation; ``"both"`` validates the EMA under the module's
            own metric names, then runs a second, complete validation epoch on the live weights
            whose metrics get ``live_suffix``.
        live_suffix: appended to the live validation's metric names with ``validate_on="both"``
            (``val_loss`` becomes ``val_loss_live``), so checkpointing and early stopping can
            monitor either.
        test_on: weights used by ``trainer.test``.
        predict_on: weights used by ``trainer.predict``.
        checkpoint_weights: weights in a checkpoint's ``state_dict`` (what ``load_from_checkpoint``
            gives). ``"ema"`` puts the EMA there and the live weights under
            ``current_model_state`` (Lightning's WeightAveraging layout); ``"live"`` keeps the
            live weights there. Default: the weights validation judges (``"live"`` only with
            ``validate_on="live"``), and ``"live"`` under sharded strategies (FSDP,
            ModelParallelStrategy), whose checkpoints hold sharded weights: the full EMA is then
            in the callback state. Resuming is exact either way.
        apply_on_fit_end: copy the EMA into the module when fit ends.
        log_decay: log ``ema/decay`` when it changes (every logging interval during warm-up,
            once otherwise).
        dtype: the dtype of the average (``"float32"``: an fp32 average of bf16 or fp16 weights,
            as timm's ModelEmaV3; None: each weight's own). The EMA is cast to the module's
            dtypes when swapped in or applied; ``ema_state_dict`` and checkpoints keep it in
            ``dtype``.
        include: average only the tensors whose names match one of these shell-style patterns
            (``"model.head.*"``); None: all.
        exclude: leave out the tensors whose names match one of these patterns.
        trainable_only: leave out frozen parameters (``requires_grad=False``): a LoRA or
            partially frozen model keeps no copy of its frozen base. Tensors left out are not
            copied; the EMA uses the live ones (``ema_state_dict`` holds them too).
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        warmup_gamma: float | None = None,
        warmup_power: float = 2.0 / 3.0,
        buffers: Literal["average", "copy"] = "average",
        device: str | None = None,
        validate_on: Literal["ema", "live", "both"] = "ema",
        test_on: WeightsChoice = "ema",
        predict_on: WeightsChoice = "ema",
        checkpoint_weights: WeightsChoice | None = None,
        live_suffix: str = "_live",
        apply_on_fit_end: bool = True,
        log_decay: bool = True,
        dtype: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        trainable_only: bool = False,
    ) -> None:
        super().__init__()
        check_unit_range(
            "EMA decay", decay, low_open=True, high_open=True, hint="; typical values: 0.99-0.9999"
        )
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if warmup_gamma is not None and warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0 (or None to disable), got {warmup_gamma}")
        if warmup_power <= 0:
            raise ValueError(f"warmup_power must be > 0, got {warmup_power}")
        _check_choice("buffers", buffers, ("average", "copy"))
        _check_choice("validate_on", validate_on, ("ema", "live", "both"))
        _check_choice("test_on", test_on, ("ema", "live"))
        _check_choice("predict_on", predict_on, ("ema", "live"))
        if checkpoint_weights is not None:
            _check_choice("checkpoint_weights", checkpoint_weights, ("ema", "live"))
        if validate_on == "both" and not live_suffix:
            raise ValueError(
                "validate_on='both' needs a non-empty live_suffix to tell metrics apart"
            )
        self.device = _parse_device(device)
        self.dtype = parse_dtype(dtype, "EMA")
        self.selection = Selection.of(include, exclude, trainable_only)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.buffers = buffers
        self.validate_on = validate_on
        self.test_on = test_on
        self.predict_on = predict_on
        self._checkpoint_weights_given = checkpoint_weights
        self.checkpoint_weights: WeightsChoice = checkpoint_weights or (
            "live" if validate_on == "live" else "ema"
        )
        self.live_suffix = live_suffix
        self.apply_on_fit_end = apply_on_fit_end
        self.log_decay = log_decay

        self.num_updates = 0
        self.started = start_step == 0
        self._shadow: ShadowWeights | None = None
        self._state_keys: list[str] = []
        self._loaded: dict[str, Any] | None = None
        self._swapped = False
        self._pointer_swap = True
        self._backup: list[Tensor] | None = None
        self._applied = False
        self._sharded = False
        self._logged_decay: float | None = None
        self._mask_source: Any = None
        self._fsdp2_modules: list[Any] = []
        self._masked_out: list[tuple[Tensor, Tensor, Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, start_step=self.start_step)

    # ------------------------------------------------------------------ set-up and state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"EMA does not support {name}: its parameters are partitioned outside the module. "
                "Use DDP, or ModelParallelStrategy with fully_shard (FSDP2) instead."
            )
        self._sharded = name in _SHARDED_STRATEGIES
        if self._sharded:
            self._keep_live_weights_in_sharded_checkpoints(name)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
        _refuse_two_emas_in_state_dict(callbacks)
        self._mask_source = find_mask_source(callbacks)

    def _ensure_shadow(self, pl_module: pl.LightningModule) -> ShadowWeights:
        if self._shadow is None:
            refuse_nonfinite_parameters(pl_module, "EMA")
            tracked = TrackedTensors.from_module(
                pl_module,
                average_buffers=self.buffers == "average",
                selection=self.selection,
                who="EMA",
            )
            self._shadow = ShadowWeights(tracked, self.device, dtype=self.dtype)
            self._state_keys = list(pl_module.state_dict().keys())
            # Pointer swaps exchange storage without copying; sharded parameters are views into
            # flat shards (FSDP1) or DTensor shards (FSDP2), and other devices or dtypes need a
            # real copy, so those use copies.
            same_dtypes = all(
                s.dtype == t.dtype for s, t in zip(self._shadow.tensors, tracked.tensors)
            )
            self._pointer_swap = not (
                self._sharded or self._shadow.background or tracked.sharded or not same_dtypes
            )
            self._fsdp2_modules = _fsdp2_modules(pl_module) if tracked.sharded else []
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            names = self._shadow.tracked.names
            shadow = {n: state["shadow"][n] for n in names if n in state["shadow"]}
            self._shadow.load_state_dict(shadow, "EMA state in the checkpoint")
        return self._shadow

    STATE = ("num_updates", "started", "last_epoch_update")

    def state_dict(self) -> dict[str, Any]:
        if self._shadow is None:
            return dict(self._loaded) if self._loaded is not None else {}
        # Under FSDP2 every rank holds shards: the state holds the gathered, full EMA (all ranks
        # call state_dict when a checkpoint is saved), so that rank 0's copy restores every rank.
        gather = self._shadow.tracked.gather
        state = {
            **super().state_dict(),
            "decay": self.decay,
            "shadow": gather(self._ema_values()),
            "aliases": dict(self._shadow.tracked.aliases),
        }
        masks = self._current_masks()
        if masks:  # for exports: the raw shadow is kept, the masks say what to zero
            state["masks"] = {name: mask.cpu() for name, mask in gather(masks).items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        super().load_state_dict(state_dict)
        pending = self._loaded.get("shadow", {}) if self._loaded else {}
        # The EMA read from the checkpoint's state_dict by on_load_checkpoint, then the rest.
        self._loaded = {**state_dict, "shadow": {**pending, **state_dict["shadow"]}}
        if self._shadow is not None:
            self._shadow.load_state_dict(
                {n: self._loaded["shadow"][n] for n in self._shadow.tracked.names},
                "EMA state",
            )
            self._loaded = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._shadow is None or "state_dict" not in checkpoint:
            return
        model_state = checkpoint["state_dict"]
        if self._swapped and self._shadow.tracked.sharded:
            raise RuntimeError(
                "EMA: a checkpoint was saved while the EMA was swapped in for evaluation under a "
                "sharded strategy; save checkpoints outside validation (ModelCheckpoint does)"
            )
        if self._swapped:  # saved mid-validation: the module holds the EMA, not the live weights
            self._fill_module_state(model_state, self._live_values(), clone=True)
        own = checkpoint.get("callbacks", {}).get(self.state_key)
        if self.checkpoint_weights != "ema" or not self._has_average() or own is None:
            return
        masks = self._current_masks()
        ema = masked_state(self._ema_values(), masks)
        ema_state = dict(model_state)
        self._fill_module_state(ema_state, ema, clone=bool(masks))
        checkpoint[LIVE_STATE_KEY] = model_state
        checkpoint["state_dict"] = ema_state
        own[EMA_IN_STATE_DICT] = True
        if not masks:  # only what the state_dict lacks (non-persistent buffers), never twice;
            # with masks the state_dict holds the masked EMA and resuming needs the raw one
            own["shadow"] = {k: v for k, v in own["shadow"].items() if k not in ema_state}

    def _resume_live_weights(
        self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's EMA was written by an EMA with other options (another ``state_key``):
        the fit still resumes from the live weights, not from that average, and this EMA starts
        afresh from them (before, training went on from the other EMA's average, silently)."""
        pl_module.load_state_dict(checkpoint[LIVE_STATE_KEY], strict=pl_module.strict_loading)
        writers = [k for k in checkpoint.get("callbacks", {}) if k.startswith("EMA")]
        rank_zero_warn(
            f"{self.state_key}: the checkpoint's EMA was written by {writers or 'another EMA'}, "
            "whose options differ: training resumes from the live weights and this EMA starts "
            "afresh from them (resume with the same EMA options to keep the average)"
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        own = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if LIVE_STATE_KEY not in checkpoint:
            return
        if not own:  # this EMA wrote nothing: the state_dict holds another EMA's average
            self._resume_live_weights(pl_module, checkpoint)
            return
        if not own.get(EMA_IN_STATE_DICT):  # the live layout: another EMA of this fit wrote it
            return
        # The Trainer has just loaded the EMA into the module: put the live weights back and
        # keep the EMA for the shadow (load_state_dict, which runs next, completes it).
        ema = dict(checkpoint["state_dict"])
        pl_module.load_state_dict(checkpoint[LIVE_STATE_KEY], strict=pl_module.strict_loading)
        self._loaded = {"shadow": {**ema, **own.get("shadow", {})}}

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fsdp1 = type(trainer.strategy).__name__ == _FSDP1
        if fsdp1 and self._loaded is not None and trainer.world_size > 1:
            raise RuntimeError(
                "Resuming EMA under FSDPStrategy (FSDP1) is not supported: its flat parameter "
                "shards cannot be matched to the saved EMA. Use ModelParallelStrategy with "
                "fully_shard (FSDP2), where EMA resumes exactly."
            )
        self._ensure_shadow(pl_module)
        self._applied = False

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Every ``update_every_n_steps``-th optimizer step from ``start_step`` on; never at an
        epoch's end. Override it to choose other moments (as Lightning's ``WeightAveraging``).

        Args:
            step_idx: the zero-based index of the optimizer step just taken
                (``trainer.global_step - 1``), or None at an epoch's end.
            epoch_idx: the zero-based index of the epoch just ended, or None after a step.

        Returns:
            True to update the EMA now (the first update from ``start_step > 0`` copies the
            live weights instead).
        """
        if step_idx is None:
            return False
        step = step_idx + 1  # the optimizer steps taken, as start_step counts them
        return (
            step >= max(self.start_step, 1)
            and (step - self.start_step) % self.update_every_n_steps == 0
        )

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update that follows ``num_updates`` updates: ``decay``, or timm's
        warm-up of it with ``warmup_gamma``. Override it for another schedule.

        Args:
            num_updates: the updates made so far (0 for the first).

        Returns:
            The decay, in [0, 1).
        """
        return ema_decay_at(
            num_updates, self.decay, warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power
        )

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shadow = self._ensure_shadow(pl_module)
        if self.started:
            decay = self.decay_at(self.num_updates)
            if not 0.0 <= decay <= 1.0:  # an override's value; NaN fails too
                check_unit_range(f"EMA.decay_at({self.num_updates})", decay)
            shadow.update_(decay)
            self.num_updates += 1
        else:
            shadow.copy_from_live_()
            self.started, decay = True, 0.0
        if self.log_decay:
            self._log_decay_if_changed(trainer, decay)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on_fit_end and self._has_average():
            assert self._shadow is not None
            self._restore_live()
            message = nonfinite_message(
                self._shadow.averaged_state(),
                "EMA: the average applied to the module at fit end",
                across_ranks=bool(self._shadow.tracked.sharded),
            )
            if message:
                rank_zero_warn(message)
            self._shadow.copy_to_live_()
            self._mask_module_tensors(keep_masked_out=False)
            _reshard(self._fsdp2_modules)
            self._applied = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_live()

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_on == "both":
            _refuse_persistent_workers(trainer.val_dataloaders)
        if self.validate_on == "live" or trainer.sanity_checking:
            return
        self._ensure_shadow(pl_module)
        if self.validate_on == "both":  # also before the first update: the names are always there
            self._validate_live(trainer, pl_module)
        self._swap_in_ema()  # no-op until the first update: the live weights are validated

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_live()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.test_on == "ema":
            self._ensure_shadow(pl_module)
            self._swap_in_ema()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_live()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.predict_on == "ema":
            self._ensure_shadow(pl_module)
            self._swap_in_ema()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_live()

    # ------------------------------------------------------------------ public helpers
    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights as a state dict of the module (detached copies; masked when a sparse
        training callback is present). Full tensors under FSDP2: there it gathers the shards,
        so every rank must call it."""
        if self._shadow is None:
            raise RuntimeError("the EMA has not been created yet: call it after trainer.fit starts")
        ema = self._shadow.tracked.gather(masked_state(self._ema_values(), self._current_masks()))
        left_out = self._shadow.tracked.untracked  # live: left out of the average by selection
        state: dict[str, Tensor] = {}
        self._fill_module_state(state, {**left_out, **ema}, clone=True, keys=self._state_keys)
        return state

    # ------------------------------------------------------------------ internals
    def _keep_live_weights_in_sharded_checkpoints(self, strategy: str) -> None:
        """Sharded checkpoints hold the model as shards and the rest (callback state) from
        rank 0 only: the EMA cannot replace the sharded weights there, it travels gathered in
        the callback state instead."""
        if self._checkpoint_weights_given == "ema":
            raise ValueError(
                f"EMA(checkpoint_weights='ema') is not supported under {strategy}: its "
                "checkpoints hold sharded weights. Use checkpoint_weights='live' (the default "
                "there): the full EMA is saved in the callback state, and "
                "ema_state_dict_from_checkpoint reads it."
            )
        self.checkpoint_weights = "live"

    def _has_average(self) -> bool:
        """Before the first update the EMA equals the live weights: evaluate those instead."""
        return (
            self._shadow is not None
            and (self.num_updates > 0 or (self.started and self.start_step > 0))
            and not self._applied
        )

    def _swap_in_ema(self) -> None:
        if self._swapped or self._shadow is None or not self._has_average():
            return
        shadow = self._shadow
        shadow.wait()
        if self._pointer_swap:
            shadow.exchange_with_live_()
        else:
            live = shadow.tracked.tensors
            with torch.no_grad():
                if self._backup is None:  # allocated once, reused by every later swap
                    self._backup = [torch.empty_like(t) for t in live]
                torch._foreach_copy_(self._backup, live)
            shadow.copy_to_live_()
        _reshard(self._fsdp2_modules)
        self._swapped = True
        # With pointer swaps the module's tensors *are* the shadow: keep what the mask hides.
        self._mask_module_tensors(keep_masked_out=self._pointer_swap)

    def _restore_live(self) -> None:
        if not self._swapped or self._shadow is None:
            return
        with torch.no_grad():
            for tensor, keep, values in self._masked_out:
                tensor[keep.logical_not()] = values
        self._masked_out = []
        if self._pointer_swap:
            self._shadow.exchange_with_live_()
        else:
            assert self._backup is not None
            with torch.no_grad():
                torch._foreach_copy_(self._shadow.tracked.tensors, self._backup)
        _reshard(self._fsdp2_modules)
        self._swapped = False

    def _live_values(self) -> dict[str, Tensor]:
        assert self._shadow is not None
        if self._pointer_swap:  # the module's storage was exchanged with ours
            return self._shadow.state_dict()
        assert self._backup is not None
        return dict(zip(self._shadow.tracked.names, self._backup))

    def _ema_values(self) -> dict[str, Tensor]:
        """Where the EMA values are now: in the module while swapped in, else in the shadow.

        Raw (unmasked): while swapped in, masked-out values are set aside and put back here.
        """
        assert self._shadow is not None
        if not self._swapped:
            return self._shadow.state_dict()
        values = dict(self._shadow.tracked.items())
        for tensor, keep, hidden in self._masked_out:
            name = next(n for n, t in values.items() if t is tensor)
            raw = tensor.detach().clone()
            raw[keep.logical_not()] = hidden
            values[name] = raw
        return values

    def _fill_module_state(
        self,
        state: dict[str, Tensor],
        values: Mapping[str, Tensor],
        *,
        clone: bool,
        keys: list[str] | None = None,
    ) -> None:
        """Write ``values`` (by tracked name) into ``state`` under every name that holds them
        (tied weights appear once in the shadow, under each of their names in a state dict)."""
        assert self._shadow is not None
        aliases = self._shadow.tracked.aliases
        for key in state if keys is None else keys:
            name = aliases.get(key, key)
            if name in values:
                value = values[name].detach()
                state[key] = value.clone() if clone else value

    def _log_decay_if_changed(self, trainer: pl.Trainer, decay: float) -> None:
        """``ema/decay`` when it changes: every logging interval during warm-up and when the
        final value is reached, so a constant decay is logged once and never per step."""
        if decay == self._logged_decay:
            return
        due = (
            self._logged_decay is None
            or decay == self.decay
            or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0  # type: ignore[attr-defined]
        )
        if not due:
            return
        self._logged_decay = decay
        for logger in trainer.loggers:
            logger.log_metrics({"ema/decay": decay}, step=trainer.global_step)

    # ---------------------------------------------------------------- sparse-training masks
    def _current_masks(self) -> dict[str, Tensor]:
        """The sparse-training masks by tracked name (empty without such a callback)."""
        if self._mask_source is None or self._shadow is None:
            return {}
        found = masks_for(self._mask_source, self._shadow.tracked.averaged_names)
        if found and not getattr(self, "_masks_announced", False):
            self._masks_announced = True
            rank_zero_info(
                f"EMA: applying the masks of {type(self._mask_source).__name__} to the EMA "
                f"weights of {len(found)} tensors wherever they are used (validation, test, "
                "predict, apply_on_fit_end, ema_state_dict, checkpoints)."
            )
        return found

    def _mask_module_tensors(self, *, keep_masked_out: bool) -> None:
        """Zero the module's weights outside the current masks (they hold the EMA now)."""
        masks = self._current_masks()
        if not masks:
            return
        assert self._shadow is not None
        tracked = dict(self._shadow.tracked.items())
        with torch.no_grad():
            for name, mask in masks.items():
                tensor = tracked[name]
                keep = mask.to(device=tensor.device, dtype=torch.bool)
                if keep_masked_out:
                    self._masked_out.append((tensor, keep, tensor[keep.logical_not()].clone()))
                tensor.masked_fill_(keep.logical_not(), 0)

    # ---------------------------------------------------------------- live validation pass
    def _validate_live(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A complete validation epoch on the live weights, logged with ``live_suffix``.

        The regular loop then validates the EMA under the original names, starting from the
        metric states the module had before this pass.
        """
        for name, metric in run_validation_epoch_apart(trainer, pl_module).items():
            # One already reduced value per epoch: its mean is itself. A value the module synced
            # is the same on every rank, and syncing it again (mean) keeps it bit for bit.
            pl_module.log(
                _suffixed(name, self.live_suffix),
                metric.value,
                on_step=False,
                on_epoch=True,
                logger=metric.to_logger and bool(trainer.loggers),
                prog_bar=metric.to_progress_bar,
                batch_size=1,
                sync_dist=metric.synced,
                add_dataloader_idx=False,
            )


# -------------------------------------------------------------------------- helpers
def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _parse_device(device: str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown EMA storage device {device!r}: use e.g. 'cpu', 'cuda', 'cuda:1'"
        ) from err


def _refuse_two_emas_in_state_dict(callbacks: list[Any]) -> None:
    """Only one EMA can own a checkpoint's ``state_dict``: a second would take the first's EMA
    for the live weights."""
    owners = [cb for cb in callbacks if isinstance(cb, EMA) and cb.checkpoint_weights == "ema"]
    if len(owners) > 1:
        raise ValueError(
            f"{len(owners)} EMA callbacks would each put their average in the checkpoint's "
            "state_dict: pass checkpoint_weights='live' to all but one of them"
        )


def _refuse_persistent_workers(loaders: Any) -> None:
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    for loader in loaders:
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0):
            raise ValueError(
                "EMA(validate_on='both') runs a second validation epoch, which a DataLoader with "
                "persistent_workers=True cannot serve while the first is open: set "
                "persistent_workers=False on the validation loader, or use validate_on='ema'"
            )


def _suffixed(name: str, suffix: str) -> str:
    """``val_loss`` -> ``val_loss_live``; ``val_loss/dataloader_idx_1`` -> ``val_loss_live/...``."""
    base, sep, rest = name.partition("/dataloader_idx_")
    return f"{base}{suffix}{sep}{rest}"
