"""EMA of a LightningModule's weights: evaluate on the average, train on the live weights."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torchmetrics import Metric

from lightning_ext._io import atomic_torch_save
from lightning_ext.callbacks._shadow import ShadowWeights, TrackedTensors
from lightning_ext.callbacks._steps import AfterOptimizerStep
from lightning_ext.functional.ema import ema_decay_at

__all__ = ["EMA", "ema_state_dict_from_checkpoint", "export_ema"]

WeightsChoice = Literal["ema", "live"]
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy",)
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")


class EMA(AfterOptimizerStep):
    """Keep an exponential moving average of the weights and evaluate on it.

    After every ``update_every_n_steps``-th optimizer step (from ``start_step``):
    ``ema <- d * ema + (1 - d) * theta`` with ``d = decay`` or, with ``warmup_gamma`` set, timm's
    warm-up ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``. Gradient accumulation
    gives one update per optimizer step. The EMA starts as a copy of the weights at fit start (or
    when averaging begins at ``start_step``).

    Args:
        decay: EMA decay in (0, 1).
        update_every_n_steps: average every n optimizer steps.
        start_step: first optimizer step that updates the EMA; the EMA is re-copied from the live
            weights there, so it never remembers weights from before it.
        warmup_gamma, warmup_power: decay warm-up (off when ``warmup_gamma`` is None).
        buffers: ``"average"`` float buffers (e.g. BatchNorm statistics) like parameters, or
            ``"copy"`` them from the live model. Non-float buffers are always copied.
        device: where the EMA lives (``None``: beside each weight). ``"cpu"`` offloads a GPU
            model's EMA; the host-side averaging then runs in a background thread.
        validate_on: weights used by validation; ``"both"`` validates the EMA under the module's
            own metric names and the live weights under the same names plus ``live_suffix``.
        test_on, predict_on: weights used by ``trainer.test`` and ``trainer.predict``.
        apply_on_fit_end: copy the EMA into the module when fit ends.
        log_decay: log the decay used at each update as ``ema/decay``.
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
        live_suffix: str = "_live",
        apply_on_fit_end: bool = True,
        log_decay: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(
                f"EMA decay must lie in (0, 1), got {decay}; typical values: 0.99-0.9999"
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
        if validate_on == "both" and not live_suffix:
            raise ValueError(
                "validate_on='both' needs a non-empty live_suffix to tell metrics apart"
            )
        self.device = _parse_device(device)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.buffers = buffers
        self.validate_on = validate_on
        self.test_on = test_on
        self.predict_on = predict_on
        self.live_suffix = live_suffix
        self.apply_on_fit_end = apply_on_fit_end
        self.log_decay = log_decay

        self.num_updates = 0
        self.started = start_step == 0
        self._shadow: ShadowWeights | None = None
        self._loaded: dict[str, Any] | None = None
        self._swapped = False
        self._pointer_swap = True
        self._backup: list[Tensor] | None = None
        self._applied = False
        self._sharded = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, start_step=self.start_step)

    # ------------------------------------------------------------------ set-up and state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"EMA does not support {name}: its parameters are partitioned outside the module. "
                "Use DDP or FSDP instead."
            )
        self._sharded = name in _SHARDED_STRATEGIES

    def _ensure_shadow(self, pl_module: pl.LightningModule) -> ShadowWeights:
        if self._shadow is None:
            tracked = TrackedTensors.from_module(
                pl_module, average_buffers=self.buffers == "average"
            )
            self._shadow = ShadowWeights(tracked, self.device)
            # Pointer swaps exchange storage without copying; sharded parameters are views into
            # flat shards and other devices or dtypes need a real copy, so those use copies.
            self._pointer_swap = not self._sharded and not self._shadow.background
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            self._shadow.load_state_dict(state["shadow"], "EMA state in the checkpoint")
        return self._shadow

    def state_dict(self) -> dict[str, Any]:
        if self._shadow is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return {
            "num_updates": self.num_updates,
            "started": self.started,
            "decay": self.decay,
            "shadow": self._ema_values(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.num_updates = int(state_dict["num_updates"])
        self.started = bool(state_dict["started"])
        self._loaded = dict(state_dict)
        if self._shadow is not None:
            self._shadow.load_state_dict(state_dict["shadow"], "EMA state")
            self._loaded = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint saved mid-validation must still hold the live weights in its state_dict.
        if self._swapped and self._shadow is not None:
            live = self._live_values()
            model_state = checkpoint["state_dict"]
            for name, value in live.items():
                if name in model_state:
                    model_state[name] = value.detach().clone()

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sharded and self._loaded is not None and trainer.world_size > 1:
            raise RuntimeError(
                "Resuming EMA under a sharded strategy is not supported yet: Lightning stores "
                "callback state from rank 0 only, but each rank holds its own EMA shard."
            )
        self._ensure_shadow(pl_module)
        self._applied = False

    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step < max(self.start_step, 1) or (step - self.start_step) % self.update_every_n_steps:
            return
        shadow = self._ensure_shadow(pl_module)
        if self.started:
            decay = ema_decay_at(
                self.num_updates,
                self.decay,
                warmup_gamma=self.warmup_gamma,
                warmup_power=self.warmup_power,
            )
            shadow.update_(decay)
            self.num_updates += 1
        else:
            shadow.copy_from_live_()
            self.started, decay = True, 0.0
        if self.log_decay:
            pl_module.log("ema/decay", decay, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on_fit_end and self._has_average():
            assert self._shadow is not None
            self._restore_live()
            self._shadow.copy_to_live_()
            self._applied = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_live()

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_on == "live" or trainer.sanity_checking:
            return
        self._ensure_shadow(pl_module)
        if not self._has_average():
            return
        if self.validate_on == "both":
            self._validate_live(trainer, pl_module)
        self._swap_in_ema()

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
        """The EMA weights as a state dict of the module (detached copies)."""
        if self._shadow is None:
            raise RuntimeError("the EMA has not been created yet: call it after trainer.fit starts")
        return {name: value.detach().clone() for name, value in self._ema_values().items()}

    # ------------------------------------------------------------------ internals
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
        self._swapped = True

    def _restore_live(self) -> None:
        if not self._swapped or self._shadow is None:
            return
        if self._pointer_swap:
            self._shadow.exchange_with_live_()
        else:
            assert self._backup is not None
            with torch.no_grad():
                torch._foreach_copy_(self._shadow.tracked.tensors, self._backup)
        self._swapped = False

    def _live_values(self) -> dict[str, Tensor]:
        assert self._shadow is not None
        if self._pointer_swap:  # the module's storage was exchanged with ours
            return self._shadow.state_dict()
        assert self._backup is not None
        return dict(zip(self._shadow.tracked.names, self._backup))

    def _ema_values(self) -> dict[str, Tensor]:
        """Where the EMA values are now: in the module while swapped in, else in the shadow."""
        assert self._shadow is not None
        return dict(self._shadow.tracked.items()) if self._swapped else self._shadow.state_dict()

    def _validate_live(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the module's own validation_step on the live weights and log its metrics with
        ``live_suffix``; the regular loop then runs on the EMA under the original names."""
        metrics = _run_validation_capturing_logs(trainer, pl_module)
        for name, value in metrics.items():
            pl_module.log(
                f"{name}{self.live_suffix}", value, on_step=False, on_epoch=True, sync_dist=True
            )


def _run_validation_capturing_logs(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> dict[str, Tensor]:
    """One pass of ``validation_step`` over the validation loaders with ``self.log`` captured.

    Values are averaged over batches weighted by batch size, as Lightning does for epoch metrics;
    a logged torchmetrics ``Metric`` is computed and then reset so the regular pass starts clean.
    """
    loaders = trainer.val_dataloaders
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    limits = trainer.num_val_batches
    sums: dict[str, Tensor] = {}
    weights: dict[str, float] = defaultdict(float)
    metric_objects: dict[str, Metric] = {}
    current: dict[str, Any] = {}

    def capture(
        name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any
    ) -> None:
        if isinstance(value, Metric):
            metric_objects[name] = value
            return
        size = batch_size if batch_size is not None else current["batch_size"]
        tensor = torch.as_tensor(value, dtype=torch.float64).detach()
        sums[name] = sums.get(name, 0.0) + tensor * size
        weights[name] += size

    pl_module.log = capture  # type: ignore[method-assign]
    try:
        precision = trainer.precision_plugin
        for dl_idx, loader in enumerate(loaders):
            for batch_idx, batch in enumerate(loader):
                if batch_idx >= limits[dl_idx]:
                    break
                batch = trainer.lightning_module._on_before_batch_transfer(batch, dl_idx)
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dl_idx)
                current["batch_size"] = extract_batch_size(batch)
                args = (batch, batch_idx, dl_idx) if len(loaders) > 1 else (batch, batch_idx)
                with precision.val_step_context():
                    pl_module.validation_step(*args)
    finally:
        del pl_module.log
    out = {name: (total / weights[name]).float() for name, total in sums.items()}
    for name, metric in metric_objects.items():
        out[name] = metric.compute().float()
        metric.reset()
    return out


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


# ---------------------------------------------------------------------- checkpoints
def ema_state_dict_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], *, state_key: str | None = None
) -> dict[str, Tensor]:
    """The module's state dict with every averaged tensor replaced by its EMA, for inference.

    Works on checkpoints written by ``trainer.save_checkpoint`` or ``ModelCheckpoint`` with an
    ``EMA`` callback. With several EMA callbacks, pick one by ``state_key``.
    """
    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=False)
        if isinstance(checkpoint, str | Path)
        else checkpoint
    )
    if "state_dict" not in ckpt:
        raise ValueError(f"{checkpoint}: not a Lightning checkpoint (no 'state_dict' entry)")
    candidates = {k: v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EMA") and v}
    if state_key is not None:
        if state_key not in candidates:
            raise KeyError(
                f"no EMA state {state_key!r} in the checkpoint; found {sorted(candidates)}"
            )
        candidates = {state_key: candidates[state_key]}
    if not candidates:
        raise ValueError(
            f"{checkpoint}: the checkpoint holds no EMA state (was the EMA callback used?)"
        )
    if len(candidates) > 1:
        raise ValueError(
            "the checkpoint holds several EMA states; choose one with state_key from "
            f"{sorted(candidates)}"
        )
    shadow = next(iter(candidates.values()))["shadow"]
    model_state = ckpt["state_dict"]
    unknown = [k for k in shadow if k not in model_state]
    if unknown:
        raise ValueError(f"EMA state names tensors the model state lacks: {unknown[:5]}")
    return {name: shadow.get(name, value) for name, value in model_state.items()}


def export_ema(checkpoint: str | Path, out: str | Path, *, state_key: str | None = None) -> Path:
    """Write the EMA-only state dict of ``checkpoint`` to ``out`` (atomically)."""
    return atomic_torch_save(ema_state_dict_from_checkpoint(checkpoint, state_key=state_key), out)
