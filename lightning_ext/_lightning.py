"""Everything that depends on which Lightning package the user imports, in one place.

Users run either ``import lightning.pytorch as pl`` or the older ``import pytorch_lightning as
pl``. The two packages hold separate copies of every class, so ``isinstance`` against one never
matches an object of the other. Code in this package never checks Lightning types directly: it
asks the helpers below, which accept both namespaces.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping, Sized
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import lightning.pytorch as _lightning_pytorch
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_ext._io import claim_run_folder, claim_version_dir

_pytorch_lightning: ModuleType | None
try:  # the older namespace is optional
    import pytorch_lightning as _pytorch_lightning
except ImportError:  # pragma: no cover - exercised only where it is not installed
    _pytorch_lightning = None

__all__ = [
    "NAMESPACES",
    "EpochMetric",
    "checkpoint_load_options",
    "configure_model_skipped",
    "fit_train_loaders",
    "fit_val_loaders",
    "grad_scaler_found_inf",
    "has_fit_val_loaders",
    "is_lightning_module",
    "is_trainer",
    "is_wandb_logger",
    "logging_step",
    "namespace_of",
    "realign_loader_reloads",
    "recount_train_epoch",
    "run_dir",
    "run_validation_epoch_apart",
    "skipped_epoch_end",
    "stepping_batches",
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


def _resolve_run_root(trainer: Any) -> Path:
    """The run's own folder, following Lightning's conventions.

    - CSV/TensorBoard loggers: ``logger.log_dir`` (already versioned, ``version_N``), claimed
      for this process (``_io.claim_run_folder``): the logger picks its version by listing the
      folders, so two runs started together get the same one; the second is refused here,
      before training, instead of overwriting the first one's files.
    - Loggers without a versioned ``log_dir`` (WandbLogger): ``<save_dir>/<name>/<version>``, as
      Lightning's ModelCheckpoint resolves its folder for them (project / run id for wandb).
    - No logger: ``<default_root_dir>/lightning_logs/version_N`` with the next free N, created
      at once with ``os.mkdir`` (``_io.claim_version_dir``), so a rerun never writes into an
      earlier run's files and runs started together get distinct folders.
    """
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        logger = loggers[0]
        if not is_wandb_logger(logger):
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                holder = claim_run_folder(log_dir)
                if holder is not None:
                    raise FileExistsError(
                        f"{log_dir} is the run folder of another live run (process {holder}): "
                        "its logger gave this run the same version (runs started at the same "
                        "moment, or one version= for both). Give each run's logger its own "
                        "version, or start this run a moment later"
                    )
                return Path(log_dir)
        if is_wandb_logger(logger):
            _ = logger.experiment  # the run id (its version) exists only once the run is started
        save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
        name = logger.name or "lightning_logs"
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return Path(save_dir) / str(name) / version
    return claim_version_dir(Path(trainer.default_root_dir) / "lightning_logs")


def run_dir(trainer: Any, name: str) -> Path:
    """``<run folder>/<name>``: where a callback writes its files for this run.

    The run folder is resolved once per Trainer on rank 0 and broadcast, so all ranks and all of
    this package's callbacks agree on it. Call it from every rank at the same point (``setup`` or
    ``on_fit_start``), since it may broadcast. The folder is created on rank 0.
    """
    root = getattr(trainer, _RUN_ROOT_ATTR, None)
    if root is None:
        found: str | OSError | None = None
        if trainer.is_global_zero:
            try:
                found = str(_resolve_run_root(trainer))
            except OSError as err:  # sent, not raised alone: the other ranks wait for the answer
                found = err
        found = trainer.strategy.broadcast(found, src=0)
        if isinstance(found, OSError):
            raise found
        root = found
        setattr(trainer, _RUN_ROOT_ATTR, root)
    path = Path(root) / name
    if trainer.is_global_zero:
        os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def configure_model_skipped(module: Any) -> Iterator[None]:
    """Run another Trainer on a module that is already configured (sharded) without calling its
    ``configure_model`` again.

    Every ``fit``/``validate`` calls the hook. Lightning asks for it to be idempotent, but the
    usual FSDP2 hook (``fully_shard`` on each layer) is not: a second ``fully_shard`` of a module
    raises. The base class's no-op hook shadows the module's for the duration (an instance
    attribute, removed on exit), so Lightning sees the hook as not overridden.
    """
    base = namespace_of(module).LightningModule.configure_model
    module.configure_model = base.__get__(module)
    try:
        yield
    finally:
        del module.configure_model


def checkpoint_load_options(weights_only: bool | None) -> dict[str, bool]:
    """The keyword arguments a strategy passes on to ``load_checkpoint`` for ``weights_only``.

    Lightning 2.6 hands ``weights_only`` (None by default) to ``Strategy.load_checkpoint`` and
    its ``CheckpointIO``; Lightning 2.5 knows no such argument and raises TypeError on it. None,
    the only value Lightning 2.5 can mean, is left out, which is the same call on 2.6.
    """
    return {} if weights_only is None else {"weights_only": weights_only}


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


# --------------------------------------------------------------------------- Lightning internals
# Everything below reads or drives Lightning's private machinery (loops, logger connector, hook
# callers, data sources). It is the same in both namespaces as of Lightning 2.6; when a release
# changes it, this section is what to update.


def fit_train_loaders(trainer: Any) -> Any:
    """What the fit trains on, as returned by its source (the datamodule's, the module's or
    ``fit(train_dataloaders=...)``); read from the fit loop's private data source."""
    return trainer.fit_loop._data_source.dataloader()


def logging_step(trainer: Any) -> int:
    """The step under which Lightning's loggers file this training batch's ``self.log`` values
    (the fit loop's private count of batches that stepped, raised only after the batch's
    hooks): metrics sent to a logger directly from a batch hook line up with them.

    Args:
        trainer: the Trainer.

    Returns:
        The logging step of the current training batch.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def stepping_batches(trainer: Any) -> int | float:
    """``trainer.estimated_stepping_batches``, read once the fit loop has built its training loader
    (from ``on_train_start`` on).

    Read earlier (``setup``, ``on_fit_start``), the property makes Lightning build the training
    loader before a checkpoint's loader state is restored, so a resumed run's stateful loader is
    never fast-forwarded and a mid-epoch resume replays the epoch's first batches. Refusing the
    early read keeps every caller in this package honest.
    """
    if trainer.max_epochs != -1 and trainer.fit_loop._combined_loader is None:
        raise RuntimeError(
            "lightning_ext read estimated_stepping_batches before the fit loop built its "
            "training loader; read it from on_train_start on, or resume would not be exact"
        )
    return trainer.estimated_stepping_batches


_SKIPPED_WARNED_ATTR = "_lightning_ext_skipped_epoch_end_warned"


def _restarted_after_last_batch(trainer: Any) -> bool:
    """Restored from a checkpoint written after an epoch's last batch, before its end."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    return bool(
        getattr(fit_loop, "restarted_mid_epoch", False)
        and getattr(epoch_loop, "restarted_on_train_batch_end", False)
        and epoch_loop.batch_progress.is_last_batch
    )


def skipped_epoch_end(trainer: Any) -> int | None:
    """The epoch whose end this resumed fit skips, or None.

    A checkpoint written after an epoch's last training batch but before that epoch ended
    (``ModelCheckpoint(every_n_train_steps=...)`` landing on the last batch) resumes with the
    epoch counted as finished: Lightning runs none of its end (validation, ``on_train_epoch_end``
    hooks, epoch-interval LR scheduler steps) nor the next epoch's ``on_train_epoch_start``. Read
    from the loops' restored progress counters, valid in ``on_train_start`` (Lightning decides the
    restart stage just before it). Warns once per fit, naming what is lost; callbacks of this
    package redo their own epoch-end work when this returns an epoch.
    """
    if not _restarted_after_last_batch(trainer):
        return None
    epoch = int(trainer.current_epoch) - 1  # Lightning already counted the epoch as completed
    if not getattr(trainer, _SKIPPED_WARNED_ATTR, False):
        setattr(trainer, _SKIPPED_WARNED_ATTR, True)
        rank_zero_warn(
            f"Resumed from a checkpoint written after the last training batch of epoch {epoch} "
            "but before that epoch ended: Lightning skips the rest of the epoch (its end-of-epoch "
            "validation, on_train_epoch_end hooks, epoch-interval LR scheduler steps) and the next "
            "epoch's on_train_epoch_start. lightning_ext callbacks redo their own epoch-end work; "
            "the rest is lost. Checkpoint at epoch ends (ModelCheckpoint(every_n_epochs=...)) or "
            "off the epoch's last batch to resume without loss."
        )
    return epoch


_RESTORED_EPOCH_ATTR = "_lightning_ext_restored_epoch_finished"


def finish_restored_epoch(trainer: Any) -> bool:
    """Keep a fit resumed from an epoch-end checkpoint of an epoch without validation from
    training one batch too many; True when it had to.

    Lightning 2.6 under ``max_steps`` leaves a restored epoch's loop through the branch that
    skips its already-run validation; an epoch without validation has no such branch, so the
    loop re-enters the finished epoch and trains one more batch from a fresh iterator (13 steps
    where an uninterrupted run takes 12), and nothing after the resume matches. When every batch
    of the restored epoch was processed, its validation is not restored as finished and the
    restart is on the epoch's end, the epoch is closed: its validation marked as run and the
    loop's restart state cleared at the next epoch's start (``end_restored_epoch``). With
    validation, Lightning's branch counts the epoch's last batch a second time for the loggers
    (their step runs one ahead of the uninterrupted run's from then on): counted back here.
    Call from ``on_train_start`` (Lightning decides the restart stage just before it).

    Args:
        trainer: the Trainer.

    Returns:
        Whether the restored epoch was closed here (an epoch without validation).
    """
    loop = trainer.fit_loop
    epoch_loop = loop.epoch_loop
    val_loop = epoch_loop.val_loop
    if not (
        getattr(loop, "restarted_on_epoch_end", False)
        and epoch_loop.restarting
        and epoch_loop._is_training_done
        and not val_loop._has_run
    ):
        return False
    if val_loop.batch_progress.is_last_batch:  # Lightning's branch: it counts the batch again
        epoch_loop._batches_that_stepped -= 1
        return False
    val_loop._has_run = True
    setattr(trainer, _RESTORED_EPOCH_ATTR, True)
    return True


def end_restored_epoch(trainer: Any) -> None:
    """Clear the restart state of an epoch ``finish_restored_epoch`` closed, as Lightning does
    after a loop's iteration (none ran in it), so the next epoch starts at its first batch. Call
    from ``on_train_epoch_start``, every epoch.

    Args:
        trainer: the Trainer.
    """
    if getattr(trainer, _RESTORED_EPOCH_ATTR, False):
        setattr(trainer, _RESTORED_EPOCH_ATTR, False)
        trainer.fit_loop.epoch_loop.on_iteration_done()


def start_next_epoch_at_first_batch(trainer: Any) -> None:
    """Make a fit resumed after a skipped epoch end start its next epoch at batch 0.

    Lightning resumes from a checkpoint written on an epoch's last batch by counting that batch
    as completed and starting the epoch afresh only when the count reaches
    ``trainer.num_training_batches``: right when every epoch has one length, but when the next
    epoch is longer than the killed one (InfoBatch prunes each epoch anew) it runs that epoch as
    if the killed epoch's batches were its own and ends it early. Raising the restored count to
    one short of the epoch's length makes Lightning's own check start the epoch afresh (its
    progress, scheduler and optimizer counters), the path every equal-length epoch takes. Call
    from ``on_train_start`` when ``skipped_epoch_end`` returned an epoch, once the coming epoch's
    length is counted (``recount_train_epoch``). Nothing happens otherwise.

    Args:
        trainer: the Trainer.
    """
    batches = trainer.num_training_batches
    if not _restarted_after_last_batch(trainer) or batches == float("inf"):
        return
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    current.completed = max(current.completed, int(batches) - 1)


def recount_train_epoch(trainer: Any) -> int | None:
    """Make Lightning count the coming training epoch by its loader's length now; returns that
    number of batches (None for a loader without a length).

    Lightning reads the training loader's length once, when it builds the loader, and counts
    every epoch by it: ``num_training_batches``, where a fractional ``val_check_interval``
    validates, and when a batch is the epoch's last (which the epoch-end validation waits for).
    A sampler whose epochs differ in length (InfoBatch draws each epoch anew) needs the counts
    renewed each epoch: call from ``on_train_epoch_start``, once the sampler's epoch is set. Sets
    the fit loop's ``max_batches``, the combined loader's limits, the data fetcher's length and
    ``val_check_batch`` as Lightning's own ``setup_data`` computes them.
    """
    loop = trainer.fit_loop
    combined = loop._combined_loader
    if combined is None:
        return None
    connector = _internal(trainer, "trainer.connectors.data_connector")
    stage = _internal(trainer, "trainer.states").RunningStage.TRAINING
    lengths = [len(dl) if isinstance(dl, Sized) else None for dl in combined.flattened]
    if any(length is None for length in lengths):
        return None
    limits = [
        connector._parse_num_batches(stage, length, trainer.limit_train_batches)
        for length in lengths
    ]
    combined.limits = limits
    if combined._iterator is not None:  # the running iterator counts by its own copy
        combined._iterator.limits = limits
    loop.max_batches = len(combined) if combined._iterator is not None else max(limits)
    fetcher = loop._data_fetcher
    if fetcher is not None and fetcher.length is not None:
        fetcher.length = loop.max_batches
        fetcher.done = loop.max_batches == 0
    interval = trainer.val_check_interval
    timed = getattr(trainer, "_val_check_time_interval", None) is not None
    if isinstance(interval, float) and not timed and trainer.val_check_batch != float("inf"):
        trainer.val_check_batch = max(1, int(loop.max_batches * interval))
    return int(loop.max_batches)


def realign_loader_reloads(trainer: Any) -> None:
    """Have a resumed fit reload its training loader at the epochs an uninterrupted run does.

    With ``reload_dataloaders_every_n_epochs=n`` an uninterrupted run reloads at epochs 0, n,
    2n... A resumed fit builds its loader at the restored epoch and counts n epochs from there,
    so a checkpoint written at a task boundary of a ``TaskStream`` (epoch's end or last batch)
    resumed on the old task's loader and reloaded off the boundaries. Setting the loop's last
    reload epoch to the uninterrupted run's restores the schedule; the loader built at resume
    holds the same data as the uninterrupted run's until the next boundary. Call from
    ``on_train_start`` (after the loader is built, before the next epoch starts).
    """
    n = trainer.reload_dataloaders_every_n_epochs
    loop = trainer.fit_loop
    last = loop._last_train_dl_reload_epoch
    if n and isinstance(last, int):
        loop._last_train_dl_reload_epoch = (last // n) * n


_SAMPLER_REALIGNED_ATTR = "_lightning_ext_sampler_epoch_realigned"


def realign_sampler_epoch(trainer: Any) -> bool:
    """Give the training samplers the epoch an uninterrupted run gives them; True when it had to.

    Lightning 2.6, resumed under ``max_steps`` from a checkpoint written at an epoch's end,
    counts the restored epoch as processed once more than completed, and hands every training
    sampler ``set_epoch(current_epoch + 1)`` from then on (the epoch it was resumed into gets
    the next epoch's shuffle), so the data order differs from the uninterrupted run's; with
    ``max_epochs`` set as well, the fit also ends one epoch early (the processed count is what
    ``max_epochs`` is checked against). At the start of an epoch the two counters are equal in
    every other case; when they are not, the samplers get the current epoch again, before the
    epoch's iterator is made, and the processed count is set back to the completed one, as an
    uninterrupted run has it. Call from ``on_train_epoch_start``, every epoch.

    Args:
        trainer: the Trainer.

    Returns:
        Whether the counters disagreed (and were realigned).
    """
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if progress.processed <= progress.completed:
        return False
    combined = loop._combined_loader
    loop.epoch_progress.total.processed -= progress.processed - progress.completed
    progress.processed = progress.completed
    realigned = 0
    for loader in combined.flattened if combined is not None else ():
        batch_sampler = getattr(loader, "batch_sampler", None)
        for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(progress.completed)
                realigned += 1
    if not getattr(trainer, _SAMPLER_REALIGNED_ATTR, False):
        setattr(trainer, _SAMPLER_REALIGNED_ATTR, True)
        rank_zero_info(
            f"lightning_ext: this resumed fit counted epoch {progress.completed} as processed "
            "twice (Lightning, max_steps, a checkpoint from an epoch's end); set back, so the "
            "number of epochs is the uninterrupted run's"
            + (
                f", and the samplers' epoch ({progress.completed}, not "
                f"{progress.completed + 1}) with it"
                if realigned
                else "; the training sampler has no set_epoch, so its shuffle is not "
                "reproducible across a resume (a sampler with set_epoch, or a resumable loader, "
                "makes it so)"
            )
        )
    return True


def _fit_val_source(trainer: Any) -> Any:
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    return source if source is not None and source.instance is not None else None


def has_fit_val_loaders(trainer: Any) -> bool:
    """Whether the fit validates on anything (``fit(val_dataloaders=...)``, a datamodule's or
    the module's ``val_dataloader()``)."""
    source = _fit_val_source(trainer)
    return source is not None and source.is_defined()


def fit_val_loaders(trainer: Any) -> Any:
    """What the fit validates on, as returned by its source; None if nothing is defined.

    Lightning keeps the source in a private attribute of the validation loop.
    """
    return _fit_val_source(trainer).dataloader() if has_fit_val_loaders(trainer) else None


def _internal(trainer: Any, module: str) -> Any:
    """A Lightning-internal module of the namespace the Trainer comes from."""
    return importlib.import_module(f"{namespace_of(trainer).__name__}.{module}")


@contextmanager
def _fresh_results(trainer: Any) -> Iterator[Any]:
    """Route ``self.log`` of the running validation loop into a fresh result collection.

    Lightning private API (loop ``_results``, logger connector state), restored on exit.
    """
    result_module = _internal(trainer, "trainer.connectors.logger_connector.result")
    loop = trainer._active_loop
    connector = trainer._logger_connector
    saved = (loop._results, connector._first_loop_iter, connector._current_fx)
    results = result_module._ResultCollection(training=False)
    loop._results = results
    connector._first_loop_iter = None
    try:
        yield results
    finally:
        results.reset()  # also resets any torchmetrics Metric logged as an object
        loop._results, connector._first_loop_iter, connector._current_fx = saved


@contextmanager
def _metric_states_restored(module: torch.nn.Module) -> Iterator[None]:
    """Leave every torchmetrics ``Metric`` of ``module`` in the state it had on entry."""
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [(m, _copy_state(m.metric_state), m._update_count, m._computed) for m in metrics]
    try:
        yield
    finally:
        for metric, state, count, computed in saved:
            for attr, value in state.items():
                setattr(metric, attr, value)
            metric._update_count, metric._computed = count, computed


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in state.items()
    }


class EpochMetric(NamedTuple):
    value: Tensor
    to_logger: bool
    to_progress_bar: bool
    synced: bool


def _collect_epoch_metrics(results: Any, into: dict[str, EpochMetric]) -> None:
    """Epoch-level values of ``results`` for its current dataloader index, as Lightning reads them
    at the end of each dataloader and of the epoch, with where each goes and whether it was
    synced across ranks."""
    metrics = results.metrics(on_step=False)
    synced = set()
    for _, result_metric in results.valid_items():
        if result_metric.meta.sync.should:
            synced.update(results._forked_name(result_metric, False))
    for name, value in metrics["callback"].items():
        into[name] = EpochMetric(
            value.detach().clone(), name in metrics["log"], name in metrics["pbar"], name in synced
        )


def run_validation_epoch_apart(trainer: Any, pl_module: Any) -> dict[str, EpochMetric]:
    """Run one whole validation epoch of the module (its epoch-start hook, batch hooks,
    ``validation_step`` and epoch-end hook) with its own logged results and metric states.

    The global RNG is left as it was, so the regular pass and training see the same randomness.
    """
    call = _internal(trainer, "trainer.call")
    connector = trainer._logger_connector
    loaders = trainer.val_dataloaders
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    limits = trainer.num_val_batches
    several = len(loaders) > 1
    collected: dict[str, EpochMetric] = {}
    with (
        torch.random.fork_rng(devices=[]),
        _metric_states_restored(pl_module),
        _fresh_results(trainer) as results,
    ):
        call._call_lightning_module_hook(trainer, "on_validation_epoch_start")
        for dl_idx, loader in enumerate(loaders):
            for batch_idx, batch in enumerate(loader):
                if batch_idx >= limits[dl_idx]:
                    break
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=dl_idx)
                batch = call._call_strategy_hook(
                    trainer, "batch_to_device", batch, dataloader_idx=dl_idx
                )
                connector.on_batch_start(batch, dl_idx if several else None)
                args = (batch, batch_idx, dl_idx) if several else (batch, batch_idx)
                call._call_lightning_module_hook(trainer, "on_validation_batch_start", *args)
                output = call._call_strategy_hook(trainer, "validation_step", *args)
                call._call_lightning_module_hook(trainer, "on_validation_batch_end", output, *args)
            if several:  # this loader's metrics, as Lightning stores them between loaders
                connector.epoch_end_reached()
                _collect_epoch_metrics(results, collected)
        connector.epoch_end_reached()
        results.dataloader_idx = None
        call._call_lightning_module_hook(trainer, "on_validation_epoch_end")
        _collect_epoch_metrics(results, collected)
    return collected
