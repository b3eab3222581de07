"""The table of merge methods: one entry per way of merging state dicts, naming its function,
whether it needs the base (pre-trained) model, its options with defaults and valid ranges, and
its paper.

The command line (``lightning-ext soup``), ``build_soup``/``run_soup`` and the docs all read this
table, so a method added here is reachable everywhere, options are validated before any
checkpoint is read or any candidate scored, and the documented defaults are the ones that run.
Errors are worded in the caller's vocabulary through a ``Spelling``: ``density`` in Python
(``PYTHON_SPELLING``, the default), ``--density`` on the command line (``CLI_SPELLING``, defined
by the CLI in ``lightning_ext.cli._options``).

Merges that need more than state dicts are not entries: the greedy and learned soups need a model
and held-out data (``lightning_ext.workflows.soup.run_soup``), Fisher merging needs one Fisher per
ingredient (``functional.fisher_merge``).

Pure torch: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_ext.functional import merging
from lightning_ext.functional.interpolation import multi_slerp, slerp

__all__ = [
    "MERGE_METHODS",
    "PYTHON_SPELLING",
    "MergeMethod",
    "Parameter",
    "Spelling",
    "get_merge_method",
    "resolve_options",
]

StateDict = Mapping[str, Tensor]
Kind = Literal["float", "int", "bool", "floats", "gradients", "choice", "callable"]


@dataclass(frozen=True)
class Spelling:
    """How error messages name options: ``density`` in Python, ``--density`` on the command line,
    so that a message tells the user exactly what to type.

    Attributes:
        option: formats an option's name.
        choice: formats a choice of a named option, e.g. ``method='ties'`` or ``--method ties``.

    Examples:
        >>> PYTHON_SPELLING.option("density"), PYTHON_SPELLING.choice("method", "ties")
        ('density', "method='ties'")
    """

    option: Callable[[str], str]
    choice: Callable[[str, str], str]


PYTHON_SPELLING = Spelling(option=lambda name: name, choice=lambda name, v: f"{name}={v!r}")


@dataclass(frozen=True)
class Parameter:
    """One option of a method: its kind, default (or ``required``) and valid range.

    Attributes:
        name: the keyword (and, with ``--``, the command-line option).
        help: what it means, in a few words.
        kind: ``"float"``, ``"int"``, ``"bool"``, ``"floats"`` (one per ingredient),
            ``"gradients"`` (one per ingredient, each a number or a list of anchors over depth,
            see ``merging.gradient_value``), ``"choice"`` (one of ``choices``) or
            ``"callable"``.
        default: the value used when the option is not given (None: not used).
        required: the method cannot run without it.
        low: the lower bound of a number (of every entry for ``"floats"``), None: none.
        high: the upper bound, None: none.
        low_open: ``low`` itself is excluded.
        high_open: ``high`` itself is excluded.
        choices: the valid values of a ``"choice"``.
        nullable: None may be given explicitly, meaning "off" (e.g. no seeding); parameters
            whose default is None accept it anyway.

    Examples:
        >>> density = Parameter("density", "kept fraction", default=0.2, low=0, high=1,
        ...                     low_open=True)
        >>> density.range_text(), density.check(0.5)
        ('(0, 1]', 0.5)
    """

    name: str
    help: str
    kind: Kind = "float"
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def range_text(self) -> str:
        """The valid values in a few characters: ``(0, 1]``, ``>= 1``, ``one of a, b``."""
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.kind == "callable":
            return "a callable"
        prefix = "each " if self.kind in ("floats", "gradients") else ""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{prefix}{left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{prefix}{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{prefix}{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any"

    def check(self, value: Any, spelling: Spelling = PYTHON_SPELLING) -> Any:
        """``value`` converted to the parameter's kind, or ``ValueError`` naming the option and
        the valid range.

        Args:
            value: the value given.
            spelling: how the message names the option.

        Returns:
            The value as a float, int, bool, list of floats (or of anchor lists), choice or
            callable.

        Raises:
            ValueError: a value of another kind or outside the valid range.
        """
        name = spelling.option(self.name)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.kind == "callable":
            if not callable(value):
                raise ValueError(f"{name} must be a callable, got {value!r}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            return value
        if self.kind == "floats":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise ValueError(f"{name} must be a list of numbers, got {value!r}")
            return [self._number(v, name) for v in value]
        if self.kind == "gradients":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise ValueError(f"{name} must be a list (one entry per ingredient), got {value!r}")
            return [self._gradient(v, name) for v in value]
        return self._number(value, name)

    def _gradient(self, value: Any, name: str) -> Any:
        """A number, a non-empty list of numbers (anchors interpolated over depth), or a mapping
        from tensor-name filters to either."""
        if isinstance(value, Mapping):
            if not value or not all(isinstance(k, str) for k in value):
                raise ValueError(
                    f"{name}: a per-tensor entry maps name filters (strings) to weights"
                )
            return {k: self._gradient(v, name) for k, v in value.items() if self._flat(v, name)}
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            return self._number(value, name)
        anchors = [self._number(v, name) for v in value]
        if not anchors:
            raise ValueError(f"{name}: an entry is an empty list of anchors")
        return [float(a) for a in anchors]

    def _flat(self, value: Any, name: str) -> bool:
        if isinstance(value, Mapping):
            raise ValueError(f"{name}: per-tensor filters cannot nest")
        return True

    def _number(self, value: Any, name: str) -> float | int:
        integral = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, Integral if integral else Real):
            raise ValueError(
                f"{name} must be {'an integer' if integral else 'a number'}, got {value!r}"
            )
        number: float | int = int(value) if integral else float(value)  # type: ignore[call-overload]
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if too_low or too_high:
            if self.low is not None and self.high is not None:
                raise ValueError(f"{name} must lie in {self.range_text()}, got {value}")
            raise ValueError(f"{name} must be {self.range_text()}, got {value}")
        return number


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def resolve_options(
    owner: str,
    parameters: Sequence[Parameter],
    options: Mapping[str, Any] | None,
    spelling: Spelling = PYTHON_SPELLING,
) -> dict[str, Any]:
    """Every parameter's value: the given one checked, or its default; refuse options the owner
    does not take and missing required ones, naming the valid options.

    Args:
        owner: how messages name the method, e.g. ``"method='ties'"``.
        parameters: the owner's parameters.
        options: the values given (None: none).
        spelling: how messages name the options.

    Returns:
        Every parameter's name mapped to its checked value or default.

    Raises:
        ValueError: an unknown option, a missing required one, or a value out of range.

    Examples:
        >>> scale = Parameter("scale", "task-vector factor", default=1.0)
        >>> resolve_options("method='task-arithmetic'", [scale], {})
        {'scale': 1.0}
    """
    options = dict(options or {})
    known = {p.name: p for p in parameters}
    unknown = [k for k in options if k not in known]
    if unknown:
        valid = ", ".join(spelling.option(p.name) for p in parameters) or "none"
        raise ValueError(
            f"{owner} takes no option {', '.join(spelling.option(k) for k in unknown)}; "
            f"its options: {valid}"
        )
    resolved: dict[str, Any] = {}
    for p in parameters:
        value = options.get(p.name)
        if value is None and p.required:
            raise ValueError(
                f"{owner} needs {spelling.option(p.name)} ({p.help}, {p.range_text()})"
            )
        if p.name not in options:
            resolved[p.name] = p.default
        elif value is None:
            if not (p.nullable or p.default is None):
                raise ValueError(
                    f"{spelling.option(p.name)} must be {p.range_text()} (default {p.default}), "
                    "not None"
                )
            resolved[p.name] = None
        else:
            resolved[p.name] = p.check(value, spelling)
    return resolved


MergeCall = Callable[[Sequence[StateDict], "StateDict | None", dict[str, Any]], dict]
Constraint = Callable[[dict[str, Any], int, bool, Spelling], None]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method of the table.

    Attributes:
        name: the name users pass (``method="ties"``, ``--method ties``).
        function: the public function of ``lightning_ext.functional`` that does the math.
        summary: what it computes, in one line.
        reference: the paper.
        base: ``"required"`` (task-vector methods), ``"optional"`` or ``"unused"``.
        parameters: its options, with defaults and valid ranges.
        call: ``call(state_dicts, base, options)``: runs ``function`` with checked options.
        min_ingredients: the fewest ingredients it can merge.
        constraint: checks that involve several options or the ingredients' number, given
            ``(options, num_ingredients, has_base, spelling)``.

    Examples:
        >>> import torch
        >>> ties = MERGE_METHODS["ties"]
        >>> ties.base, [p.name for p in ties.parameters]
        ('required', ['density', 'scale'])
        >>> a, b = {'w': torch.tensor([1.0, -2.0])}, {'w': torch.tensor([3.0, 2.0])}
        >>> ties.merge([a, b], base={'w': torch.zeros(2)}, options={"density": 1.0})['w']
        tensor([2., 2.])
    """

    name: str
    function: Callable[..., Any]
    summary: str
    reference: str
    base: Literal["required", "optional", "unused"]
    parameters: tuple[Parameter, ...]
    call: MergeCall
    min_ingredients: int = 1
    constraint: Constraint | None = None

    def resolve(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        num_ingredients: int | None = None,
        has_base: bool | None = None,
        spelling: Spelling = PYTHON_SPELLING,
    ) -> dict[str, Any]:
        """Check the options (and, when known, the number of ingredients and whether a base is
        given) before any work; return every option's value, defaults filled in.

        Args:
            options: the options given.
            num_ingredients: the number of ingredients (None: not known yet).
            has_base: whether a base model is given (None: not known yet).
            spelling: how messages name the options.

        Returns:
            Every option's value.

        Raises:
            ValueError: an unknown or out-of-range option, a missing base or required option, a
                base the method does not use, or too few ingredients.
        """
        owner = spelling.choice("method", self.name)
        resolved = resolve_options(owner, self.parameters, options, spelling)
        if has_base is not None:
            if self.base == "required" and not has_base:
                raise ValueError(
                    f"{owner} needs {spelling.option('base')} (the pre-trained model the "
                    "ingredients were fine-tuned from)"
                )
            if self.base == "unused" and has_base:
                users = sorted(m.name for m in MERGE_METHODS.values() if m.base != "unused")
                raise ValueError(f"{spelling.option('base')} is only used by {users}, not {owner}")
        if num_ingredients is not None:
            if num_ingredients < self.min_ingredients:
                raise ValueError(
                    f"{owner} needs at least {self.min_ingredients} ingredients, "
                    f"got {num_ingredients}"
                )
            for p in self.parameters:
                value = resolved[p.name]
                per_ingredient = p.kind in ("floats", "gradients")
                if per_ingredient and value is not None and len(value) != num_ingredients:
                    raise ValueError(
                        f"{spelling.option(p.name)}: got {len(value)} values for "
                        f"{num_ingredients} ingredients (give one per ingredient)"
                    )
            if self.constraint is not None and has_base is not None:
                self.constraint(resolved, num_ingredients, has_base, spelling)
        return resolved

    def merge(
        self,
        state_dicts: Sequence[StateDict],
        *,
        base: StateDict | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict:
        """Check the options, then merge ``state_dicts`` (a lazy sequence streams).

        Args:
            state_dicts: the ingredients.
            base: the pre-trained weights, for methods that use them.
            options: the method's options (defaults for the others).

        Returns:
            The merged state dict.

        Raises:
            ValueError: see ``resolve``.
        """
        resolved = self.resolve(
            options, num_ingredients=len(state_dicts), has_base=base is not None
        )
        return self.call(state_dicts, base, resolved)


# --------------------------------------------------------------------------- the table

_DENSITY: dict[str, Any] = dict(
    help="fraction of each task vector kept", low=0.0, high=1.0, low_open=True
)
_SCALE = Parameter("scale", "factor of the merged task vector", default=1.0)


def _needs_base(base: StateDict | None) -> StateDict:
    assert base is not None, "resolve() refuses a missing base first"
    return base


def _largest(weight: Any) -> float:
    """The largest value a weight takes anywhere (a number, anchors, or per-tensor filters)."""
    if isinstance(weight, Mapping):
        return max(_largest(w) for w in weight.values())
    return max(weight) if isinstance(weight, list) else weight


def _positive_weights(options: dict[str, Any], n: int, has_base: bool, spelling: Spelling) -> None:
    weights = options.get("weights")
    if weights is not None and sum(_largest(w) for w in weights) <= 0:
        raise ValueError(f"{spelling.option('weights')} must not all be 0, got {weights}")


def _slerp_constraint(options: dict[str, Any], n: int, has_base: bool, spelling: Spelling) -> None:
    _positive_weights(options, n, has_base, spelling)
    if has_base:
        return
    owner, base = spelling.choice("method", "slerp"), spelling.option("base")
    if n > 2:
        raise ValueError(f"{owner} of more than 2 checkpoints needs {base} (multi-SLERP)")
    if options["weights"] is not None:
        raise ValueError(
            f"{owner} with {spelling.option('weights')} needs {base} (multi-SLERP of task vectors)"
        )


def _slerp_call(sds: Sequence[StateDict], base: StateDict | None, o: dict[str, Any]) -> dict:
    """Two ingredients: SLERP at ``t`` (of task vectors with a base); more: multi-SLERP."""
    if len(sds) == 2 and o["weights"] is None:
        return dict(slerp(sds[0], sds[1], o["t"], base=base))
    return dict(multi_slerp(_needs_base(base), [sds[i] for i in range(len(sds))], o["weights"]))


def _dare_call(sds: Sequence[StateDict], base: StateDict | None, o: dict[str, Any]) -> dict:
    generator = torch.Generator().manual_seed(o["seed"])
    return merging.dare_merge(
        _needs_base(base), sds, o["density"], scale=o["scale"], generator=generator
    )


_TV_WEIGHTS = Parameter(
    "weights",
    "one weight per ingredient's task vector, a number or anchors over depth",
    kind="gradients",
    low=0,
)
_RESCALE = Parameter(
    "rescale",
    "how survivors are rescaled: inverse = 1/keep probability (the papers), l1 = to the former "
    "L1 norm (mergekit)",
    kind="choice",
    default="inverse",
    choices=("inverse", "l1", "none"),
)
_NORMALIZE = Parameter(
    "normalize",
    "divide by the agreeing ingredients' total weight (disjoint mean); false sums them",
    kind="bool",
    default=True,
)


def _dare_ties_call(sds: Sequence[StateDict], base: StateDict | None, o: dict[str, Any]) -> dict:
    return merging.dare_ties_merge(
        _needs_base(base),
        sds,
        o["density"],
        scale=o["scale"],
        generator=torch.Generator().manual_seed(o["seed"]),
        weights=o["weights"],
        rescale=o["rescale"],
        normalize=o["normalize"],
    )


def _della_call(sds: Sequence[StateDict], base: StateDict | None, o: dict[str, Any]) -> dict:
    return merging.della_merge(
        _needs_base(base),
        sds,
        o["density"],
        epsilon=o["epsilon"],
        scale=o["scale"],
        generator=torch.Generator().manual_seed(o["seed"]),
        weights=o["weights"],
        rescale=o["rescale"],
        normalize=o["normalize"],
    )


def _della_constraint(options: dict[str, Any], n: int, has_base: bool, spelling: Spelling) -> None:
    _positive_weights(options, n, has_base, spelling)
    density, epsilon = options["density"], options["epsilon"]
    if density < 1.0 and not (density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError(
            f"{spelling.option('density')} +/- {spelling.option('epsilon')} must lie in (0, 1], "
            f"got {density} +/- {epsilon}"
        )


def _breadcrumbs_constraint(
    options: dict[str, Any], n: int, has_base: bool, spelling: Spelling
) -> None:
    if options["density"] + options["gamma"] > 1.0:
        raise ValueError(
            f"{spelling.option('density')} + {spelling.option('gamma')} must be <= 1, got "
            f"{options['density']} + {options['gamma']}"
        )


_TABLE = (
    MergeMethod(
        name="uniform",
        function=merging.uniform_soup,
        summary="the plain mean of the ingredients",
        reference="Wortsman et al. 2022, Model soups",
        base="unused",
        parameters=(),
        call=lambda sds, base, o: merging.uniform_soup(sds),
    ),
    MergeMethod(
        name="weighted",
        function=merging.weighted_average,
        summary="the weighted mean, weights normalised to sum to 1",
        reference="Wortsman et al. 2022, Model soups",
        base="unused",
        parameters=(
            Parameter(
                "weights",
                "one weight per ingredient, a number or anchors over depth (0,1 rises with depth)",
                kind="gradients",
                required=True,
                low=0,
            ),
        ),
        call=lambda sds, base, o: merging.weighted_average(sds, o["weights"]),
        constraint=_positive_weights,
    ),
    MergeMethod(
        name="task-arithmetic",
        function=merging.task_arithmetic,
        summary="base + scale * the sum of the task vectors",
        reference="Ilharco et al. 2023, Editing models with task arithmetic",
        base="required",
        parameters=(_SCALE,),
        call=lambda sds, base, o: merging.task_arithmetic(_needs_base(base), sds, o["scale"]),
    ),
    MergeMethod(
        name="ties",
        function=merging.ties_merge,
        summary="trim each task vector, elect signs, disjoint mean",
        reference="Yadav et al. 2023, TIES-Merging",
        base="required",
        parameters=(Parameter("density", default=0.2, **_DENSITY), _SCALE),
        call=lambda sds, base, o: merging.ties_merge(
            _needs_base(base), sds, density=o["density"], scale=o["scale"]
        ),
    ),
    MergeMethod(
        name="dare",
        function=merging.dare_merge,
        summary="drop task-vector entries at random, rescale the rest by 1/density",
        reference="Yu et al. 2024, Language models are Super Mario (DARE)",
        base="required",
        parameters=(
            Parameter("density", required=True, **_DENSITY),
            _SCALE,
            Parameter("seed", "seed of the drop masks", kind="int", default=0),
        ),
        call=_dare_call,
    ),
    MergeMethod(
        name="dare-ties",
        function=merging.dare_ties_merge,
        summary="DARE's random drop and rescale, then TIES's sign election and disjoint merge",
        reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES)",
        base="required",
        parameters=(
            Parameter("density", required=True, **_DENSITY),
            _SCALE,
            Parameter("seed", "seed of the drop masks", kind="int", default=0),
            _TV_WEIGHTS,
            _RESCALE,
            _NORMALIZE,
        ),
        call=_dare_ties_call,
        constraint=_positive_weights,
    ),
    MergeMethod(
        name="della",
        function=merging.della_merge,
        summary="drop at random with probabilities ranked by magnitude, rescale, elect signs, "
        "disjoint merge",
        reference="Deep et al. 2024, DELLA-Merging",
        base="required",
        parameters=(
            Parameter("density", required=True, **_DENSITY),
            Parameter(
                "epsilon",
                "half the spread of DELLA's keep probabilities around density",
                default=0.15,
                low=0,
            ),
            _SCALE,
            Parameter("seed", "seed of the drop masks", kind="int", default=0),
            _TV_WEIGHTS,
            _RESCALE,
            _NORMALIZE,
        ),
        call=_della_call,
        constraint=_della_constraint,
    ),
    MergeMethod(
        name="breadcrumbs",
        function=merging.breadcrumbs_merge,
        summary="keep a band of task-vector magnitudes: drop the top gamma and the smallest",
        reference="Davari & Belilovsky 2024, Model Breadcrumbs",
        base="required",
        parameters=(
            Parameter("density", required=True, **_DENSITY),
            Parameter(
                "gamma", "fraction of the largest entries dropped", default=0.01, low=0, high=1
            ),
            _SCALE,
        ),
        call=lambda sds, base, o: merging.breadcrumbs_merge(
            _needs_base(base), sds, o["density"], o["gamma"], scale=o["scale"]
        ),
        constraint=_breadcrumbs_constraint,
    ),
    MergeMethod(
        name="model-stock",
        function=merging.model_stock,
        summary="the mean pulled towards the base by the task vectors' angle, per tensor",
        reference="Jang et al. 2024, Model Stock",
        base="required",
        parameters=(),
        call=lambda sds, base, o: merging.model_stock(_needs_base(base), sds),
        min_ingredients=2,
    ),
    MergeMethod(
        name="slerp",
        function=slerp,
        summary="spherical interpolation of 2 models (of task vectors with a base); "
        "more: multi-SLERP, which needs the base",
        reference="Shoemake 1985; Rame et al. 2024, WARP",
        base="optional",
        parameters=(
            Parameter("t", "position between the 2 models", default=0.5, low=0, high=1),
            Parameter("weights", "multi-SLERP weights, one per ingredient", kind="floats", low=0),
        ),
        call=_slerp_call,
        min_ingredients=2,
        constraint=_slerp_constraint,
    ),
)

MERGE_METHODS: Mapping[str, MergeMethod] = MappingProxyType({m.name: m for m in _TABLE})
"""Every merge method by name, in the order the docs and ``--help`` list them."""


def get_merge_method(name: str, spelling: Spelling = PYTHON_SPELLING) -> MergeMethod:
    """The entry ``name`` of ``MERGE_METHODS``, or ``ValueError`` listing the valid names.

    Args:
        name: a method name.
        spelling: how the message names the option.

    Returns:
        The method.

    Raises:
        ValueError: an unknown name.

    Examples:
        >>> get_merge_method("ties").function.__name__
        'ties_merge'
    """
    if name not in MERGE_METHODS:
        raise ValueError(
            f"unknown {spelling.choice('method', name)}; valid merge methods: "
            f"{', '.join(MERGE_METHODS)}"
        )
    return MERGE_METHODS[name]
