"""Streaming ingredients for model soups and merges: state dicts, modules, checkpoint files or
distributed checkpoint folders, loaded one at a time and validated against the first.

``Ingredients`` is a lazy ``Sequence`` of state dicts that the functions of
``lightning_ext.functional.merging`` consume one element at a time, so a soup of 50 checkpoints
needs the memory of the soup and one checkpoint, not 50. Pure torch: no Lightning import (a
Lightning checkpoint is a ``torch.save``'d dict whose weights sit under ``"state_dict"``; a
sharded one, e.g. ``ModelParallelStrategy``'s, is a ``torch.distributed.checkpoint`` folder with
the weights under the same key, read whole by ``lightning_ext.io.distributed_checkpoint``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor, nn

from lightning_ext._finite import (
    Pattern,
    check_finite,
    disagreeing,
    nonfinite_pattern,
    refuse_nonfinite,
    restore_nonfinite,
)
from lightning_ext._io import load_file
from lightning_ext.functional.merging import check_same_layout
from lightning_ext.io import distributed_checkpoint, safetensors

__all__ = ["IngredientSource", "IngredientSubset", "Ingredients", "load_state_dict"]

IngredientSource = Mapping[str, Tensor] | nn.Module | str | os.PathLike


def load_state_dict(
    source: IngredientSource,
    *,
    key: str | None = "state_dict",
    map_location: str | torch.device = "cpu",
    mmap: bool = True,
    trusted: bool = False,
) -> dict[str, Tensor]:
    """The state dict of one ingredient.

    A checkpoint file may hold a Lightning checkpoint (weights under ``key``) or a bare state
    dict. Files are memory-mapped by default, so validating layouts reads no tensor data, and
    loaded with ``weights_only=True`` (no code from the file is executed) unless ``trusted``.
    A ``.safetensors`` file or ``.safetensors.index.json`` index is the state dict itself (no
    code can be in it, so ``trusted`` does not matter). A folder is either a Hugging Face-style
    model folder (``model.safetensors`` or its sharded index inside) or a distributed checkpoint
    (``torch.distributed.checkpoint``, as ``ModelParallelStrategy`` writes): its weights under
    ``key`` are gathered into full tensors in this process, without a process group (see
    ``load_distributed_checkpoint``).

    Args:
        source: a state dict, a module, the path of a checkpoint, state-dict or safetensors
            file, or of a Hugging Face-style or distributed checkpoint folder.
        key: the entry of a checkpoint that holds the weights.
        map_location: where loaded tensors go.
        mmap: memory-map the file (a folder's shards are read, not mapped).
        trusted: allow files (a folder's ``.metadata``) that pickle arbitrary objects.

    Returns:
        The state dict (a new dict; tensors of a given state dict are not copied).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file that holds neither a checkpoint with ``key`` nor a state dict, or a
            folder that is not a distributed checkpoint of tensors (the message names it).

    Examples:
        >>> import torch
        >>> sorted(load_state_dict(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir() and safetensors.hf_weights_file(path) is not None:
        return safetensors.load_safetensors(path, map_location=map_location)
    if path.is_dir():
        return distributed_checkpoint.load_distributed_checkpoint(
            path, key=key, map_location=map_location, trusted=trusted
        )
    if not path.is_file():
        raise FileNotFoundError(f"ingredient checkpoint not found: {path}")
    obj = load_file(path, trusted=trusted, map_location=map_location, mmap=mmap)
    if isinstance(obj, Mapping) and key is not None and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a Lightning checkpoint with a '{key}' entry or a state dict of "
            "tensors"
        )
    return dict(obj)


def _is_safetensors(path: Path) -> bool:
    if path.is_dir():
        return safetensors.hf_weights_file(path) is not None
    return safetensors.is_safetensors_path(path) and path.is_file()


def _describe(source: IngredientSource, index: int) -> str:
    if isinstance(source, str | os.PathLike):
        return f"ingredient {index} ({os.fspath(source)})"
    if isinstance(source, nn.Module):
        return f"ingredient {index} ({type(source).__name__} module)"
    return f"ingredient {index} (state dict)"


def _warn_repeated_files(sources: list[Any]) -> None:
    """A file given twice (a glob and a name that overlap) counts twice in every average: said,
    naming it, since it is rarely meant."""
    first: dict[Path, int] = {}
    for i, source in enumerate(sources):
        if not isinstance(source, (str, os.PathLike)):
            continue
        j = first.setdefault(Path(source).resolve(), i)
        if j != i:
            warnings.warn(
                f"ingredients {j} and {i} are the same file ({os.fspath(source)}): it counts "
                "twice in the merge",
                stacklevel=3,
            )


class Ingredients(Sequence):
    """A lazy, validated sequence of state dicts.

    ``ingredients[i]`` loads ingredient ``i`` (from disk, for paths) and checks its keys, shapes
    and dtypes against ingredient 0, raising ``ValueError`` that names the file and the tensor.
    ``validate()`` checks them all up front (files memory-mapped, distributed checkpoint folders
    from their ``.metadata``), which the soup APIs do before any averaging or evaluation.

    ``strip_prefix`` removes a key prefix (e.g. ``"model."`` when checkpoints wrap the network),
    ``map_location`` places loaded tensors and ``trusted=True`` allows checkpoints that pickle
    arbitrary objects (e.g. custom classes in ``hyper_parameters``).

    Non-finite weights (NaN, inf: a diverged run) are refused naming the ingredient and the
    tensors (``lightning_ext._finite``), unless ``allow_nonfinite=True``; +-inf entries identical
    in every ingredient (an additive mask buffer) are legitimate, and ``restore_nonfinite`` copies
    them into a merge instead of averaging them.

    Args:
        sources: state dicts, modules, or paths of files holding them (checkpoints or bare
            state dicts) or of distributed checkpoint folders (e.g. ``ModelParallelStrategy``'s).
        key: the entry of a loaded checkpoint dict that holds the weights (None: the file is the
            state dict itself; a file without ``key`` is taken as the state dict too).
        strip_prefix: a key prefix to remove from every tensor name.
        map_location: where loaded tensors go.
        mmap: memory-map the files (no tensor data read until used).
        trusted: allow checkpoints that pickle arbitrary objects (see ``load_file``).
        allow_nonfinite: accept NaN and inf weights.

    Raises:
        ValueError: no sources; on access, an ingredient whose layout differs from the first,
            a folder that is not a distributed checkpoint, or (``NonFiniteError``) non-finite
            weights.
        FileNotFoundError: on access, a path that does not exist.
        IndexError: an index out of range.

    Examples:
        >>> import torch
        >>> ingredients = Ingredients([{"w": torch.zeros(2)}, {"w": torch.ones(2)}]).validate()
        >>> len(ingredients), ingredients[1]["w"]
        (2, tensor([1., 1.]))
    """

    def __init__(
        self,
        sources: Iterable[IngredientSource],
        *,
        key: str | None = "state_dict",
        strip_prefix: str | None = None,
        map_location: str | torch.device = "cpu",
        mmap: bool = True,
        trusted: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("no ingredients given (an empty list)")
        _warn_repeated_files(self.sources)
        self.key, self.strip_prefix = key, strip_prefix
        self.map_location, self.mmap, self.trusted = map_location, mmap, trusted
        self.allow_nonfinite = allow_nonfinite
        self._layout: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._reference: Pattern | None = None  # ingredient 0's non-finite entries
        self._values_checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.sources)

    def like(self, sources: Iterable[IngredientSource]) -> Ingredients:
        """Other sources read the way these are (same ``key``, ``strip_prefix``, location and
        trust): a merge's base must be normalised as its ingredients are, or their names differ.
        Their values are not checked alone: ``check_base`` checks a base against these.

        Args:
            sources: the files, folders, modules or state dicts to read.

        Returns:
            A new ``Ingredients`` with these settings.
        """
        return Ingredients(
            sources,
            key=self.key,
            strip_prefix=self.strip_prefix,
            map_location=self.map_location,
            mmap=self.mmap,
            trusted=self.trusted,
            allow_nonfinite=True,
        )

    def load_base(self, base: IngredientSource) -> dict[str, Tensor]:
        """A merge's base, read as the ingredients are and checked against them (layout and
        non-finite values: the base is one more input).

        Args:
            base: the pre-trained weights (a path or folder, state dict or module).

        Returns:
            Its state dict.

        Raises:
            ValueError: a layout that differs from the ingredients', or non-finite weights not
                shared by every ingredient (``NonFiniteError``).
        """
        state = self.like([base])[0]
        name = f"base ({os.fspath(base)})" if isinstance(base, str | os.PathLike) else "base"
        check_same_layout(state, self[0], name=self.name(0), ref_name=name)
        if not self.allow_nonfinite:
            reference = self.shared_nonfinite()
            pattern = check_finite(state, name, others=[reference])
            refuse_nonfinite(disagreeing(reference, [pattern]), self.name(0))
        return state

    def shared_nonfinite(self) -> Pattern:
        """The +-inf entries every ingredient shares (legitimate buffers, e.g. additive masks),
        from ingredient 0; ``restore_nonfinite`` copies them into a merge.

        Returns:
            ``{name: (flat positions, values)}``; empty when every weight is finite.
        """
        if self._reference is None:
            self._reference = nonfinite_pattern(self._load(0))
        return self._reference

    def restore_nonfinite(self, merged: dict[str, Tensor]) -> dict[str, Tensor]:
        """``merged`` with the shared +-inf entries copied in, never averaged (see
        ``shared_nonfinite``); unchanged with ``allow_nonfinite``.

        Args:
            merged: a merge of these ingredients.

        Returns:
            ``merged``.
        """
        if self.allow_nonfinite:
            return merged
        return restore_nonfinite(merged, self.shared_nonfinite())

    def _check_values(self, sd: Mapping[str, Tensor], index: int) -> None:
        """Refuse non-finite weights, checked once per ingredient and in both directions against
        ingredient 0: a tensor is legitimate only when every ingredient holds the same +-inf
        entries (with one ingredient, never). Meta tensors (a folder's layout) wait for data."""
        if self.allow_nonfinite or index in self._values_checked:
            return
        if any(v.device.type == "meta" for v in sd.values()):
            return
        if index == 0:
            self._reference = nonfinite_pattern(sd)
            if len(self) == 1:
                refuse_nonfinite(disagreeing(self._reference, []), self.name(0))
        else:
            reference = self.shared_nonfinite()
            pattern = check_finite(sd, self.name(index), others=[reference])
            refuse_nonfinite(disagreeing(reference, [pattern]), self.name(0))
        self._values_checked.add(index)

    def name(self, index: int) -> str:
        return _describe(self.sources[index], index)

    def _load(self, index: int, *, data: bool = True) -> dict[str, Tensor]:
        """Ingredient ``index`` with the key normalisation; ``data=False`` may give meta tensors
        (a distributed checkpoint folder's layout, read from its metadata)."""
        source = self.sources[index]
        path = Path(source) if isinstance(source, str | os.PathLike) else None
        if not data and path is not None and _is_safetensors(path):
            sd = safetensors.read_safetensors_layout(path)
        elif not data and path is not None and path.is_dir():
            sd = distributed_checkpoint.read_layout(path, key=self.key, trusted=self.trusted)
        else:
            sd = load_state_dict(
                source,
                key=self.key,
                map_location=self.map_location,
                mmap=self.mmap,
                trusted=self.trusted,
            )
        if self.strip_prefix:
            p = self.strip_prefix
            sd = {k[len(p) :] if k.startswith(p) else k: v for k, v in sd.items()}
        return sd

    @overload
    def __getitem__(self, index: int) -> dict[str, Tensor]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Tensor]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"ingredient index {index} out of range for {len(self)}")
        sd = self._load(index)
        self._check_against_first(sd, index)
        self._check_values(sd, index)
        return sd

    def _check_against_first(self, sd: Mapping[str, Tensor], index: int) -> None:
        if self._layout is None:
            self._check(sd if index == 0 else self._load(0, data=False), 0)
        self._check(sd, index)

    def _check(self, sd: Mapping[str, Tensor], index: int) -> None:
        if self._layout is None:
            self._layout = {k: (v.shape, v.dtype) for k, v in sd.items()}
            return
        # Compare against meta tensors of the first layout: no data held for the reference.
        reference = {
            k: torch.empty(shape, dtype=dtype, device="meta")
            for k, (shape, dtype) in self._layout.items()
        }
        check_same_layout(reference, sd, name=self.name(index), ref_name=self.name(0))

    def subset(self, indices: Sequence[int]) -> IngredientSubset:
        """A lazy view of the ingredients at ``indices`` (repeats allowed), still loaded one at a
        time: the soup of a greedy choice is ``uniform_soup(ingredients.subset(chosen))``."""
        return IngredientSubset(self, indices)

    def validate(self) -> Ingredients:
        """Check every ingredient's layout against the first (files memory-mapped, safetensors
        by their headers, folders described by their metadata) and its values for NaN and inf
        (one pass over each file; a distributed checkpoint folder's when its data is read),
        before any merging or scoring.

        Returns:
            ``self``.

        Raises:
            ValueError: a layout that differs from the first, or non-finite weights.
        """
        for i in range(len(self)):
            sd = self._load(i, data=False)
            self._check_against_first(sd, i)
            source = self.sources[i]
            if (
                not self.allow_nonfinite
                and isinstance(source, str | os.PathLike)
                and _is_safetensors(Path(source))
            ):  # the layout came from the headers: the values are read once here
                sd = self._load(i)
            self._check_values(sd, i)
        return self


class IngredientSubset(Sequence):
    """``parent[indices[i]]`` on access; see ``Ingredients.subset``.

    A view, not a copy: a lazy parent still loads each ingredient only when it is read.

    Args:
        parent: the ingredients to choose from (an ``Ingredients`` or any sequence).
        indices: the chosen positions in ``parent``, in the order the subset yields them.

    Examples:
        >>> subset = IngredientSubset(["a", "b", "c"], [2, 0])
        >>> len(subset), subset[0]
        (2, 'c')
    """

    def __init__(self, parent: Sequence, indices: Sequence[int]) -> None:
        self.parent, self.indices = parent, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    # Sequence also takes slices; the soup code indexes ingredients one at a time.
    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return self.parent[self.indices[index]]
