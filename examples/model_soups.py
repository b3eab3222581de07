"""Model soups on real data (scikit-learn's digits), CPU, a few minutes.

Per seed: pre-train a small MLP, fine-tune 8 ingredients from it with different learning rates,
seeds, weight decays and input augmentation, save their Lightning checkpoints, then compare on
the test split and on a shifted test split (rotated by 15 degrees, plus Gaussian noise):

- the best single ingredient (chosen on validation),
- the uniform soup, the greedy soup (``lightning_ext.soups.build_soup``, scored by the module's
  own ``validation_step``), and Model Stock (``functional.model_stock``, base = pre-trained).

    python examples/model_soups.py        # 5 seeds; writes benchmarks/results/model_soups.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import markdown_table, write_result
from lightning_ext.data import digits_splits
from lightning_ext.functional import model_stock, uniform_soup
from lightning_ext.soup_io import Ingredients, load_state_dict
from lightning_ext.soups import build_soup

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


class DigitsNet(pl.LightningModule):
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
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay
        )


def rotate(x: Tensor, degrees: float) -> Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    images = x.view(-1, 1, 8, 8)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).view(-1, 64)


def accuracy(state: dict, x: Tensor, y: Tensor) -> float:
    model = DigitsNet()
    model.load_state_dict(state)
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item()


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run_seed(seed: int, workdir: Path, pre_epochs: int, ft_epochs: int) -> dict[str, float]:
    splits = digits_splits(seed=seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    # Pre-train on half the training set: fine-tuning then has something left to learn.
    half = TensorDataset(*(t[: len(train) // 2] for t in train.tensors))
    pl.seed_everything(seed, verbose=False)
    pre = DigitsNet(lr=0.05)
    trainer(pre_epochs).fit(pre, DataLoader(half, batch_size=64, shuffle=True))
    base = {k: v.clone() for k, v in pre.state_dict().items()}
    paths = []
    for i, (lr, wd, noise, offset) in enumerate(RECIPES):
        pl.seed_everything(seed * 100 + offset, verbose=False)
        model = DigitsNet(lr=lr, weight_decay=wd, noise=noise)
        model.load_state_dict(base)
        t = trainer(ft_epochs)
        t.fit(model, DataLoader(train, batch_size=32, shuffle=True))
        paths.append(workdir / f"seed{seed}-ingredient{i}.ckpt")
        t.save_checkpoint(paths[-1])
    val_loader = DataLoader(val, batch_size=256)
    greedy = build_soup(
        DigitsNet(),
        paths,
        dataloaders=val_loader,
        monitor="val_acc",
        mode="max",
        progress_bar=False,
    )
    ings = Ingredients(paths)
    best = max(range(len(paths)), key=lambda i: greedy.scores[i])
    candidates = {
        "best single (val)": load_state_dict(paths[best]),
        "uniform soup": uniform_soup(ings),
        "greedy soup": greedy.state_dict,
        "Model Stock": model_stock(base, ings),
    }
    x, y = test.tensors
    torch.manual_seed(seed)
    shifted = rotate(x, 15.0) + 0.2 * torch.randn_like(x)
    out = {"greedy size": float(len(greedy.chosen))}
    for name, state in candidates.items():
        out[f"{name}|test"] = accuracy(state, x, y)
        out[f"{name}|shifted"] = accuracy(state, shifted, y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pre-epochs", type=int, default=20)
    parser.add_argument("--ft-epochs", type=int, default=3)
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

    names = ["best single (val)", "uniform soup", "greedy soup", "Model Stock"]
    rows = [[n, stat(f"{n}|test"), stat(f"{n}|shifted")] for n in names]
    sizes = [int(r["greedy size"]) for r in runs]
    body = (
        f"{len(RECIPES)} ingredients fine-tuned from one pre-trained MLP (learning rate, weight "
        f"decay, input noise, seed vary), {len(runs)} seeds {args.seeds}; accuracy in %, "
        "mean ± std over seeds. Shifted: test images rotated by 15 degrees plus Gaussian noise "
        f"(std 0.2). Greedy soup sizes: {sizes}.\n\n"
        + markdown_table(["model", "test acc", "shifted test acc"], rows)
    )
    command = "python examples/model_soups.py --seeds " + " ".join(map(str, args.seeds))
    if args.no_write:
        print(body)
    else:
        write_result("model_soups", "Model soups on digits", body, command)


if __name__ == "__main__":
    main()
