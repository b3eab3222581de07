"""Learned soups and aTLAS (``lightning_ext.functional.learned_soup``) against uniform and greedy
soups, on the generated task of ``examples/model_soups.py``, CPU, a few minutes.

Per seed: pre-train an MLP on a narrower distribution, fine-tune the 8 ingredients of
``examples/model_soups.py`` from it (learning rate, weight decay, input noise and seed vary), then
compare on the test set and the shifted test set:

- the best single ingredient, the uniform soup and the greedy soup (``functional.greedy_soup``),
  chosen on the held-out set;
- the learned soup (``mixing="ingredients"``: per-tensor softmax weights over the ingredients) and
  aTLAS (``mixing="task_vectors"``: per-tensor coefficients of the task vectors from the pre-trained
  model), both learned by Adam on the same held-out set with only the coefficients trainable.

    python -m examples.learned_soups     # 5 seeds; writes benchmarks/results/learned_soups.md
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks._common import markdown_table, write_result
from examples.model_soups import RECIPES, Task, TaskNet, accuracy, trainer
from lightning_ext.functional import greedy_soup, uniform_soup
from lightning_ext.functional.learned_soup import learn_soup_coefficients

METHODS = [
    "best single (val)",
    "uniform soup",
    "greedy soup",
    "learned soup",
    "learned soup, per model",
    "aTLAS",
    "aTLAS, from uniform",
]


def fine_tune(base: dict[str, Tensor], train: DataLoader, seed: int, epochs: int) -> list[dict]:
    ingredients = []
    for lr, wd, noise, offset in RECIPES:
        pl.seed_everything(seed * 100 + offset, verbose=False)
        model = TaskNet(lr=lr, weight_decay=wd, noise=noise)
        model.load_state_dict(base)
        trainer(epochs).fit(model, train)
        ingredients.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return ingredients


def run_seed(seed: int, pre_epochs: int, ft_epochs: int, steps: int) -> dict[str, float]:
    task, g = Task.draw(seed), torch.Generator().manual_seed(10_000 + seed)
    pretrain = task.sample(4000, g, blobs=2)
    train, val, test = task.sample(2000, g), task.sample(1000, g), task.sample(2000, g)
    shifted = task.sample(2000, g, offset=1.5, spread=1.3, noise=0.5)
    pl.seed_everything(seed, verbose=False)
    pre = TaskNet(lr=0.05)
    trainer(pre_epochs).fit(pre, DataLoader(pretrain, batch_size=64, shuffle=True))
    base = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    ings = fine_tune(base, DataLoader(train, batch_size=32, shuffle=True), seed, ft_epochs)

    def val_acc(state: dict) -> float:
        return accuracy(state, *val.tensors)

    scores = [val_acc(s) for s in ings]
    greedy, chosen = greedy_soup(ings, val_acc, mode="max", scores=scores)
    held_out = [val.tensors]  # one full batch of the 1000 held-out samples
    model, k = TaskNet(), len(ings)

    def learn(**options: Any) -> dict:
        soup = learn_soup_coefficients(model, ings, held_out, steps=steps, lr=0.05, **options)
        return soup.state_dict(ings, options.get("base"))

    tv = {"base": base, "mixing": "task_vectors"}
    candidates = {
        "best single (val)": ings[max(range(len(ings)), key=scores.__getitem__)],
        "uniform soup": uniform_soup(ings),
        "greedy soup": greedy,
        "learned soup": learn(),
        "learned soup, per model": learn(granularity="model"),
        "aTLAS": learn(**tv),
        "aTLAS, from uniform": learn(**tv, init=1 / k),
    }
    out = {"greedy size": float(len(chosen))}
    for name, state in candidates.items():
        out[f"{name}|val"] = val_acc(state)
        out[f"{name}|test"] = accuracy(state, *test.tensors)
        out[f"{name}|shifted"] = accuracy(state, *shifted.tensors)
    return out


def _stat(xs: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    mean = statistics.mean(xs)
    return f"{mean:+.2f} ± {sd:.2f}" if signed else f"{mean:.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pre-epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="coefficient-learning steps")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args.pre_epochs, args.ft_epochs, args.steps))
        print(f"seed {seed}: {runs[-1]}", flush=True)

    def column(name: str, split: str) -> list[float]:
        return [100 * r[f"{name}|{split}"] for r in runs]

    def gain(name: str, split: str) -> str:
        base = column("best single (val)", split)
        return _stat([a - b for a, b in zip(column(name, split), base, strict=True)], signed=True)

    rows = [
        [
            n,
            _stat(column(n, "val")),
            _stat(column(n, "test")),
            gain(n, "test"),
            _stat(column(n, "shifted")),
            gain(n, "shifted"),
        ]
        for n in METHODS
    ]
    body = (
        "Task, pre-training and the 8 fine-tuned ingredients of `examples/model_soups.py` "
        f"({args.pre_epochs} pre-training and {args.ft_epochs} fine-tuning epochs). Greedy soup, "
        "best single and both learned methods use the same 1000 held-out samples (the learned "
        f"ones: {args.steps} Adam steps, lr 0.05, one coefficient per ingredient and tensor, "
        "6 tensors, unless 'per model'; aTLAS starts at the base, or at 1/8 per task vector, "
        "i.e. the uniform soup, 'from uniform'); test: 2000 samples; shifted: latent blobs "
        "moved by 1.5, widened 1.3x, "
        f"noise 0.5. {len(runs)} seeds {args.seeds}; accuracy in %, mean ± std over seeds; gains "
        "over the best single ingredient are paired per seed. Greedy soup sizes: "
        f"{[int(r['greedy size']) for r in runs]}. The machine is shared with other jobs "
        "(accuracy only, no timings).\n\n"
        + markdown_table(
            ["method", "held-out acc", "test acc", "vs best single", "shifted acc", "vs best"],
            rows,
        )
    )
    command = "nice -n 10 python -m examples.learned_soups --seeds " + " ".join(
        map(str, args.seeds)
    )
    if args.no_write:
        print(body)
    else:
        write_result("learned_soups", "Learned soups and aTLAS on a generated task", body, command)


if __name__ == "__main__":
    main()
