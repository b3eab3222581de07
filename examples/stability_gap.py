"""The stability gap (De Lange et al., ICLR 2023) on Split-Digits with experience replay, evaluated
after every training step by ContinualEvaluation, following the paper's Split-MNIST ER protocol as
closely as a CPU allows.

Data ("jittered Split-Digits"): scikit-learn's 8x8 digits, split 70/30 into training and held-out
images per class, then augmented into a larger, harder set: each sample is a digit shifted by up
to one pixel, rescaled in intensity and with Gaussian noise. 5 tasks of 2 classes (0-1, ..., 8-9),
one 10-way head (class-incremental). Each task trains on ``train_per_task`` samples made from its
training images and is evaluated on 1,000 samples made from its held-out images (as the paper's
1,000 evaluation samples per task), so that one sample is 0.1 % of a task's accuracy.

Protocol (paper, Split-MNIST ER): MLP 2 x 400; SGD lr 0.01, momentum 0.9; batch 256 of new data
plus a replay batch of 256 from a class-balanced memory; loss 0.3 CE(new) + 0.7 CE(replay); 10
epochs per task; evaluation every step. The paper's 2,000-sample memory for MNIST's 60,000
training images is scaled to the same fraction of our training set.

    python -m examples.stability_gap --seed 0 --out runs/stability_gap
    python -m examples.stability_gap --lm plain --out runs/stability_gap_lm   # or replay, subset

prints the accuracy matrix, min-ACC and WC-ACC next to what end-of-task evaluation reports, and
per task the transient drop at each later task switch, its recovery and the final forgetting;
writes curves.csv, curves.json and curves.png to --out. With ``--lm RECIPE``: the stability gap
of language-model continual pre-training (Guo et al. 2024) in miniature, evaluated by perplexity
(lower is better) on two synthetic token domains, with the paper's mitigations as recipes.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from examples._digits import digits_tensors
from lightning_ext.callbacks import ContinualEvaluation
from lightning_ext.data import TaskStream, split_by_classes

MNIST_TRAIN, PAPER_MEMORY = 60_000, 2_000


class ReplayMLP(pl.LightningModule):
    """An MLP whose training step understands (x, y) and (x, y, x_replay, y_replay) batches."""

    def __init__(
        self, hidden: int = 400, lr: float = 0.01, momentum: float = 0.9, new_weight: float = 0.3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        if len(batch) == 4:
            replay = F.cross_entropy(self(batch[2]), batch[3])
            loss = self.hparams.new_weight * loss + (1 - self.hparams.new_weight) * replay
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)


def jitter(images: Tensor, labels: Tensor, n: int, generator: torch.Generator) -> TensorDataset:
    """``n`` samples drawn from ``images``: shifted by -1..1 pixel in each direction, intensity
    scaled by 0.8..1.2, plus N(0, 0.1) noise, clipped to [0, 1]."""
    pick = torch.randint(len(images), (n,), generator=generator)
    grid = torch.nn.functional.pad(images[pick].view(n, 8, 8), (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    shifted = grid[torch.arange(n)[:, None, None], rows, cols].reshape(n, 64)
    scale = 0.8 + 0.4 * torch.rand(n, 1, generator=generator)
    noisy = shifted * scale + 0.1 * torch.randn(n, 64, generator=generator)
    return TensorDataset(noisy.clamp(0, 1), labels[pick])


def jittered_split_digits(
    seed: int = 0, train_per_task: int = 6000, eval_per_task: int = 1000
) -> tuple[list[TensorDataset], list[TensorDataset]]:
    """(train tasks, eval tasks): 5 class pairs, generated from disjoint original images."""
    x, y = digits_tensors()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    cut = int(0.7 * len(y))
    train_idx, eval_idx = order[:cut], order[cut:]
    train_tasks, eval_tasks = [], []
    for pair in split_by_classes(TensorDataset(x, y), 2):
        members = torch.as_tensor(pair.indices)
        own_train = members[torch.isin(members, train_idx)]
        own_eval = members[torch.isin(members, eval_idx)]
        train_tasks.append(jitter(x[own_train], y[own_train], train_per_task, g))
        eval_tasks.append(jitter(x[own_eval], y[own_eval], eval_per_task, g))
    return train_tasks, eval_tasks


def run(
    seed: int = 0,
    *,
    every_n_steps: int | None = 1,
    epochs_per_task: int = 10,
    batch_size: int = 256,
    train_per_task: int = 6000,
    memory: int | None = None,
    lr: float = 0.01,
    gap_within: int | None = 50,
    out: str | None = None,
    plot: bool = False,
) -> tuple[ContinualEvaluation | None, pl.Trainer]:
    """Train the 5 tasks; with ``every_n_steps=None`` no ContinualEvaluation (the baseline).
    ``memory`` defaults to the paper's 2,000 of 60,000, scaled to our training set. The gap's
    trough is searched in the first ``gap_within`` evaluations after a switch (a fifth of a
    task's 240 steps), so that slow forgetting later in the task is not counted as the gap."""
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    train, evaluation = jittered_split_digits(seed, train_per_task)
    memory = memory or round(PAPER_MEMORY * 5 * train_per_task / MNIST_TRAIN)
    data = TaskStream(
        train,
        evaluation,
        epochs_per_task=epochs_per_task,
        batch_size=batch_size,
        replay_capacity=memory,
        seed=seed,
    )
    callbacks = []
    cb = None
    if every_n_steps is not None:
        cb = ContinualEvaluation(
            every_n_steps=every_n_steps,
            subsample=1000,
            gap_within=gap_within,
            seed=seed,
            export_dir=out,
            export=out is not None,
            plot=plot,
        )
        callbacks.append(cb)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=5 * epochs_per_task,
        reload_dataloaders_every_n_epochs=epochs_per_task,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(ReplayMLP(lr=lr), datamodule=data)
    return cb, trainer


def end_of_task_view(cb: ContinualEvaluation) -> dict[str, Any]:
    """What evaluating only at task ends reports, next to the per-step figures."""
    summary = cb.summary()
    matrix = torch.tensor(summary["matrix"])
    t = matrix.shape[0]
    # Worst accuracy of each old task seen at later task ends (the end-of-task "min-ACC").
    ends_min = [float(matrix[j + 1 :, j].min()) for j in range(t - 1)]
    ends_min_acc = sum(ends_min) / len(ends_min)
    first = summary["gap"][0][1]
    return {
        "acc": summary["acc"],
        "min_acc": summary["min_acc"],
        "min_acc_task_ends": ends_min_acc,
        "wc_acc": summary["wc_acc"],
        "wc_acc_task_ends": float(matrix[t - 1, t - 1]) / t + (1 - 1 / t) * ends_min_acc,
        "task1_end": first["reference"],
        "task1_worst_in_task2": first["worst"],
        "task1_drop": first["depth"],
        "task1_steps_to_worst": first["steps_to_worst"],
        "task1_recovery": first["recovery"],
        "task1_after_task2": first["end"],
        "gap_depth": summary["gap_depth"],
        "gap_recovery": summary["gap_recovery"],
        "bwt": summary["bwt"],
        "chaudhry_forgetting": summary["chaudhry_forgetting"],
        "stream_forgetting": summary["stream_forgetting"],
    }


def gap_table(cb: ContinualEvaluation) -> list[str]:
    """One line per (task, later task switch): drop, recovery, what remains; then forgetting."""
    summary = cb.summary()
    lines = ["task  at task  before  trough  depth  recovery  end  (steps to trough)"]
    for task, per_switch in summary["gap"].items():
        for switch, g in per_switch.items():
            lines.append(
                f"{task + 1:>4}  {switch + 1:>7}  {g['reference']:.3f}  {g['worst']:.3f}  "
                f"{g['depth']:.3f}  {g['recovery']:8.3f}  {g['end']:.3f}  "
                f"({g['steps_to_worst']:.0f})"
            )
    for task, value in summary["forgetting_per_task"].items():
        lines.append(f"final forgetting of task {task + 1} (Chaudhry): {value:.3f}")
    return lines


# ----------------------------------------------------------------------------------------------
# The stability gap in language-model continual pre-training (Guo et al. 2024), in miniature:
# a small causal LM pre-trained on one synthetic "domain" (a Markov chain over tokens) continues
# on another; the perplexity of both domains' held-out sets is evaluated every few steps.


class MarkovDomain(Dataset):
    """Token sequences from a domain's Markov chain, as Hugging Face style dicts whose labels are
    the input ids. Each token has two likely successors (45 % each) drawn per domain; the rest
    is uniform noise. Different domains share the vocabulary but not the transitions."""

    def __init__(self, domain: int, n: int, length: int = 32, vocab: int = 32, seed: int = 0):
        chain = torch.Generator().manual_seed(1_000 + domain)  # the domain itself: fixed
        successors = torch.stack([torch.randperm(vocab, generator=chain)[:2] for _ in range(vocab)])
        g = torch.Generator().manual_seed(seed * 7919 + domain)
        tokens = torch.empty(n, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (n,), generator=g)
        for t in range(1, length):
            u = torch.rand(n, generator=g)
            likely = successors[tokens[:, t - 1], (u < 0.45).long()]
            tokens[:, t] = torch.where(u < 0.9, likely, torch.randint(vocab, (n,), generator=g))
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.tokens[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TinyCausalLM(pl.LightningModule):
    """Embedding, one GRU layer, tied output head; Hugging Face conventions: the loss when given
    labels (shifted inside), ``{"logits": ...}`` otherwise."""

    def __init__(self, vocab: int = 32, dim: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Any:
        hidden, _ = self.rnn(self.embed(input_ids))
        logits = hidden @ self.embed.weight.T
        if labels is None:
            return {"logits": logits}
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


LM_RECIPES = ("plain", "replay", "subset")


def continual_pretraining_data(recipe: str, seed: int, sequences: int = 2048) -> Dataset:
    """The second phase's training set, by recipe (Guo et al. 2024, section 4):

    - ``plain``: ``sequences`` new-domain sequences, one pass.
    - ``replay``: the same, with a quarter of each batch drawn from the first domain (data
      mixture replay: the mixture stays close to the pre-training distribution).
    - ``subset``: a quarter of the new-domain data, seen for four epochs (the paper's "a subset
      of the right size for several epochs"; here the subset is random, as every sequence of a
      synthetic domain is equally "high quality").
    """
    new = MarkovDomain(1, sequences, seed=seed)
    if recipe == "plain":
        return new
    if recipe == "replay":
        old = MarkovDomain(0, sequences // 3, seed=seed + 1)
        return ConcatDataset([new, old])
    if recipe == "subset":
        quarter = Subset(new, range(sequences // 4))
        return ConcatDataset([quarter] * 4)
    raise ValueError(f"recipe must be one of {LM_RECIPES}, got {recipe!r}")


def run_lm(
    seed: int = 0, recipe: str = "plain", *, every_n_steps: int = 2, out: str | None = None
) -> ContinualEvaluation:
    """Pre-train on domain 0 (one fit), continue on domain 1 (a second fit) with ``recipe``;
    perplexity of both domains' held-out sets every ``every_n_steps`` steps."""
    from lightning_ext._batch import causal_lm_batch

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    held_out = [MarkovDomain(d, 256, seed=seed + 100) for d in (0, 1)]
    cb = ContinualEvaluation(
        held_out,
        metric="perplexity",
        every_n_steps=every_n_steps,
        subsample=256,
        batch_size=256,
        unpack_batch=causal_lm_batch,
        gap_within=40,
        seed=seed,
        export_dir=out,
        export=out is not None,
        plot=out is not None,
    )
    model = TinyCausalLM()
    phases = [MarkovDomain(0, 2048, seed=seed), continual_pretraining_data(recipe, seed)]
    for data in phases:  # each fit trains the next task (domain)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb],
        )
        loader = DataLoader(
            data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        trainer.fit(model, loader)
    return cb


def lm_report(cb: ContinualEvaluation) -> dict[str, float]:
    """Domain 0's perplexity before the switch, its peak and where it ends; domain 1's end."""
    summary = cb.summary()
    gap = summary["gap"][0][1]
    return {
        "ppl_domain0_before": gap["reference"],
        "ppl_domain0_peak": gap["worst"],
        "ppl_domain0_spike": gap["depth"],
        "steps_to_peak": gap["steps_to_worst"],
        "ppl_domain0_recovered_by": gap["recovery"],
        "ppl_domain0_end": gap["end"],
        "ppl_domain1_end": cb.records[-1]["values"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lm",
        choices=LM_RECIPES,
        help="instead of Split-Digits: the language-model domain switch with this recipe",
    )
    parser.add_argument("--every-n-steps", type=int, default=1)
    parser.add_argument("--epochs-per-task", type=int, default=10)
    parser.add_argument("--out", default="runs/stability_gap")
    args = parser.parse_args()
    if args.lm:
        lm_cb = run_lm(args.seed, args.lm, out=args.out)
        for name, value in lm_report(lm_cb).items():
            print(f"{name:>26}: {value:.4f}")
        return
    cb, trainer = run(
        args.seed,
        every_n_steps=args.every_n_steps,
        epochs_per_task=args.epochs_per_task,
        out=args.out,
        plot=True,
    )
    assert cb is not None
    torch.set_printoptions(precision=3)
    print("accuracy matrix (row: end of task i, column: task j):")
    print(torch.tensor(cb.summary()["matrix"]))
    for name, value in end_of_task_view(cb).items():
        print(f"{name:>24}: {value:.4f}" if not math.isnan(value) else f"{name:>24}: n/a")
    print("\n".join(gap_table(cb)))
    print(f"{len(cb.records)} evaluations over {trainer.global_step} steps; curves in {args.out}/")


if __name__ == "__main__":
    main()
