"""``lightning-ext soup``: merge checkpoints on the command line, streaming them one at a time.

Examples::

    lightning-ext soup run*/last.ckpt -o soup.ckpt                      # uniform soup
    lightning-ext soup a.ckpt b.ckpt --method weighted --weights 1 3 -o soup.pt
    lightning-ext soup a.ckpt b.ckpt --method weighted --weights 0,1 1,0 -o soup.pt  # by depth
    lightning-ext soup ft*.ckpt --base pre.ckpt --method della --density 0.5 -o merged.ckpt
    lightning-ext soup ft*.ckpt --base pre.ckpt --method ties --density 0.2 -o merged.ckpt
    lightning-ext soup ft*.ckpt -o soup.ckpt --model mypkg.models:make_model \\
        --recalibrate-bn mypkg.data:train_loader              # recompute BatchNorm statistics
    lightning-ext soup sharded/epoch=*.ckpt/ -o soup.ckpt     # distributed checkpoint folders
    lightning-ext soup hf-a/ hf-b/ -o soup.safetensors        # Hugging Face folders, safetensors

The output keeps the first input's format: a Lightning checkpoint (the first input's, with its
``state_dict`` replaced and optimizer/loop state dropped, so ``Module.load_from_checkpoint``
works) or a bare state dict; a ``.safetensors`` (or ``.safetensors.index.json``, sharded)
output holds the merged state dict only. Inputs may be ``.safetensors`` files, sharded indexes or
Hugging Face-style folders (``model.safetensors`` or its index inside). Greedy soups need a model
to evaluate: use ``build_soup`` in Python.

A checkpoint may be a distributed checkpoint folder (``ModelParallelStrategy``/FSDP2): its
weights are read whole in this one process. The output is then one file: a Lightning checkpoint
built from the folder's ``meta.pt`` (read weights-only unless ``--trusted``, like every input),
or a bare state dict when the folder has no ``meta.pt``.

BatchNorm statistics (running mean and variance) are averaged over the ingredients by every
method, never extrapolated; they are still those of the ingredients, not of the merged weights.
``--recalibrate-bn module:function`` recomputes them: the function (called with no argument)
returns a DataLoader of training inputs, and ``--model module:function`` returns the network
(e.g. the LightningModule) into which the merged weights are loaded to run it. Without it, a
warning says how many statistics were averaged.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_ext._io import atomic_save_weights, check_output, load_file
from lightning_ext.cli._options import (
    CLI_SPELLING,
    add_allow_nonfinite_option,
    add_overwrite_option,
    add_trusted_option,
)
from lightning_ext.functional import merging
from lightning_ext.functional.merge_methods import (
    MERGE_METHODS,
    MergeMethod,
    Parameter,
    get_merge_method,
)
from lightning_ext.io.ingredients import Ingredients
from lightning_ext.io.safetensors import is_safetensors_path

TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
LIGHTNING_META_FILE = "meta.pt"  # the rest of a distributed checkpoint, written by Lightning


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--OPTION`` per option of any ``MERGE_METHODS`` entry (``soup``, ``merge-adapters``),
    typed and described from the registry.

    Args:
        parser: the subcommand's parser.
    """
    for name, parameter in _options().items():
        parser.add_argument(
            f"--{name}",
            type=_ARG_TYPES.get(parameter.kind, float),
            nargs="+" if parameter.kind in ("floats", "gradients") else None,
            default=None,
            help=_option_help(name, parameter),
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``soup`` subcommand, its options read from ``MERGE_METHODS``.

    Args:
        sub: the ``lightning-ext`` parser's subparsers.
    """
    p = sub.add_parser(
        "soup",
        help="merge checkpoints (model soups, task arithmetic, TIES, DARE, ...)",
        description=__doc__,
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="ingredient checkpoints or state-dict files, or distributed checkpoint folders",
    )
    p.add_argument("-o", "--output", required=True, help="file to write (atomically)")
    p.add_argument(
        "--method",
        choices=list(MERGE_METHODS),
        default="uniform",
        metavar="METHOD",
        help="one of: " + ", ".join(MERGE_METHODS) + " (default uniform; see 'merge methods'). "
        "Greedy and learned soups score candidates with a model on data: use build_soup",
    )
    users = sorted(m.name for m in MERGE_METHODS.values() if m.base != "unused")
    p.add_argument("--base", help=f"base (pre-trained) checkpoint, for {', '.join(users)}")
    add_method_options(p)
    add_trusted_option(p, "checkpoints")
    add_overwrite_option(p)
    add_allow_nonfinite_option(p, "checkpoints")
    p.add_argument(
        "--recalibrate-bn",
        metavar="MODULE:FUNCTION",
        help="recompute BatchNorm statistics on the DataLoader this function returns "
        "(with --model)",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="function (or class) returning the network the merged weights are loaded into",
    )
    p.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        help="at most this many batches for --recalibrate-bn",
    )
    p.set_defaults(func=run)


def _gradient(text: str) -> float | list[float]:
    """``0.5`` -> 0.5; ``0,0.5,1`` -> anchors interpolated over depth."""
    if "," in text:
        return [float(v) for v in text.split(",")]
    return float(text)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "gradients": _gradient,
    "choice": str,
    "bool": _bool,
}


def _options() -> dict[str, Parameter]:
    """Every option of any merge method, by name (the first method's declaration gives the help
    text; defaults and ranges are per method, in ``_option_help``)."""
    options: dict[str, Parameter] = {}
    for method in MERGE_METHODS.values():
        for parameter in method.parameters:
            options.setdefault(parameter.name, parameter)
    return options


def _option_help(name: str, parameter: Parameter) -> str:
    """``--name``'s help: what it means, then per method its default (or "required") and range."""
    uses = []
    for method in MERGE_METHODS.values():
        for p in method.parameters:
            if p.name == name:
                default = "required" if p.required else f"default {p.default}"
                if p.default is None and not p.required:
                    default = "optional"
                uses.append(f"{method.name}: {default}, {p.range_text()}")
    return f"{parameter.help} ({'; '.join(uses)})".replace("%", "%%")


def _methods_epilog() -> str:
    """The table of merge methods, for ``--help``."""
    lines = ["merge methods (--method):"]
    for m in MERGE_METHODS.values():
        base = {"required": "needs --base", "optional": "--base optional", "unused": "no --base"}
        options = ", ".join(f"--{p.name}" for p in m.parameters) or "no options"
        lines.append(f"  {m.name}: {m.summary}. {base[m.base]}; {options}. [{m.reference}]")
    return "\n".join(lines)


MergeRequest = tuple[MergeMethod, dict[str, Any]]


def method_options(args: argparse.Namespace, method: MergeMethod) -> dict[str, Any]:
    """The method options given on the command line that ``method`` takes; the others are
    ignored with a warning naming them (scripts pass one set of options to every method).

    Args:
        args: the parsed command line.
        method: the chosen merge method.

    Returns:
        The given options ``method`` takes, by name.
    """
    given = {name: getattr(args, name) for name in _options() if getattr(args, name) is not None}
    taken = {p.name for p in method.parameters}
    unused = [f"--{name}" for name in given if name not in taken]
    if unused:
        print(
            f"warning: --method {method.name} does not use {', '.join(unused)} (ignored)",
            file=sys.stderr,
        )
    return {name: value for name, value in given.items() if name in taken}


def resolve(args: argparse.Namespace) -> MergeRequest:
    """The merge method and its options that ``args`` ask for, checked against the method's
    entry in ``MERGE_METHODS``.

    Reads no checkpoint, so that a mistyped option fails at once, not after a long read.

    Args:
        args: the parsed command line.

    Returns:
        The method and its resolved options.

    Raises:
        ValueError: an option out of range or missing, a missing or unused ``--base``, or too
            few checkpoints for the method.
    """
    method = get_merge_method(args.method, CLI_SPELLING)
    options = method.resolve(
        method_options(args, method),
        num_ingredients=len(args.checkpoints),
        has_base=bool(args.base),
        spelling=CLI_SPELLING,
    )
    return method, options


def merge(args: argparse.Namespace, request: MergeRequest) -> dict[str, torch.Tensor]:
    """The merge of ``request`` (see ``resolve``), streaming the checkpoints one at a time.

    Args:
        args: the parsed command line (checkpoints, ``--base``, ``--trusted``).
        request: what ``resolve`` returned.

    Returns:
        The merged state dict.

    Raises:
        ValueError: a checkpoint (or the base) whose layout differs from the first's, or with
            non-finite weights, checked for all before any merging; a file or folder that holds
            no state dict.
        FileNotFoundError: a checkpoint that does not exist.
    """
    method, options = request
    ings = Ingredients(
        args.checkpoints, trusted=args.trusted, allow_nonfinite=args.allow_nonfinite
    ).validate()
    base = ings.load_base(args.base) if args.base else None
    return ings.restore_nonfinite(method.call(ings, base, options))


def import_callable(spec: str, option: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function; the working directory is importable, as
    under ``python -m``, so that a user's own module factory can be named.

    Args:
        spec: ``MODULE:FUNCTION``.
        option: the command-line option named in the errors.

    Returns:
        The callable.

    Raises:
        ValueError: ``spec`` is not ``MODULE:FUNCTION``, its module cannot be imported, or it
            names something the module lacks or that is not callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"{option} expects MODULE:FUNCTION (e.g. mypkg.data:train_loader), got {spec!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option} {spec}: cannot import {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise ValueError(f"{option} {spec}: {module_name} ({module.__file__}) has no {attr!r}")
    target = getattr(module, attr)
    if not callable(target):
        raise ValueError(f"{option}: {spec!r} is not a callable")
    return target


def statistics_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating statistics buffers (BatchNorm running mean/variance) of a state dict.

    Args:
        state: a merged state dict.

    Returns:
        Their keys, in the state dict's order.
    """
    return [k for k, v in state.items() if v.is_floating_point() and merging.is_statistic(k, v)]


BNRecalibration = tuple[Callable[..., Any], Callable[..., Any]]


def bn_recalibration(args: argparse.Namespace) -> BNRecalibration | None:
    """The (model, data) functions of ``--model``/``--recalibrate-bn``, checked before merging.

    Args:
        args: the parsed ``lightning-ext soup`` options.

    Returns:
        ``(model factory, data factory)``, or None when neither option is given.

    Raises:
        ValueError: only one of the two options is given.
    """
    if args.recalibrate_bn is None and args.model is None:
        return None
    if args.recalibrate_bn is None:
        raise ValueError("--model is only used with --recalibrate-bn")
    if args.model is None:
        raise ValueError("--recalibrate-bn needs --model (the network to run the data through)")
    return (
        import_callable(args.model, "--model"),
        import_callable(args.recalibrate_bn, "--recalibrate-bn"),
    )


def recalibrate(
    args: argparse.Namespace, soup: dict[str, torch.Tensor], bn: BNRecalibration | None
) -> dict[str, torch.Tensor]:
    """Load the merge into the model and recompute its BatchNorm statistics on the data; without
    ``--recalibrate-bn``, warn when statistics were only averaged.

    Args:
        args: the parsed ``lightning-ext soup`` options.
        soup: the merged state dict.
        bn: what ``bn_recalibration(args)`` returned.

    Returns:
        The state dict to write (``soup`` itself when nothing was recalibrated).

    Raises:
        ValueError: the model has no BatchNorm layer to recalibrate.
    """
    from lightning_ext.workflows.soup import recalibrate_batchnorm

    if bn is None:
        averaged = statistics_keys(soup)
        if averaged:
            print(
                f"warning: {len(averaged)} BatchNorm statistics buffers (e.g. {averaged[0]}) were "
                "averaged over the ingredients, not recomputed for the merged weights; pass "
                "--recalibrate-bn MODULE:FUNCTION --model MODULE:FUNCTION to recompute them",
                file=sys.stderr,
            )
        return soup
    make_model, make_data = bn
    model = make_model()
    model.load_state_dict(soup)
    if not recalibrate_batchnorm(model, make_data(), max_batches=args.bn_batches):
        raise ValueError(f"--recalibrate-bn: the model from {args.model} has no BatchNorm layer")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def output_template(path: str, *, trusted: bool) -> Any:
    """What the first input holds besides its weights, for the output to keep its format: the
    loaded file, or a distributed checkpoint folder's ``meta.pt`` (Lightning's checkpoint without
    ``state_dict``, which sits in the shards) given an empty ``state_dict``; None for a folder
    without ``meta.pt`` (the output is then a bare state dict).

    Args:
        path: the first input.
        trusted: allow files that pickle arbitrary objects (the one loading rule).

    Returns:
        The template to fill, or None.

    Raises:
        ValueError: a file (or ``meta.pt``) holding arbitrary objects without ``trusted``.
    """
    if is_safetensors_path(path):
        return None  # a bare state dict: nothing else to keep
    if not Path(path).is_dir():
        return load_file(path, trusted=trusted, mmap=True)
    meta = Path(path) / LIGHTNING_META_FILE
    if not meta.is_file():
        return None
    template = load_file(meta, trusted=trusted, mmap=True)
    return {**template, "state_dict": {}} if isinstance(template, Mapping) else None


def run(args: argparse.Namespace) -> int:
    """Merge, recalibrate if asked, and write the result atomically; a Lightning checkpoint
    stays one (its weights replaced, its training state dropped, the recipe recorded), and a
    distributed checkpoint folder with a ``meta.pt`` gives one as a single file.

    Args:
        args: the parsed ``lightning-ext soup`` options.

    Returns:
        The exit code, 0.
    """
    bn = bn_recalibration(args)
    request = resolve(args)  # the options, checked without reading a checkpoint
    inputs = [*args.checkpoints, *([args.base] if args.base else [])]
    names = ".pt, .ckpt or .safetensors"  # the output is checked before any reading
    check_output(args.output, inputs=inputs, overwrite=args.overwrite, binary=names)
    first = output_template(args.checkpoints[0], trusted=args.trusted)  # refused before merging
    soup = recalibrate(args, merge(args, request), bn)
    out: dict[str, Any] = dict(soup)
    # safetensors holds tensors only: the merged weights; a Lightning checkpoint in gives one out
    if (
        not is_safetensors_path(args.output)
        and isinstance(first, Mapping)
        and "state_dict" in first
    ):
        out = {k: v for k, v in first.items() if k not in TRAINING_STATE}
        out["state_dict"] = soup
        out["soup"] = {"method": args.method, "ingredients": list(args.checkpoints)}
    atomic_save_weights(out, Path(args.output))
    print(f"wrote {args.method} merge of {len(args.checkpoints)} checkpoint(s) to {args.output}")
    return 0
