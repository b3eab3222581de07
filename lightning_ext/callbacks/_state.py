"""Callback state declared once.

Lightning stores ``callback.state_dict()`` in the checkpoint and hands it back to
``load_state_dict`` on resume. Written by hand, the two lists drift apart: a field saved but not
restored resumes silently wrong. A callback names its checkpointed attributes once, in ``STATE``,
and both directions follow from it; state that needs more than a copy (weights gathered from
shards, restored lazily once the model exists) is added by overriding and calling ``super()``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

# An entry is the attribute name, or (checkpoint key, attribute name) when they differ.
StateEntry = str | tuple[str, str]


def snapshot(value: Any) -> Any:
    """A copy that later in-place changes of the callback cannot reach: containers are rebuilt,
    tensors detached and cloned, immutable values shared."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple):
        return tuple(snapshot(item) for item in value)
    return value


class DeclaredState:
    """Mixin giving ``state_dict``/``load_state_dict`` from the class attribute ``STATE``.

    A key missing from a checkpoint (written before the field existed) leaves the attribute at the
    value the constructor gave it. ``_after_load_state`` runs after every load, for caches that
    depend on the restored values.
    """

    STATE: ClassVar[tuple[StateEntry, ...]] = ()

    @classmethod
    def _state_entries(cls) -> list[tuple[str, str]]:
        return [(e, e) if isinstance(e, str) else e for e in cls.STATE]

    def state_dict(self) -> dict[str, Any]:
        return {key: snapshot(getattr(self, attr)) for key, attr in self._state_entries()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, attr in self._state_entries():
            if key in state_dict:
                setattr(self, attr, snapshot(state_dict[key]))
        self._after_load_state()

    def _after_load_state(self) -> None:
        """Called after ``load_state_dict``; nothing by default."""
