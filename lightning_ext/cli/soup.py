"""``lightning-ext soup``: merge checkpoint files on the command line, streaming them one at a time.

Examples::

    lightning-ext soup run*/last.ckpt -o soup.ckpt                      # uniform soup
    lightning-ext soup a.ckpt b.ckpt --method weighted --weights 1 3 -o soup.pt
    lightning-ext soup ft*.ckpt --base pre.ckpt --method ties --density 0.2 -o merged.ckpt
    lightning-ext soup ft*.ckpt -o soup.ckpt --model mypkg.models:make_model \\
        --recalibrate-bn mypkg.data:train_loader              # recompute BatchNorm statistics

The output keeps the first input's format: a Lightning checkpoint (the first input's, with its
``state_dict`` replaced and optimizer/loop state dropped, so ``Module.load_from_checkpoint``
works) or a bare state dict. Greedy soups need a model to evaluate: use ``build_soup`` in Python.

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

from lightning_ext._io import atomic_torch_save, load_file
from lightning_ext.functional import merging
from lightning_ext.io.ingredients import Ingredients, load_state_dict

METHODS = (
    "uniform",
    "weighted",
    "task-arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "model-stock",
    "slerp",
)
NEEDS_BASE = {"task-arithmetic", "ties", "dare", "breadcrumbs", "model-stock"}
BASE_OPTIONAL = {"slerp"}  # SLERP of the models, or of their task vectors when --base is given
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soup",
        help="merge checkpoints (model soups, task arithmetic, TIES, DARE, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", help="ingredient checkpoints or state-dict files")
    p.add_argument("-o", "--output", required=True, help="file to write (atomically)")
    p.add_argument("--method", choices=METHODS, default="uniform")
    p.add_argument("--base", help="base (pre-trained) checkpoint for task-vector methods")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint")
    p.add_argument("--scale", type=float, default=1.0, help="task-vector scale (default 1)")
    p.add_argument("--density", type=float, default=None, help="kept fraction (ties 0.2)")
    p.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs outlier fraction")
    p.add_argument("--seed", type=int, default=0, help="DARE mask seed")
    p.add_argument("--t", type=float, default=0.5, help="SLERP position between 2 checkpoints")
    p.add_argument(
        "--trusted", action="store_true", help="allow checkpoints holding arbitrary pickled objects"
    )
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


def _slerp(
    args: argparse.Namespace, ings: Ingredients, base: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Two checkpoints: SLERP at ``--t`` (of task vectors with ``--base``); more: multi-SLERP."""
    from lightning_ext.functional.interpolation import multi_slerp, slerp

    if len(args.checkpoints) == 2 and args.weights is None:
        return dict(slerp(ings[0], ings[1], args.t, base=base))
    if base is None:
        raise ValueError("--method slerp with --weights needs --base (multi-SLERP of task vectors)")
    return dict(multi_slerp(base, [ings[i] for i in range(len(args.checkpoints))], args.weights))


def merge(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    ings = Ingredients(args.checkpoints, trusted=args.trusted).validate()
    method = args.method
    if method in NEEDS_BASE and not args.base:
        raise ValueError(f"--method {method} needs --base (the model the ingredients share)")
    if method not in NEEDS_BASE | BASE_OPTIONAL and args.base:
        raise ValueError(
            f"--base is only used by {sorted(NEEDS_BASE | BASE_OPTIONAL)}, not {method}"
        )
    if method == "weighted" and args.weights is None:
        raise ValueError("--method weighted needs --weights (one weight per checkpoint)")
    if args.weights is not None and method not in ("weighted", "slerp"):
        raise ValueError("--weights goes with --method weighted or slerp (one per checkpoint)")
    if method == "slerp" and len(args.checkpoints) > 2 and not args.base:
        raise ValueError("--method slerp of more than 2 checkpoints needs --base (multi-SLERP)")
    base = None
    if args.base:
        base = load_state_dict(args.base, trusted=args.trusted)
        merging.check_same_layout(base, ings[0], name=ings.name(0), ref_name=f"base {args.base}")
    density = args.density
    if method == "slerp":
        return _slerp(args, ings, base)
    if method == "uniform":
        return merging.uniform_soup(ings)
    if method == "weighted":
        return merging.weighted_average(ings, args.weights)
    assert base is not None, f"--method {method} is in NEEDS_BASE, checked above"
    if method == "task-arithmetic":
        return merging.task_arithmetic(base, ings, scale=args.scale)
    if method == "ties":
        return merging.ties_merge(base, ings, density=density or 0.2, scale=args.scale)
    if method == "model-stock":
        return merging.model_stock(base, ings)
    if density is None:
        raise ValueError(f"--method {method} needs --density (the kept fraction, in (0, 1])")
    if method == "dare":
        gen = torch.Generator().manual_seed(args.seed)
        return merging.dare_merge(base, ings, density, scale=args.scale, generator=gen)
    return merging.breadcrumbs_merge(base, ings, density, args.gamma, scale=args.scale)


def import_callable(spec: str, option: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function; the working directory is importable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"{option} expects MODULE:FUNCTION (e.g. mypkg.data:train_loader), got {spec!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target = getattr(importlib.import_module(module_name), attr, None)
    if not callable(target):
        raise ValueError(f"{option}: {spec!r} is not a callable")
    return target


def statistics_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating statistics buffers (BatchNorm running mean/variance) of a state dict."""
    return [k for k, v in state.items() if v.is_floating_point() and merging.is_statistic(k, v)]


BNRecalibration = tuple[Callable[..., Any], Callable[..., Any]]


def bn_recalibration(args: argparse.Namespace) -> BNRecalibration | None:
    """The (model, data) functions of ``--model``/``--recalibrate-bn``, checked before merging."""
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
    ``--recalibrate-bn``, warn when statistics were only averaged."""
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


def run(args: argparse.Namespace) -> int:
    bn = bn_recalibration(args)
    soup = recalibrate(args, merge(args), bn)
    first: Any = load_file(args.checkpoints[0], trusted=args.trusted, mmap=True)
    if isinstance(first, Mapping) and "state_dict" in first:
        out = {k: v for k, v in first.items() if k not in TRAINING_STATE}
        out["state_dict"] = soup
        out["soup"] = {"method": args.method, "ingredients": list(args.checkpoints)}
    else:
        out = soup
    atomic_torch_save(out, Path(args.output))
    print(f"wrote {args.method} merge of {len(args.checkpoints)} checkpoint(s) to {args.output}")
    return 0
