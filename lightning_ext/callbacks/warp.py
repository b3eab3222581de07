"""WARP stage 1: the anchor of a KL-regularised fine-tuning, kept by a callback.

The anchor is a frozen copy of the LightningModule, held by this callback (so it is not in the
module's ``parameters()`` or ``state_dict()`` and no optimizer ever sees it), always in eval mode.
Three ways to move it, for comparison:

- ``"ema"`` (WARP, Rame et al. 2024): after every optimizer step,
  ``anchor <- (1 - mu) * anchor + mu * policy`` with ``mu = 0.01``;
- ``"init"``: the frozen initialisation of the fit, the usual RLHF reference;
- ``"sync"`` (TR-DPO style, as TRL's SyncRefModelCallback): every ``tau`` optimizer steps,
  ``anchor <- alpha * policy + (1 - alpha) * anchor``.

A ``training_step`` gets the anchor's outputs in one line, with no change elsewhere::

    ref_logits = WARP.anchor(self)(tokens)   # frozen: no graph is built through the anchor
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_ext.callbacks._steps import AfterOptimizerStep
from lightning_ext.functional.ema import ema_update_

AnchorKind = Literal["ema", "init", "sync"]


class WARP(AfterOptimizerStep):
    """Keep the KL anchor of a fine-tuning: an EMA of the policy, its initialisation, or a
    periodically synchronised copy.

    Args:
        anchor: ``"ema"`` (WARP's exponential moving average), ``"init"`` (frozen at the start of
            the fit) or ``"sync"`` (TR-DPO-style periodic soft update).
        mu: EMA rate of the ``"ema"`` anchor: weight of the current policy in each update.
        alpha: weight of the policy in each ``"sync"`` update (1 copies the policy: a hard sync).
        tau: optimizer steps between ``"sync"`` updates.

    Logged (every ``log_every_n_steps``): ``warp/anchor_distance``, the L2 distance between the
    policy's and the anchor's weights, and ``warp/anchor_updates``. The KL itself depends on the
    task, so the module computes and logs it from ``WARP.anchor(self)(...)``.

    Raises:
        ValueError: an unknown ``anchor``, ``mu`` or ``alpha`` outside (0, 1], or ``tau`` not a
            positive integer.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_ext.callbacks import WARP
        >>> warp = WARP(anchor="ema", mu=0.01)
        >>> trainer = pl.Trainer(max_steps=100, callbacks=[warp], logger=False)

        In the module's ``training_step``: ``reference = WARP.anchor(self)(batch)``, then a KL
        between the policy's and the reference's outputs.
    """

    def __init__(
        self, anchor: AnchorKind = "ema", mu: float = 0.01, alpha: float = 0.6, tau: int = 512
    ) -> None:
        if anchor not in ("ema", "init", "sync"):
            raise ValueError(f"anchor must be 'ema', 'init' or 'sync', got {anchor!r}")
        if not 0.0 < mu <= 1.0:
            raise ValueError(f"mu must lie in (0, 1], got {mu} (WARP uses 0.01)")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if int(tau) != tau or tau < 1:
            raise ValueError(f"tau must be a positive number of optimizer steps, got {tau}")
        self.kind: AnchorKind = anchor
        self.mu, self.alpha, self.tau = float(mu), float(alpha), int(tau)
        self.updates = 0
        self._anchor: pl.LightningModule | None = None
        self._pairs: list[tuple[list[Tensor], list[Tensor]]] = []  # (anchor floats, policy floats)
        self._copies: list[tuple[Tensor, Tensor]] = []  # integer buffers: (anchor, policy)
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(anchor=self.kind)

    # -- the public accessor ---------------------------------------------------------------
    @staticmethod
    def anchor(pl_module: pl.LightningModule) -> nn.Module:
        """The frozen anchor of ``pl_module``'s current fit: call it like the module itself."""
        trainer = pl_module._trainer
        # Lightning's connectors set this Trainer attribute at run time.
        callbacks = trainer.callbacks if trainer else []  # type: ignore[attr-defined]
        found = [cb for cb in callbacks if isinstance(cb, WARP)]
        if len(found) != 1:
            raise RuntimeError(
                f"WARP.anchor needs exactly one lightning_ext.callbacks.WARP among the Trainer's "
                f"callbacks, found {len(found)}: add WARP() to Trainer(callbacks=[...])"
            )
        if found[0]._anchor is None:
            raise RuntimeError("the WARP anchor exists from on_fit_start on: call it during fit")
        return found[0]._anchor

    @property
    def anchor_module(self) -> nn.Module | None:
        """The anchor held by this callback (None before the fit starts)."""
        return self._anchor

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.kind == "sync" and self.tau > trainer.max_steps > 0:
            raise ValueError(
                f"tau={self.tau} exceeds max_steps={trainer.max_steps}: the 'sync' anchor would "
                "never move; lower tau or use anchor='init'"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build_anchor(pl_module)
        self.updates = 0
        if self._pending_state is not None:  # load_state_dict came first
            self._apply_state(self._pending_state)
            self._pending_state = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pairs, self._copies = [], []  # keep the anchor for inspection, drop the views

    def _build_anchor(self, pl_module: pl.LightningModule) -> None:
        anchor = copy.deepcopy(pl_module)  # LightningModule.__getstate__ drops the trainer
        anchor.requires_grad_(False)
        anchor.eval()
        for p in anchor.parameters():
            p.grad = None  # a module fitted before may carry gradients: the anchor needs none
        self._anchor = anchor
        policy = dict(pl_module.named_parameters()) | dict(pl_module.named_buffers())
        mine = dict(anchor.named_parameters()) | dict(anchor.named_buffers())
        floats: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        self._copies = []
        for name, theirs in policy.items():
            ours = mine[name]
            if ours.is_floating_point():
                group = floats.setdefault((ours.device, ours.dtype), ([], []))
                group[0].append(ours)
                group[1].append(theirs)
            else:
                self._copies.append((ours, theirs))
        self._pairs = list(floats.values())

    # -- updates ---------------------------------------------------------------------------
    def on_optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.kind == "ema":
            self._move_towards_policy(self.mu)
        elif self.kind == "sync" and step % self.tau == 0:
            self._move_towards_policy(self.alpha)
        # Lightning's connectors set this Trainer attribute at run time.
        if step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            pl_module.log("warp/anchor_distance", self._distance(), on_step=True, on_epoch=False)
            pl_module.log("warp/anchor_updates", float(self.updates), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _move_towards_policy(self, weight: float) -> None:
        for anchor_tensors, policy_tensors in self._pairs:
            ema_update_(anchor_tensors, policy_tensors, 1.0 - weight)
        for ours, theirs in self._copies:
            ours.copy_(theirs)
        self.updates += 1

    @torch.no_grad()
    def _distance(self) -> Tensor:
        total = None
        for anchor_tensors, policy_tensors in self._pairs:
            diffs = torch._foreach_sub([p.detach() for p in policy_tensors], anchor_tensors)
            sq = torch.stack([d.float().pow(2).sum() for d in diffs]).sum()
            total = sq if total is None else total + sq.to(total.device)
        return total.sqrt() if total is not None else torch.zeros(())

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor_kind": self.kind,
            "mu": self.mu,
            "alpha": self.alpha,
            "tau": self.tau,
            "updates": self.updates,
            "anchor": None if self._anchor is None else self._anchor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["anchor_kind"] != self.kind:
            raise ValueError(
                f"checkpoint holds a WARP anchor of kind {state_dict['anchor_kind']!r} but this "
                f"callback keeps {self.kind!r}: resume with WARP(anchor="
                f"{state_dict['anchor_kind']!r})"
            )
        if self._anchor is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._anchor is not None
        if state["anchor"] is not None:
            self._anchor.load_state_dict(state["anchor"])
        self.updates = int(state["updates"])
