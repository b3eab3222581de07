"""Shadow copies of a module's weights, shared by the weight-averaging callbacks (EMA, PostHocEMA).

A ``ShadowWeights`` follows one module: parameters and floating statistics buffers (BatchNorm's
running mean and variance) are averaged with the foreach EMA update; every other buffer is copied
(``averages_buffer`` is the one rule): counters such as ``num_batches_tracked``, buffers that are
not statistics of the data, and any float buffer holding a non-finite value (an additive ``-inf``
causal mask, where ``lerp(-inf, -inf)`` would be NaN). The
shadow may live on another device than the module (e.g. CPU offload of a GPU model); then each
update stages the weights into pinned host buffers with non-blocking copies and the averaging runs
in a background thread, so the training step never waits for the host-side arithmetic.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ext.functional.ema import ema_update_, group_by_device_and_dtype
from lightning_ext.functional.merging import is_statistic


def averages_buffer(name: str, buffer: Tensor) -> bool:
    """Whether a weight average (EMA, post-hoc EMA, WARP's anchor and merge) averages a buffer.

    Only floating statistics of the data (``functional.merging.is_statistic``: BatchNorm's running
    mean and variance), and only while every value is finite: the one merge rule, linear. Every
    other buffer is copied, never averaged: counters, constants (an additive ``-inf`` causal mask,
    where ``lerp(-inf, -inf)`` is NaN; a rotary cache) and whatever else is not a statistic.

    Args:
        name: the buffer's name in the module's state dict.
        buffer: its tensor.

    Returns:
        True when the buffer is averaged, False when it is copied.

    Examples:
        >>> import torch
        >>> averages_buffer("bn.running_mean", torch.zeros(3))
        True
        >>> averages_buffer("attn.mask", torch.full((2, 2), float("-inf")).triu(1))
        False
    """
    if not buffer.is_floating_point() or not is_statistic(name, buffer):
        return False
    return bool(torch.isfinite(local_shard(buffer)).all())


def nonfinite_names(named: Mapping[str, Tensor], *, across_ranks: bool | None = None) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (one host sync for all of them).

    Args:
        named: tensors by name (any devices; DTensors are read by their local shards).
        across_ranks: combine the ranks' answers (one all-reduce: every rank must call it), as
            sharded tensors need so that every rank names the same tensors and none is left
            waiting in a later collective; None: exactly when ``named`` holds DTensors.

    Returns:
        The names, in ``named``'s order; empty when every value is finite.

    Examples:
        >>> import torch
        >>> nonfinite_names({"a": torch.ones(2), "b": torch.tensor([0.0, float("nan")])})
        ['b']
    """
    names = [n for n, t in named.items() if t.is_floating_point()]
    if across_ranks is None:
        across_ranks = any(is_dtensor(named[n]) for n in names)
    if not names:
        return []
    local = [local_shard(named[n]) for n in names]
    flags = torch.stack([torch.isfinite(t).all() for t in local]).int()
    if across_ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [n for n, ok in zip(names, flags.tolist()) if not ok]


def refuse_nonfinite_parameters(module: nn.Module, who: str) -> None:
    """Refuse to start averaging a model whose parameters are already NaN or infinite: the average
    would be NaN from the first update, silently (a diverged run, or a bad checkpoint).

    Args:
        module: the model about to be averaged.
        who: the callback or strategy, named in the message.

    Raises:
        ValueError: naming the first non-finite parameters.
    """
    bad = nonfinite_names(dict(module.named_parameters()))
    if bad:
        raise ValueError(
            f"{who}: {len(bad)} parameters hold NaN or infinite values before averaging starts "
            f"(e.g. {bad[:5]}): the average would be NaN. Resume from an earlier checkpoint or "
            "lower the learning rate; only buffers (e.g. an additive -inf mask) may be non-finite."
        )


def nonfinite_message(
    named: Mapping[str, Tensor], what: str, *, across_ranks: bool = False
) -> str | None:
    """The warning to give when ``named`` holds NaN or infinite values, naming the tensors (an
    average of a diverged run is NaN: saying so beats a silent NaN model), or None.

    Args:
        named: the averaged tensors by name.
        what: what they are, for the message (e.g. "EMA: the average applied at fit end").
        across_ranks: the tensors are local shards (FSDP2): combine the ranks' answers (a
            collective, see ``nonfinite_names``).

    Returns:
        The message, or None when every value is finite.
    """
    bad = nonfinite_names(named, across_ranks=across_ranks)
    if not bad:
        return None
    return (
        f"{what}: {len(bad)} averaged tensors hold NaN or infinite values (e.g. {bad[:5]}): the "
        "live weights diverged during training (non-finite losses or gradients), and an average "
        "of non-finite weights is not usable"
    )


@dataclass(frozen=True)
class Selection:
    """Which of a module's tensors a weight average follows: by name pattern and trainability.

    Tensors left out are not copied at all: the average uses the live tensor for them (a frozen
    base is the same in both), which is what saves the memory of a LoRA or partially frozen
    model. Patterns are shell-style (``fnmatch``: ``"model.backbone.*"``), matched against the
    names of ``module.named_parameters()`` and ``named_buffers()``.

    Attributes:
        include: keep only tensors matching one of these patterns (None: all).
        exclude: then leave out tensors matching one of these patterns.
        trainable_only: leave out parameters with ``requires_grad=False`` (buffers stay).
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    trainable_only: bool = False

    @classmethod
    def of(
        cls,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        trainable_only: bool = False,
    ) -> Selection:
        """A selection from the options of a callback (lists, as LightningCLI gives them).

        Args:
            include: patterns of the tensors to keep (None: all).
            exclude: patterns of the tensors to leave out.
            trainable_only: leave out frozen parameters.

        Returns:
            The selection.

        Raises:
            ValueError: a pattern given as one string instead of a list, or an empty pattern.
        """
        for option, patterns in (("include", include), ("exclude", exclude)):
            if isinstance(patterns, str):
                raise ValueError(f"{option} takes a list of patterns, got the string {patterns!r}")
            if patterns is not None and not all(patterns):
                raise ValueError(f"{option} holds an empty pattern: {list(patterns)}")
        return cls(
            None if include is None else tuple(include), tuple(exclude or ()), trainable_only
        )

    @property
    def everything(self) -> bool:
        """Whether every tensor is kept (the default)."""
        return self.include is None and not self.exclude and not self.trainable_only

    def keeps(self, name: str, tensor: Tensor, is_parameter: bool) -> bool:
        """Whether the tensor named ``name`` is followed.

        Args:
            name: its name in the module.
            tensor: the tensor.
            is_parameter: a parameter (``trainable_only`` applies), not a buffer.

        Returns:
            True when it is followed.
        """
        if self.include is not None and not _matches(name, self.include):
            return False
        if _matches(name, self.exclude):
            return False
        return not (self.trainable_only and is_parameter and not tensor.requires_grad)

    def check(self, names: Sequence[str], who: str) -> None:
        """Refuse patterns that match none of ``names`` (a typo would silently change nothing).

        Args:
            names: the module's parameter and buffer names.
            who: the callback, named in the message.

        Raises:
            ValueError: naming the pattern and a few of the names.
        """
        for option, patterns in (("include", self.include or ()), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ValueError(
                        f"{who}({option}=[{pattern!r}, ...]): the pattern matches none of the "
                        f"module's {len(names)} tensors (e.g. {list(names)[:4]}); patterns are "
                        "shell-style, matched against full names such as 'model.layer.weight'"
                    )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def parse_dtype(name: str | None, who: str) -> torch.dtype | None:
    """The floating dtype named by a callback's ``dtype`` option (``"float32"``, ``"bfloat16"``).

    Args:
        name: the dtype's name (``torch.<name>``), or None.
        who: the callback, named in the message.

    Returns:
        The dtype, or None.

    Raises:
        ValueError: an unknown or non-floating dtype.
    """
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{who}(dtype={name!r}): not a floating torch dtype; use e.g. 'float32' (an fp32 "
            "average of bf16 or fp16 weights) or 'float64'"
        )
    return dtype


@dataclass(frozen=True)
class TrackedTensors:
    """The module tensors a shadow follows, by name: ``averaged`` ones and ``copied`` ones.

    A tensor shared by several submodules (tied weights) is tracked once, under its first name;
    ``aliases`` maps every other name of it to that one, so state dicts can be filled in for all.
    Build one with ``TrackedTensors.from_module``.

    Attributes:
        averaged_names: the names of the averaged tensors (parameters, statistics buffers).
        averaged: the averaged tensors, by position in ``averaged_names``.
        copied_names: the names of the copied tensors (every buffer ``averages_buffer`` does not
            average, and every buffer when buffers are not averaged).
        copied: the copied tensors, by position in ``copied_names``.
        aliases: every other name of a tied tensor, mapped to the name it is tracked under.
        sharded: the DTensors (FSDP2) whose local shards are tracked, by name.
        untracked: the module tensors a ``Selection`` left out, by name (the live ones: an
            average uses them as they are).
    """

    averaged_names: list[str]
    averaged: list[Tensor]
    copied_names: list[str]
    copied: list[Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    sharded: dict[str, Tensor] = field(default_factory=dict)
    untracked: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        average_buffers: bool = True,
        selection: Selection | None = None,
        who: str = "the average",
    ) -> TrackedTensors:
        """DTensor parameters (FSDP2) are tracked by their local shard, kept in ``sharded``;
        buffers are averaged by ``averages_buffer`` when ``average_buffers``, else copied;
        ``selection`` (checked against the module's names, naming ``who``) leaves tensors out."""
        selection = selection or Selection()
        if not selection.everything:
            names = [n for n, _ in module.named_parameters()]
            selection.check(names + [n for n, _ in module.named_buffers()], who)
        avg_names, avg, copy_names, copy = [], [], [], []
        sharded: dict[str, Tensor] = {}
        untracked: dict[str, Tensor] = {}
        for name, param in module.named_parameters():
            if not selection.keeps(name, param, is_parameter=True):
                untracked[name] = param
                continue
            if not param.is_floating_point():
                raise TypeError(f"parameter {name!r} is {param.dtype}; only float is supported")
            avg_names.append(name)
            avg.append(_local_view(name, param, sharded))
        for name, buf in module.named_buffers():
            if not selection.keeps(name, buf, is_parameter=False):
                untracked[name] = buf
            elif average_buffers and averages_buffer(name, buf):
                avg_names.append(name)
                avg.append(_local_view(name, buf, sharded))
            else:
                copy_names.append(name)
                copy.append(_local_view(name, buf, sharded))
        if not avg_names:
            raise ValueError(
                f"{who}: nothing left to average ({len(untracked)} tensors left out by "
                f"{selection}); widen include, exclude or trainable_only"
            )
        return cls(avg_names, avg, copy_names, copy, _aliases(module), sharded, untracked)

    def gather(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Full tensors from local shards of the tracked tensors (a collective when sharded:
        every rank must call it at the same point)."""
        return {
            name: gather_full(value, self.sharded[name]) if name in self.sharded else value
            for name, value in values.items()
        }

    @property
    def names(self) -> list[str]:
        return self.averaged_names + self.copied_names

    @property
    def tensors(self) -> list[Tensor]:
        """Averaged then copied tensors, in ``names`` order."""
        return self.averaged + self.copied

    def items(self) -> Iterator[tuple[str, Tensor]]:
        yield from zip(self.names, self.tensors)


class ShadowWeights:
    """An averaged copy of ``tracked`` stored on ``device`` (default: beside each tensor).

    Call ``wait()`` before reading the shadow's tensors directly when updates run in the
    background; the methods that read it wait by themselves, and ``close()`` ends the thread.

    Args:
        tracked: the module tensors to follow (``TrackedTensors.from_module``).
        device: where the shadow lives; None: on each tensor's own device. A CPU shadow of a GPU
            model saves GPU memory.
        background: run the averaging in a worker thread from pinned staging buffers, so the
            training step does not wait for it; None: exactly when the shadow is on another
            device than the module.
        dtype: the dtype of the averaged tensors (e.g. float32 for an average of bf16 weights,
            whose small updates bf16 would round away); None: each tensor's own.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> shadow = ShadowWeights(TrackedTensors.from_module(model))
        >>> before = shadow.state_dict()["bias"].clone()
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(1.0)
        >>> shadow.update_(0.75)  # a quarter of the way to the live weights
        >>> shadow.state_dict()["bias"] - before
        tensor([0.2500])
    """

    def __init__(
        self,
        tracked: TrackedTensors,
        device: torch.device | None = None,
        *,
        background: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.tracked = tracked
        with torch.no_grad():
            self.averaged = [_clone_to(t, device, dtype) for t in tracked.averaged]
            self.copied = [_clone_to(t, device) for t in tracked.copied]
        crosses_devices = any(s.device != t.device for s, t in zip(self.tensors, tracked.tensors))
        self.background = crosses_devices if background is None else background
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.background:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="lightning-ext-ema"
            )
            self._staged = [_empty_staging(s, t) for s, t in zip(self.averaged, tracked.averaged)]
            self._staged_copied = [
                _empty_staging(s, t) for s, t in zip(self.copied, tracked.copied)
            ]
        self._groups = group_by_device_and_dtype(self.averaged, tracked.averaged)
        if self.background:
            self._staged_groups = group_by_device_and_dtype(self.averaged, self._staged)

    @torch.no_grad()
    def update_(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live; copied tensors are copied."""
        if not self.background:
            for shadow_group, live_group in self._groups:
                ema_update_(shadow_group, live_group, decay, homogeneous=True)
            if self.copied:
                torch._foreach_copy_(self.copied, self.tracked.copied)
            return
        self.wait()  # the staging buffers are reused: the previous update must be done with them
        for stage, live in zip(self._staged + self._staged_copied, self.tracked.tensors):
            stage.copy_(live, non_blocking=True)
        event = None
        if any(t.is_cuda for t in self.tracked.averaged):
            event = torch.cuda.Event()
            event.record()
        assert self._executor is not None
        self._future = self._executor.submit(self._finish_update, event, decay)

    @torch.no_grad()
    def _finish_update(self, event: torch.cuda.Event | None, decay: float) -> None:
        if event is not None:
            event.synchronize()
        for shadow_group, staged_group in self._staged_groups:
            ema_update_(shadow_group, staged_group, decay, homogeneous=True)
        for shadow, stage in zip(self.copied, self._staged_copied):
            shadow.copy_(stage)

    def wait(self) -> None:
        """Block until a background update has finished (before any read of the shadow)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    @property
    def tensors(self) -> list[Tensor]:
        """Averaged then copied shadow tensors, in ``tracked.names`` order."""
        return self.averaged + self.copied

    @torch.no_grad()
    def copy_to_live_(self) -> None:
        self.wait()
        torch._foreach_copy_(self.tracked.tensors, self.tensors)

    @torch.no_grad()
    def copy_from_live_(self) -> None:
        self.wait()
        for shadow, live in zip(self.tensors, self.tracked.tensors):
            shadow.copy_(live)

    @torch.no_grad()
    def exchange_with_live_(self) -> None:
        """Swap storage with the live tensors (no copy, no allocation); calling twice restores.

        Only valid when every shadow tensor matches its live tensor's device and dtype.
        """
        self.wait()
        live = self.tracked.tensors
        shadow = self.tensors
        for i, tensor in enumerate(live):
            tensor.data, shadow[i] = shadow[i], tensor.data
        n = len(self.averaged)
        self.averaged[:], self.copied[:] = shadow[:n], shadow[n:]

    def averaged_state(self) -> dict[str, Tensor]:
        """The averaged shadow tensors (not the copied ones) by tracked name."""
        self.wait()
        return dict(zip(self.tracked.averaged_names, self.averaged))

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow by tracked name: local shards when the module is sharded."""
        self.wait()
        return dict(zip(self.tracked.names, self.tensors))

    def full_state_dict(self) -> dict[str, Tensor]:
        """The shadow with sharded tensors gathered whole (a collective when sharded)."""
        return self.tracked.gather(self.state_dict())

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor], what: str = "EMA state") -> None:
        """Copy ``state`` into the shadow, checking that it describes the same tensors."""
        self.wait()
        names = self.tracked.names
        missing = [n for n in names if n not in state]
        unexpected = [n for n in state if n not in set(names)]
        if missing or unexpected:
            raise ValueError(
                f"{what} does not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Was the checkpoint written for a different architecture?"
            )
        for name, shadow in zip(names, self.tensors):
            value = state[name]
            like = self.tracked.sharded.get(name)
            if like is not None and value.shape == like.shape:  # full tensor: keep our shard
                value = local_part(value, like)
            if value.shape != shadow.shape:
                raise ValueError(
                    f"{what}: tensor {name!r} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(shadow.shape)} in the model"
                )
            shadow.copy_(value)

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _local_view(name: str, tensor: Tensor, sharded: dict[str, Tensor]) -> Tensor:
    """The rank's local shard of a DTensor (a view sharing its storage), else the tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    sharded[name] = tensor
    with torch.no_grad():
        return tensor.to_local().detach()


def gather_full(local: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose shard on this rank is ``local``, sharded as the DTensor ``like``
    (an all-gather: every rank must call it). Booleans travel as bytes (gloo has no bool).

    Args:
        local: this rank's shard.
        like: the DTensor whose mesh, placements, shape and stride describe the sharding.

    Returns:
        The whole tensor, on every rank.
    """
    from torch.distributed.tensor import DTensor

    as_bool = local.dtype == torch.bool
    dtensor = DTensor.from_local(
        local.to(torch.uint8) if as_bool else local.detach(),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        shape=like.shape,
        stride=like.stride(),
        run_check=False,
    )
    full = dtensor.full_tensor()
    return full.bool() if as_bool else full


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's parameters and gradients).

    Args:
        tensor: any tensor.

    Returns:
        True for a DTensor.

    Examples:
        >>> import torch
        >>> is_dtensor(torch.zeros(2))
        False
    """
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's local shard of a DTensor, detached (a view of its storage, so writing into it
    writes the parameter); any other tensor as it is. No communication.

    Args:
        tensor: a DTensor or a plain tensor.

    Returns:
        The local shard, or ``tensor`` itself.
    """
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local().detach()  # type: ignore[attr-defined]


def local_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every DTensor replaced by this rank's local shard (a view of its storage,
    so writing into it writes the module), other tensors as they are. No communication.

    Args:
        state: a state dict, possibly of DTensors.

    Returns:
        A new dict of plain tensors.
    """
    return {name: local_shard(value) for name, value in state.items()}


def full_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every DTensor gathered whole (an all-gather per DTensor: every rank must
    call it at the same point); other tensors as they are (this rank's values).

    Args:
        state: a state dict, possibly of DTensors.

    Returns:
        A new dict of whole tensors.
    """
    from torch.distributed.tensor import DTensor

    return {
        name: gather_full(value.to_local(), value) if isinstance(value, DTensor) else value
        for name, value in state.items()
    }


def fsdp2_modules(module: nn.Module) -> list[Any]:
    """The FSDP2 (``fully_shard``-ed) modules in ``module``, root included; empty when none.

    Args:
        module: the model.

    Returns:
        The ``FSDPModule`` instances, in ``module.modules()`` order: what ``reshard`` takes.
    """
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(modules: list[Any]) -> None:
    """Free FSDP2's unsharded parameters, so that the next forward gathers the shards again.

    The root module keeps its gathered parameters after a forward (its backward would follow).
    After its shards were written (weights swapped, a soup loaded) or after a forward outside
    training, they would be stale or unexpected, and the next forward would read them.

    Args:
        modules: the FSDP2 modules (``fsdp2_modules``).
    """
    for module in modules:
        module.reshard()


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full``, split as the DTensor ``like`` is (no communication).

    Args:
        full: the whole tensor, the same on every rank.
        like: the DTensor whose mesh and placements describe the sharding.

    Returns:
        This rank's shard, on ``like``'s device.
    """
    from torch.distributed.tensor import distribute_tensor

    dtensor = distribute_tensor(
        full.to(like.device),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return dtensor.to_local()


def _clone_to(
    tensor: Tensor, device: torch.device | None, dtype: torch.dtype | None = None
) -> Tensor:
    target = tensor.device if device is None else device
    out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=target)
    return out.copy_(tensor.detach())


def _empty_staging(shadow: Tensor, live: Tensor) -> Tensor:
    """Host staging buffers are pinned so that device-to-host copies can be asynchronous."""
    pin = live.is_cuda and shadow.device.type == "cpu"
    return torch.empty(shadow.shape, dtype=shadow.dtype, device=shadow.device, pin_memory=pin)


def _aliases(module: nn.Module) -> dict[str, str]:
    """Every duplicate name of a shared parameter or buffer, mapped to its first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases
