"""Model soups on a generated task that no model saturates, CPU, a few minutes.

The task (drawn per seed): 10 classes, each a mixture of 3 Gaussian blobs in an 8-dimensional
latent space, observed through a fixed random nonlinear map to 64 features plus noise; the
classes overlap, so accuracy stays well below 100%. Pre-training sees only blobs 0 and 1 of every
class; fine-tuning sees all three. The shifted test set moves and widens the latent blobs and adds
observation noise.

Per seed: pre-train an MLP, fine-tune 8 ingredients from it with different learning rates,
augmentation (input noise), weight decays and seeds, save their Lightning checkpoints, and compare
on the test set and the shifted test set:

- the best single ingredient (chosen on the held-out validation set),
- the uniform soup, the greedy soup (``lightning_ext.build_soup``, scored on the held-out
  set by the module's own ``validation_step``), and Model Stock (``functional.model_stock``, base
  = the pre-trained model).

    python -m examples.model_soups        # 5 seeds; writes benchmarks/results/model_soups.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import RESULTS, markdown_table, write_result
from lightning_ext.functional import model_stock, uniform_soup
from lightning_ext.io.ingredients import Ingredients, load_state_dict
from lightning_ext.workflows.soup import build_soup

# (learning rate, weight decay, augmentation noise std, seed offset)
RECIPES = [
    (0.01, 0.0, 0.0, 0),
    (0.02, 0.0, 0.0, 1),
    (0.05, 0.0, 0.0, 2),
    (0.02, 1e-3, 0.0, 3),
    (0.02, 0.0, 0.1, 4),
    (0.05, 1e-3, 0.1, 5),
    (0.1, 0.0, 0.05, 6),
    (0.01, 5e-4, 0.2, 7),
]


class TaskNet(pl.LightningModule):
    def __init__(
        self, lr: float = 0.05, weight_decay: float = 0.0, noise: float = 0.0, hidden: int = 128
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.hparams.noise > 0:
            x = x + self.hparams.noise * torch.randn_like(x)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())
        self.log("val_loss", F.cross_entropy(logits, y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay
        )


@dataclass
class Task:
    """A classification task drawn from ``seed``: class blobs in a latent space, a random
    nonlinear observation map, and a direction along which the shifted test set moves."""

    centres: Tensor  # (classes, blobs, latent)
    w1: Tensor
    w2: Tensor
    shift: Tensor

    @classmethod
    def draw(cls, seed: int, classes: int = 10, blobs: int = 3, latent: int = 8) -> Task:
        g = torch.Generator().manual_seed(seed)
        shift = torch.randn(latent, generator=g)
        return cls(
            centres=1.6 * torch.randn(classes, blobs, latent, generator=g),
            w1=torch.randn(latent, 128, generator=g) / latent**0.5,
            w2=torch.randn(128, 64, generator=g) / 128**0.5,
            shift=shift / shift.norm(),
        )

    def sample(
        self,
        n: int,
        g: torch.Generator,
        blobs: int | None = None,
        offset: float = 0.0,
        spread: float = 1.0,
        noise: float = 0.3,
    ) -> TensorDataset:
        classes, all_blobs, latent = self.centres.shape
        y = torch.randint(0, classes, (n,), generator=g)
        b = torch.randint(0, blobs or all_blobs, (n,), generator=g)
        z = self.centres[y, b] + spread * torch.randn(n, latent, generator=g)
        z = z + offset * self.shift
        x = torch.tanh(z @ self.w1) @ self.w2 + noise * torch.randn(n, 64, generator=g)
        return TensorDataset(x, y)


def accuracy(state: dict, x: Tensor, y: Tensor) -> float:
    model = TaskNet()
    model.load_state_dict(state)
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item()


def trainer(epochs: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def run_seed(seed: int, workdir: Path, pre_epochs: int, ft_epochs: int) -> dict[str, float]:
    task, g = Task.draw(seed), torch.Generator().manual_seed(10_000 + seed)
    pretrain = task.sample(4000, g, blobs=2)  # a related but narrower distribution
    train, val, test = task.sample(2000, g), task.sample(1000, g), task.sample(2000, g)
    shifted = task.sample(2000, g, offset=1.5, spread=1.3, noise=0.5)
    pl.seed_everything(seed, verbose=False)
    pre = TaskNet(lr=0.05)
    trainer(pre_epochs).fit(pre, DataLoader(pretrain, batch_size=64, shuffle=True))
    base = {k: v.clone() for k, v in pre.state_dict().items()}
    paths = []
    for i, (lr, wd, noise, offset) in enumerate(RECIPES):
        pl.seed_everything(seed * 100 + offset, verbose=False)
        model = TaskNet(lr=lr, weight_decay=wd, noise=noise)
        model.load_state_dict(base)
        t = trainer(ft_epochs)
        t.fit(model, DataLoader(train, batch_size=32, shuffle=True))
        paths.append(workdir / f"seed{seed}-ingredient{i}.ckpt")
        t.save_checkpoint(paths[-1])
    greedy = build_soup(
        TaskNet(),
        paths,
        dataloaders=DataLoader(val, batch_size=500),
        monitor="val_acc",
        mode="max",
        progress_bar=False,
    )
    ings = Ingredients(paths)
    best = max(range(len(paths)), key=lambda i: greedy.scores[i])
    candidates = {
        "pre-trained": base,
        "best single (val)": load_state_dict(paths[best]),
        "uniform soup": uniform_soup(ings),
        "greedy soup": greedy.state_dict,
        "Model Stock": model_stock(base, ings),
    }
    out = {"greedy size": float(len(greedy.chosen))}
    for name, state in candidates.items():
        out[f"{name}|test"] = accuracy(state, *test.tensors)
        out[f"{name}|shifted"] = accuracy(state, *shifted.tensors)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pre-epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run_seed(seed, Path(tmp), args.pre_epochs, args.ft_epochs))
            print(f"seed {seed}: {runs[-1]}")

    def stat(key: str) -> str:
        xs = [100 * r[key] for r in runs]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.2f} ± {sd:.2f}"

    names = ["pre-trained", "best single (val)", "uniform soup", "greedy soup", "Model Stock"]

    def gain(key: str) -> str:
        """Points over the best single ingredient, paired per seed (the task differs by seed)."""
        split = key.split("|")[1]
        xs = [100 * (r[key] - r[f"best single (val)|{split}"]) for r in runs]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):+.2f} ± {sd:.2f}"

    rows = [
        [n, stat(f"{n}|test"), gain(f"{n}|test"), stat(f"{n}|shifted"), gain(f"{n}|shifted")]
        for n in names
    ]
    sizes = [int(r["greedy size"]) for r in runs]
    body = (
        f"Generated task (10 classes, 3 latent blobs each, random nonlinear 64-d observation; "
        f"drawn per seed). {len(RECIPES)} ingredients fine-tuned from one pre-trained MLP "
        f"(learning rate, weight decay, input-noise augmentation, seed vary), {len(runs)} seeds "
        f"{args.seeds}; accuracy in %, mean ± std over seeds; 1000 held-out samples for the "
        "greedy soup and the best single choice, 2000 test samples. Shifted: latent blobs moved "
        "by 1.5 along a random direction, widened 1.3x, observation noise 0.5 instead of 0.3. "
        f"Greedy soup sizes: {sizes}. The machine is shared with other jobs (accuracy only, no "
        "timings).\n\n"
        + markdown_table(
            ["model", "test acc", "vs best single", "shifted test acc", "vs best single"], rows
        )
    )
    command = "python -m examples.model_soups --seeds " + " ".join(map(str, args.seeds))
    if args.no_write:
        print(body)
    else:
        plot_gains(runs, names[2:], RESULTS / "model_soups.png")
        body += "\n\n![gain over the best single model per seed](model_soups.png)\n"
        write_result("model_soups", "Model soups on a generated task", body, command)


def plot_gains(runs: list[dict], names: list[str], path: Path) -> None:
    """Each soup's gain over the best single ingredient, per seed, on both test sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, split, title in zip(axes, ("test", "shifted"), ("test", "shifted test")):
        for i, name in enumerate(names):
            gains = [100 * (r[f"{name}|{split}"] - r[f"best single (val)|{split}"]) for r in runs]
            ax.scatter([i] * len(gains), gains, alpha=0.6)
            ax.errorbar(i + 0.15, statistics.mean(gains), fmt="k_", markersize=14)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    axes[0].set_ylabel("accuracy gain over best single (points)")
    fig.suptitle(f"Model soups vs the best single fine-tune ({len(runs)} seeds; bar: mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
