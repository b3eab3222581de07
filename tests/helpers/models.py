"""Tiny models that train on the 8x8 digits in well under a second per epoch on one CPU core."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    def __init__(self, in_dim: int = 64, hidden: int = 32, out_dim: int = 10) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )


class CNN(nn.Module):
    """Conv-BatchNorm network: exercises buffers (running stats, integer counters)."""

    def __init__(self, channels: int = 8, out_dim: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * 16, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.view(-1, 1, 8, 8))
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    """Reads an 8x8 digit as a sequence of 8 row tokens: LayerNorm, attention, embeddings."""

    def __init__(self, dim: int = 16, heads: int = 2, out_dim: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Embedding(8, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.pos.weight
        return self.head(self.norm(self.encoder(tokens).mean(dim=1)))


class MaskedTransformer(TinyTransformer):
    """TinyTransformer reading the rows causally through an additive ``-inf`` mask registered as
    a float buffer, as many GPT implementations do (``lerp(-inf, -inf)`` is NaN)."""

    def __init__(self, dim: int = 16, heads: int = 2, out_dim: int = 10) -> None:
        super().__init__(dim, heads, out_dim)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(8))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.pos.weight
        hidden = self.encoder(tokens, mask=self.causal_mask, is_causal=True)
        return self.head(self.norm(hidden.mean(dim=1)))


NETS = {"mlp": MLP, "cnn": CNN, "transformer": TinyTransformer, "masked": MaskedTransformer}


class Classifier(pl.LightningModule):
    """A plain LightningModule, written the way users write theirs: no lightning-ext hooks."""

    def __init__(
        self,
        net: Literal["mlp", "cnn", "transformer", "masked"] = "mlp",
        lr: float = 0.05,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = NETS[net]()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, sync_dist=True)
        self.log(f"{stage}_acc", acc, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
