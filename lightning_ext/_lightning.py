"""Everything that depends on which Lightning package the user imports, in one place.

Users run either ``import lightning.pytorch as pl`` or the older ``import pytorch_lightning as
pl``. The two packages hold separate copies of every class, so ``isinstance`` against one never
matches an object of the other. Code in this package never checks Lightning types directly: it
asks the helpers below, which accept both namespaces.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as _lightning_pytorch

_pytorch_lightning: ModuleType | None
try:  # the older namespace is optional
    import pytorch_lightning as _pytorch_lightning
except ImportError:  # pragma: no cover - exercised only where it is not installed
    _pytorch_lightning = None

__all__ = [
    "NAMESPACES",
    "is_lightning_module",
    "is_trainer",
    "is_wandb_logger",
    "namespace_of",
    "run_dir",
]

NAMESPACES: tuple[ModuleType, ...] = tuple(
    ns for ns in (_lightning_pytorch, _pytorch_lightning) if ns is not None
)


def namespace_of(obj: Any) -> ModuleType:
    """The Lightning package (``lightning.pytorch`` or ``pytorch_lightning``) that made ``obj``.

    Decided by the class hierarchy, so a user's subclass of ``pytorch_lightning.LightningModule``
    defined in their own module is recognised too. Defaults to ``lightning.pytorch``.
    """
    for klass in type(obj).__mro__:
        if klass.__module__.split(".")[0] == "pytorch_lightning" and _pytorch_lightning:
            return _pytorch_lightning
    return _lightning_pytorch


def _classes(attr_path: str) -> tuple[type, ...]:
    found = []
    for ns in NAMESPACES:
        obj: Any = ns
        for part in attr_path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)


def is_lightning_module(obj: Any) -> bool:
    """True for a LightningModule of either namespace."""
    return isinstance(obj, _classes("LightningModule"))


def is_trainer(obj: Any) -> bool:
    return isinstance(obj, _classes("Trainer"))


def is_wandb_logger(logger: Any) -> bool:
    """True for the WandbLogger of either namespace (wandb need not be importable)."""
    return isinstance(logger, _classes("loggers.WandbLogger"))


# --------------------------------------------------------------------------- run folders

_RUN_ROOT_ATTR = "_lightning_ext_run_root"


def _next_version(root: Path) -> Path:
    existing = [
        int(p.name.split("_", 1)[1])
        for p in root.glob("version_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit()
    ]
    return root / f"version_{max(existing, default=-1) + 1}"


def _resolve_run_root(trainer: Any) -> Path:
    """The run's own folder, following Lightning's conventions.

    - CSV/TensorBoard loggers: ``logger.log_dir`` (already versioned, ``version_N``).
    - Loggers without a versioned ``log_dir`` (WandbLogger): ``<save_dir>/<name>/<version>``, as
      Lightning's ModelCheckpoint resolves its folder for them (project / run id for wandb).
    - No logger: ``<default_root_dir>/lightning_logs/version_N`` with the next free N, so a rerun
      never writes into an earlier run's files.
    """
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        logger = loggers[0]
        if not is_wandb_logger(logger):
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                return Path(log_dir)
        if is_wandb_logger(logger):
            _ = logger.experiment  # the run id (its version) exists only once the run is started
        save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
        name = logger.name or "lightning_logs"
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return Path(save_dir) / str(name) / version
    return _next_version(Path(trainer.default_root_dir) / "lightning_logs")


def run_dir(trainer: Any, name: str) -> Path:
    """``<run folder>/<name>``: where a callback writes its files for this run.

    The run folder is resolved once per Trainer on rank 0 and broadcast, so all ranks and all of
    this package's callbacks agree on it. Call it from every rank at the same point (``setup`` or
    ``on_fit_start``), since it may broadcast. The folder is created on rank 0.
    """
    root = getattr(trainer, _RUN_ROOT_ATTR, None)
    if root is None:
        root = str(_resolve_run_root(trainer)) if trainer.is_global_zero else None
        root = trainer.strategy.broadcast(root, src=0)
        setattr(trainer, _RUN_ROOT_ATTR, root)
    path = Path(root) / name
    if trainer.is_global_zero:
        os.makedirs(path, exist_ok=True)
    return path


# --------------------------------------------------------------------------- mixed precision


def grad_scaler_found_inf(trainer: Any, optimizer: Any) -> list[Any]:
    """The GradScaler's found-inf flags (device tensors) for ``optimizer``'s current step.

    Call from ``on_before_optimizer_step``: Lightning has unscaled the gradients by then, so the
    flags are set; ``scaler.step`` reads them on the host before stepping, so reading them again
    after the step costs no extra synchronisation. Empty without an enabled GradScaler (fp32,
    bf16). Reads ``GradScaler``'s per-optimizer state, which torch keeps private.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return []
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    return list(state.get("found_inf_per_device", {}).values())
