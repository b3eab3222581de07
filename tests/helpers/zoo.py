"""A zoo of LightningModules written the way users write theirs, for the conformance matrix.

Nothing here is shaped for lightning-ext: metrics are torchmetrics computed at epoch end, a
forward may return the loss, batches may be dicts, optimization may be manual, the inner network
may be compiled, weights may be tied. Every entry is tiny (one CPU core, well under a second per
step) and builds ``(module, train_loader, val_loader)`` for a seed, on the ``lightning.pytorch``
or the ``pytorch_lightning`` LightningModule (``namespace="pytorch_lightning"``).

The module bodies are written once as mixins and combined with the chosen namespace's
LightningModule on demand, so both namespaces run exactly the same code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import Accuracy, SumMetric

from tests.helpers.data import digits
from tests.helpers.models import CNN, MLP

Namespace = Literal["lightning", "pytorch_lightning"]
Built = tuple[Any, DataLoader, DataLoader | None]

BATCH_SIZE = 16
TRAIN_SAMPLES = 64
VAL_SAMPLES = 32


def lightning_namespace(namespace: Namespace) -> ModuleType:
    """``lightning.pytorch`` or ``pytorch_lightning``."""
    return importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)


def _loaders(
    train: Dataset, val: Dataset | None, seed: int
) -> tuple[DataLoader, DataLoader | None]:
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=g)
    val_loader = DataLoader(val, batch_size=BATCH_SIZE) if val is not None else None
    return train_loader, val_loader


def _digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    return digits("train", seed, TRAIN_SAMPLES), digits("val", seed, VAL_SAMPLES)


# ----------------------------------------------------------------------------- (a) metrics


class MetricsClassifierBody:
    """torchmetrics Accuracy and a sample count updated per batch, computed and logged at epoch
    end (``on_validation_epoch_end``), SGD with a StepLR scheduler."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = MLP()
        self.val_accuracy = Accuracy(task="multiclass", num_classes=10)
        self.val_samples = SumMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_accuracy.update(logits, y)
        self.val_samples.update(torch.ones_like(y, dtype=torch.float).sum())

    def on_validation_epoch_end(self) -> None:
        self.log("val_acc", self.val_accuracy.compute())
        self.log("val_samples", self.val_samples.compute())
        self.val_accuracy.reset()
        self.val_samples.reset()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# ----------------------------------------------------------------------------- (b) BatchNorm


class BatchNormCNNBody:
    """A Conv-BatchNorm classifier with step-level logging, Adam."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = CNN()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ----------------------------------------------------------------------------- (c) causal LM

VOCAB, SEQ_LEN = 12, 10


@dataclass
class CausalLMOutput:
    """Hugging Face style output: ``.loss`` (with labels) and ``.logits``."""

    logits: Tensor
    loss: Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class TinyCausalLM(nn.Module):
    """A one-layer causal transformer; with ``labels`` it shifts them and returns the loss."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, max_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True)
        self.block = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> CausalLMOutput:
        t = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos.weight[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device)
        padding = None if attention_mask is None else attention_mask == 0
        h = self.block(h, mask=causal, src_key_padding_mask=padding, is_causal=True)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss)


class DictLMDataset(Dataset):
    """Counting sequences (next = previous + step mod vocab): learnable in a few steps."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 3, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class CausalLMBody:
    """Dict batches; the model's forward returns the loss; evaluated by loss and perplexity."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = TinyCausalLM()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> CausalLMOutput:
        return self.model(input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("val_loss", loss)
        self.log("val_ppl", torch.exp(loss))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ----------------------------------------------------------------------------- (e) manual


class ManualTwoOptimizersBody:
    """Manual optimization: a body (SGD) and a head (Adam), each stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_body, opt_head = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()
        self.log("train_loss", loss)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.body.parameters(), lr=0.1),
            torch.optim.Adam(self.head.parameters(), lr=1e-2),
        )


# ----------------------------------------------------------------------------- (f) compiled


class CompiledBody(BatchNormCNNBody):
    """The inner network compiled (``eager`` backend: fast to build on CPU); its parameters are
    named ``net._orig_mod.*``."""

    compile_net = True

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.net = torch.compile(MLP(), backend="eager") if self.compile_net else MLP()


class EagerTwinBody(CompiledBody):
    """``CompiledBody`` without the compile: the same weights under the eager parameter names."""

    compile_net = False


# ----------------------------------------------------------------------------- (g) tied


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight (as GPT-2 ties them)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


class TiedWeightsBody:
    """Tuple batches ``(tokens, next_tokens)``, sequence logits ``(B, T, V)``, tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TiedLM()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def _loss(self, batch: Any) -> Tensor:
        tokens, targets = batch
        return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _token_pairs(n: int, seed: int) -> TensorDataset:
    ids = DictLMDataset(n, seed).ids
    return TensorDataset(ids[:, :-1], ids[:, 1:])


# ----------------------------------------------------------------------------- (d) demos


def _demo_classes(namespace: Namespace) -> tuple[type, type]:
    ns = "lightning.pytorch" if namespace == "lightning" else "pytorch_lightning"
    boring = importlib.import_module(f"{ns}.demos.boring_classes").BoringModel
    transformer = importlib.import_module(f"{ns}.demos.transformer").LightningTransformer
    return boring, transformer


@cache
def _offline_transformer(namespace: Namespace) -> type:
    """``LightningTransformer`` as shipped, except ``prepare_data``: the demo downloads WikiText-2
    there, and tests never touch the network."""
    base = _demo_classes(namespace)[1]
    return type("OfflineLightningTransformer", (base,), {"prepare_data": lambda self: None})


# ----------------------------------------------------------------------------- the zoo


@cache
def module_class(body: type, namespace: Namespace) -> type:
    """``body`` on the chosen namespace's LightningModule (made once per pair)."""
    base = lightning_namespace(namespace).LightningModule
    return type(body.__name__.removesuffix("Body"), (body, base), {"__module__": __name__})


@dataclass(frozen=True)
class ZooEntry:
    """One way users write modules. ``monitor``/``mode``: a validation metric it logs (None when
    it logs none); ``batches``: the batch layout; ``forward``: what ``module(inputs)`` returns."""

    name: str
    build: Callable[[int, Namespace], Built]
    monitor: str | None
    mode: Literal["min", "max"]
    batches: Literal["tuple", "dict", "tensor"]
    forward: Literal["logits", "output_object", "two_inputs"]
    logged: tuple[str, ...] = ()

    def __call__(self, seed: int = 0, namespace: Namespace = "lightning") -> Built:
        torch.manual_seed(seed)
        return self.build(seed, namespace)


def _build_body(body: type, data: Callable[[int], tuple[Dataset, Dataset | None]]) -> Callable:
    def build(seed: int, namespace: Namespace) -> Built:
        module = module_class(body, namespace)()
        return (module, *_loaders(*data(seed), seed))

    return build


def _build_boring(seed: int, namespace: Namespace) -> Built:
    module = _demo_classes(namespace)[0]()
    from torch.utils.data import Subset

    train = Subset(module.train_dataloader().dataset, range(TRAIN_SAMPLES))
    val = Subset(module.val_dataloader().dataset, range(VAL_SAMPLES))
    return (module, *_loaders(train, val, seed))


def _build_lightning_transformer(seed: int, namespace: Namespace) -> Built:
    module = _offline_transformer(namespace)(vocab_size=VOCAB)
    train = _token_pairs(TRAIN_SAMPLES // 4, seed)  # the demo's default model is the largest here
    return (module, _loaders(train, None, seed)[0], None)


def eager_twin(entry: ZooEntry) -> ZooEntry:
    """The same module without ``torch.compile`` (for ``compiled_inner``): results that depend
    on parameter names (seeded masks...) must match between the two."""
    if entry.name != "compiled_inner":
        raise ValueError(f"{entry.name} has no eager twin")
    return ZooEntry(
        "compiled_inner_eager", _build_body(EagerTwinBody, _digits), *_fields_after_build(entry)
    )


def _fields_after_build(entry: ZooEntry) -> tuple:
    return (entry.monitor, entry.mode, entry.batches, entry.forward, entry.logged)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "metrics_classifier",
            _build_body(MetricsClassifierBody, _digits),
            "val_acc",
            "max",
            "tuple",
            "logits",
            ("val_loss", "val_acc", "val_samples"),
        ),
        ZooEntry(
            "batchnorm_cnn",
            _build_body(BatchNormCNNBody, _digits),
            "val_acc",
            "max",
            "tuple",
            "logits",
            ("val_loss", "val_acc"),
        ),
        ZooEntry(
            "causal_lm_dict",
            _build_body(
                CausalLMBody,
                lambda seed: (DictLMDataset(TRAIN_SAMPLES, seed), DictLMDataset(VAL_SAMPLES, 99)),
            ),
            "val_loss",
            "min",
            "dict",
            "output_object",
            ("val_loss", "val_ppl"),
        ),
        ZooEntry("boring_model", _build_boring, None, "min", "tensor", "logits"),
        ZooEntry(
            "lightning_transformer",
            _build_lightning_transformer,
            None,
            "min",
            "tuple",
            "two_inputs",
        ),
        ZooEntry(
            "manual_two_optimizers",
            _build_body(ManualTwoOptimizersBody, _digits),
            "val_acc",
            "max",
            "tuple",
            "logits",
            ("val_loss", "val_acc"),
        ),
        ZooEntry(
            "compiled_inner",
            _build_body(CompiledBody, _digits),
            "val_acc",
            "max",
            "tuple",
            "logits",
            ("val_loss", "val_acc"),
        ),
        ZooEntry(
            "tied_weights",
            _build_body(
                TiedWeightsBody,
                lambda seed: (_token_pairs(TRAIN_SAMPLES, seed), _token_pairs(VAL_SAMPLES, 99)),
            ),
            "val_loss",
            "min",
            "tuple",
            "logits",
            ("val_loss",),
        ),
    )
}
