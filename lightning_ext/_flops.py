"""Counting a sparse run's FLOPs (``functional.sparse_flops``) on the user's model: the dense
forward FLOPs of each sparse layer come from the first forward pass that uses it (a hook that
removes itself), so that convolutions and sequence layers count every output position."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_ext.functional.sparse import sparse_flops
from lightning_ext.functional.sparse_methods import SparseMethod


class LayerFlops:
    """Records, at the first forward of each module that owns one of ``weights``, its dense
    multiply-adds per sample: ``weight.numel()`` times the output positions per sample
    (``output.numel() / (batch * weight.shape[0])``: 1 for a Linear on vectors, tokens for a
    sequence, ``H * W`` for a convolution)."""

    def __init__(self, module: nn.Module, weights: Sequence[Tensor]) -> None:
        self.flops: list[float | None] = [None] * len(weights)
        index = {id(w): i for i, w in enumerate(weights)}
        self._handles: dict[int, RemovableHandle] = {}
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                i = index.get(id(p))
                if i is not None and i not in self._handles:
                    self._handles[i] = sub.register_forward_hook(self._hook(i, p))

    def _hook(self, i: int, weight: Tensor) -> Callable[[nn.Module, object, object], None]:
        def record(module: nn.Module, args: object, output: object) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            if self.flops[i] is None and isinstance(out, Tensor) and out.dim() >= 1:
                per_sample = out.numel() / max(1, out.shape[0])
                positions = per_sample / max(1, weight.shape[0]) if out.dim() > 1 else 1.0
                self.flops[i] = float(weight.numel()) * positions
                self._handles.pop(i).remove()  # once: no cost in later steps

        return record

    def remove(self) -> None:
        """Remove the hooks that are left."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def summary(
        self, densities: Sequence[float], spec: SparseMethod, steps: int, updates: int
    ) -> dict[str, float] | None:
        """``sparse_flops`` of the run, or None when a layer never ran forward."""
        if any(f is None for f in self.flops):
            return None
        if not spec.masks_gradients or spec.growth == "momentum" or spec.structured:
            dense_steps = steps  # the dense gradient every step
        elif spec.growth == "gradient":
            dense_steps = min(updates, steps)  # only at the mask updates
        else:
            dense_steps = 0
        return sparse_flops(
            [float(f) for f in self.flops if f is not None],
            densities,
            steps=steps,
            dense_gradient_steps=dense_steps,
        )
