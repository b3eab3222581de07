"""The one registry of soup and merge methods: every way of combining ingredients (state dicts)
registers itself where it is defined, with ``@merge_method(name, ...)`` on its function. The
decorator reads the option defaults from the function's signature (declared once, there), takes
one small declaration of each option's range and meaning and of the rules that tie options
together, checks them on every call of the function, and files the entry under its name
(a name registered twice is refused). Every call also checks the inputs first
(``_checks.check_merge_inputs``: swapped ``base``/``state_dicts``, too few ingredients) and a
merge runs with tied names merged once (``_ties.merge_ties_once``).

The command line (``lightning-ext soup``), ``build_soup``/``run_soup``, ``ModelSoup`` and the docs
all read this registry, so a method added there is reachable everywhere, options are validated
before any checkpoint is read or any candidate scored, and the documented defaults are the ones
that run. Errors are worded in the caller's vocabulary through a ``Spelling``: ``density`` in
Python (``PYTHON_SPELLING``, the default), ``--density`` on the command line (``CLI_SPELLING``,
defined by the CLI in ``lightning_ext.cli._options``).

``SOUP_METHODS`` holds every entry; ``MERGE_METHODS`` those that need nothing but state dicts
(the command line's). The greedy and learned soups also need a scorer, or a model and held-out
data (``needs``); ``lightning_ext._soup.run_soup`` passes them, one dispatch for every caller.
Fisher merging needs one Fisher per ingredient and is called directly
(``functional.fisher_merge``).

Pure torch: no Lightning import.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from lightning_ext.functional._checks import check_merge_inputs
from lightning_ext.functional._ties import merge_ties_once

__all__ = [
    "MERGE_METHODS",
    "PYTHON_SPELLING",
    "SOUP_METHODS",
    "MergeMethod",
    "Parameter",
    "Spelling",
    "get_merge_method",
    "get_soup_method",
    "merge_method",
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
        argument: the function's parameter the option feeds ("": the one of its own name).
        convert: turns the option's value into that argument (e.g. a seed into a generator).

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
    argument: str = ""
    convert: Callable[[Any], Any] | None = None

    def range_text(self) -> str:
        """The valid values in a few characters: ``(0, 1]``, ``>= 1``, ``one of a, b``."""
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.kind == "callable":
            return "a callable"
        if self.kind == "int" and self.low is None and self.high is None:
            return "any integer"
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
        names = ", ".join(spelling.option(k) for k in unknown)
        if not parameters:
            raise ValueError(f"{owner} takes no options ({names})")
        valid = ", ".join(spelling.option(p.name) for p in parameters)
        raise ValueError(f"{owner} takes no option {names}; its options: {valid}")
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


Constraint = Callable[[dict[str, Any], "int | None", bool, Spelling], None]
Base = Literal["required", "optional", "unused"]
PER_INGREDIENT = ("floats", "gradients")
_SOUP_METHODS: dict[str, MergeMethod] = {}
_MERGE_METHODS: dict[str, MergeMethod] = {}


@dataclass(frozen=True)
class MergeMethod:
    """One method of the registry, made by ``@merge_method`` from its function.

    Attributes:
        name: the name users pass (``method="ties"``, ``--method ties``).
        function: the public function of ``lightning_ext.functional`` that does the math (it
            checks its declared options on every call).
        summary: what it computes, in one line.
        reference: the paper.
        base: ``"required"`` (task-vector methods), ``"optional"`` or ``"unused"``.
        parameters: its options, defaults read from the function's signature, with valid ranges.
        min_ingredients: the fewest ingredients it can merge.
        constraint: checks that involve several options or the ingredients' number, given
            ``(options, num_ingredients, has_base, spelling)``.
        needs: what it needs besides state dicts, passed by the caller: ``("evaluate",)`` for
            the greedy soup, ``("model", "batches")`` for the learned soup; empty for merges.
        renamed: former option names still accepted (with a ``DeprecationWarning``), to the new.

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
    base: Base
    parameters: tuple[Parameter, ...]
    min_ingredients: int = 1
    constraint: Constraint | None = None
    needs: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)

    def resolve(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        num_ingredients: int | None = None,
        has_base: bool | None = None,
        spelling: Spelling = PYTHON_SPELLING,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Check the options (and, when known, the number of ingredients and whether a base is
        given) before any work; return every option's value, defaults filled in.

        Args:
            options: the options given.
            num_ingredients: the number of ingredients (None: not known yet).
            has_base: whether a base model is given (None: not known yet).
            spelling: how messages name the options.
            owner: how messages name the caller (None: ``method='NAME'``).

        Returns:
            Every option's value.

        Raises:
            ValueError: an unknown or out-of-range option, a missing base or required option, a
                base the method does not use, or too few ingredients.
        """
        owner = owner or spelling.choice("method", self.name)
        resolved = resolve_options(owner, self.parameters, self._renamed(options, owner), spelling)
        if has_base is not None:
            self._check_base(has_base, owner, spelling)
        if num_ingredients is not None:
            if num_ingredients < self.min_ingredients:
                raise ValueError(
                    f"{owner} needs at least {self.min_ingredients} ingredients, "
                    f"got {num_ingredients}"
                )
            for p in self.parameters:
                value = resolved[p.name]
                if p.kind in PER_INGREDIENT and value is not None and len(value) != num_ingredients:
                    raise ValueError(
                        f"{spelling.option(p.name)}: got {len(value)} values for "
                        f"{num_ingredients} ingredients (give one per ingredient)"
                    )
        if self.constraint is not None and has_base is not None:
            self.constraint(resolved, num_ingredients, has_base, spelling)
        return resolved

    def _renamed(self, options: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
        options = dict(options or {})
        for old, new in self.renamed.items():
            if old in options and new in options and options[old] != options[new]:
                raise ValueError(
                    f"{owner}: options {old!r}={options[old]!r} and {new!r}={options[new]!r} "
                    f"disagree; {old!r} is the former name of {new!r}: give {new!r} only"
                )
            if old in options:
                warnings.warn(
                    f"{owner}: option {old!r} is now {new!r} (the old name goes in a later "
                    "release)",
                    DeprecationWarning,
                    stacklevel=4,
                )
                options.setdefault(new, options.pop(old))
        return options

    def _check_base(self, has_base: bool, owner: str, spelling: Spelling) -> None:
        if self.base == "required" and not has_base:
            raise ValueError(
                f"{owner} needs {spelling.option('base')} (the pre-trained model the "
                "ingredients were fine-tuned from)"
            )
        if self.base == "unused" and has_base:
            users = sorted(m.name for m in _SOUP_METHODS.values() if m.base != "unused")
            raise ValueError(f"{spelling.option('base')} is only used by {users}, not {owner}")

    def call(
        self,
        state_dicts: Sequence[StateDict],
        base: StateDict | None,
        options: Mapping[str, Any],
        **context: Any,
    ) -> Any:
        """Run the function with resolved ``options`` (see ``resolve``) and, of ``context``, the
        arguments its signature takes (``evaluate``, ``mode``, ``model``, ``batches``, ...).

        Args:
            state_dicts: the ingredients (a lazy sequence streams).
            base: the pre-trained weights, for methods that use them.
            options: every option's value.
            **context: what the caller has beyond state dicts; each function takes its own.

        Returns:
            What the function returns: a state dict; ``(soup, chosen)`` for the greedy soup;
            a ``LearnedSoup`` for the learned one.

        Raises:
            ValueError: a missing base or a missing ``needs`` entry.
        """
        accepted = inspect.signature(self.function).parameters
        missing = [n for n in self.needs if context.get(n) is None]
        if missing or (self.base == "required" and base is None):
            absent = missing or ["base"]
            raise ValueError(f"method={self.name!r} needs {', '.join(absent)}")
        kwargs = {k: v for k, v in context.items() if k in accepted}
        kwargs["state_dicts"] = state_dicts
        if "base" in accepted:
            kwargs["base"] = base
        for p in self.parameters:
            value = options[p.name]
            kwargs[p.argument or p.name] = value if p.convert is None else p.convert(value)
        return self.function(**kwargs)

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

    def check_arguments(self, arguments: Mapping[str, Any]) -> None:
        """The declared ranges and rules over a direct call's bound arguments (the function's
        own guard): scalar options against their ranges, then ``constraint``. Per-ingredient
        options are left to the function, which names the ingredient.

        Args:
            arguments: the call's arguments by parameter name, defaults applied.

        Raises:
            ValueError: an option outside its range or breaking a rule.
        """
        values = {}
        for p in self.parameters:
            if p.convert is not None or (p.argument or p.name) not in arguments:
                continue
            values[p.name] = value = arguments[p.argument or p.name]
            if value is not None and p.kind not in PER_INGREDIENT:
                p.check(value)
        if self.constraint is not None:
            state_dicts = arguments.get("state_dicts")
            n = len(state_dicts) if state_dicts is not None else None
            self.constraint(values, n, arguments.get("base") is not None, PYTHON_SPELLING)


F = TypeVar("F", bound=Callable[..., Any])


def merge_method(
    name: str,
    *,
    summary: str,
    reference: str,
    base: Base = "unused",
    options: Sequence[Parameter] = (),
    min_ingredients: int = 1,
    constraint: Constraint | None = None,
    needs: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
    renamed: Mapping[str, str] | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as method ``name``: its options' defaults come from its
    signature (a parameter without a default is a required option), their ranges and meaning from
    ``options``; every call of the function checks them (``MergeMethod.check_arguments``).

    Args:
        name: the method's name.
        summary: what it computes, in one line.
        reference: the paper.
        base: ``"required"``, ``"optional"`` or ``"unused"``.
        options: one ``Parameter`` per option (its ``default`` is read from the signature when
            the option feeds a parameter of the function).
        min_ingredients: the fewest ingredients it can merge.
        constraint: the rules tying options together (see ``MergeMethod``).
        needs: what it needs besides state dicts (see ``MergeMethod``).
        defaults: the registry's defaults where they differ from the function's, e.g. a fixed
            seed, so that a soup is reproducible unless asked otherwise.
        renamed: former option names, to the new ones.

    Returns:
        The decorator; it returns the checked function.

    Raises:
        ValueError: ``name`` is registered already, or an option names no parameter of the
            function and declares no ``argument``.

    Examples:
        >>> MERGE_METHODS["ties"].parameters[0].default  # ties_merge(..., density=0.2, ...)
        0.2
    """

    def register(function: F) -> F:
        if name in _SOUP_METHODS:
            raise ValueError(f"merge method {name!r} is registered already")
        signature = inspect.signature(function)
        parameters = tuple(_from_signature(p, signature, defaults or {}) for p in options)
        call = _call_text(function.__name__, signature)

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            return _call_checked(entry, function, signature, call, args, kwargs)

        entry = MergeMethod(
            name=name,
            function=checked,
            summary=summary,
            reference=reference,
            base=base,
            parameters=parameters,
            min_ingredients=min_ingredients,
            constraint=constraint,
            needs=needs,
            renamed=dict(renamed or {}),
        )
        _SOUP_METHODS[name] = entry
        if not needs:
            _MERGE_METHODS[name] = entry
        return checked  # type: ignore[return-value]

    return register


def _call_checked(
    entry: MergeMethod,
    function: Callable[..., Any],
    signature: inspect.Signature,
    call: str,
    args: tuple,
    kwargs: dict[str, Any],
) -> Any:
    """A call of a registered function: its inputs checked (``check_merge_inputs``), then its
    options (``check_arguments``); a merge (the greedy soup too) runs with tied names merged once
    (``_ties.merge_ties_once``)."""
    kwargs = entry._renamed(kwargs, f"{function.__name__}()")
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    check_merge_inputs(
        call,
        arguments.get("state_dicts"),
        arguments.get("base"),
        base_use=entry.base,
        min_ingredients=entry.min_ingredients,
    )
    entry.check_arguments(arguments)
    if "model" in entry.needs:  # the learned soup shares one coefficient per tie itself
        return function(*args, **kwargs)
    return merge_ties_once(function, bound)


def _call_text(name: str, signature: inspect.Signature) -> str:
    """The function's leading positional parameters as messages show them, e.g.
    ``dare_merge(base, state_dicts, density, ...)`` or ``slerp_merge(state_dicts, base=None,
    ...)``."""
    shown = []
    for p in signature.parameters.values():
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if not positional or (p.default is not p.empty and p.name != "base"):
            break
        shown.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    more = ", ..." if len(shown) < len(signature.parameters) else ""
    return f"{name}({', '.join(shown)}{more})"


def _from_signature(
    p: Parameter, signature: inspect.Signature, defaults: Mapping[str, Any]
) -> Parameter:
    """``p`` with its default (or ``required``) read from the parameter it feeds."""
    target = signature.parameters.get(p.argument or p.name)
    if target is None:
        raise ValueError(f"option {p.name!r} feeds no parameter of the function")
    if p.argument:  # converted (a seed into a generator): the declaration holds the default
        return p
    if p.name in defaults:
        return replace(p, default=defaults[p.name])
    if target.default is inspect.Parameter.empty:
        return replace(p, required=True)
    return replace(p, default=target.default)


SOUP_METHODS: Mapping[str, MergeMethod] = MappingProxyType(_SOUP_METHODS)
"""Every method by name, merges and soups that need a scorer or a model alike."""

MERGE_METHODS: Mapping[str, MergeMethod] = MappingProxyType(_MERGE_METHODS)
"""The methods that need nothing but state dicts, in the order the docs and ``--help`` list
them."""


def generator_of(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the drop masks of a seeded merge.

    Args:
        seed: the seed.

    Returns:
        The generator.

    Examples:
        >>> generator_of(0).initial_seed()
        0
    """
    return torch.Generator().manual_seed(seed)


def _largest(weight: Any) -> float:
    """The largest value a weight takes anywhere (a number, anchors, or per-tensor filters)."""
    if isinstance(weight, Mapping):
        return max(_largest(w) for w in weight.values())
    return max(weight) if isinstance(weight, list | tuple) else weight


def check_positive_weights(
    options: dict[str, Any], n: int | None, has_base: bool, spelling: Spelling
) -> None:
    """The rule of every weighted merge: the weights must not all be 0.

    Args:
        options: the method's options (``weights`` among them).
        n: the number of ingredients (unused).
        has_base: whether a base is given (unused).
        spelling: how the message names the option.

    Raises:
        ValueError: weights that are all 0.
    """
    weights = options.get("weights")
    if weights is None:
        return
    try:
        total = sum(_largest(w) for w in weights)
    except (TypeError, ValueError):
        return  # not numbers: the function names the ingredient
    if isinstance(total, Real) and total <= 0:
        raise ValueError(f"{spelling.option('weights')} must not all be 0, got {weights}")


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


def get_soup_method(name: str) -> MergeMethod | None:
    """The entry ``name`` of ``SOUP_METHODS`` (greedy and learned soups included).

    Args:
        name: a method name.

    Returns:
        The method, or None for an unknown name.

    Examples:
        >>> get_soup_method("greedy").needs
        ('evaluate',)
    """
    return SOUP_METHODS.get(name)
