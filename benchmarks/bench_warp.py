"""WARP costs, measured side by side in one run:

1. the anchor's update per optimizer step: one KL-regularised training step with the EMA anchor
   (one foreach lerp over the weights) against the same step with the frozen anchor (no update);
2. the merge: ``multi_slerp`` of M fine-tunings against a plain weighted average of the same
   state dicts, and ``liti`` alone, on a ~4M-parameter state dict.

Run:  python -m benchmarks.bench_warp
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.callbacks import WARP
from lightning_ext.functional import liti, multi_slerp


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def training_step_candidates(width: int = 512, batch: int = 64) -> dict:
    """A hand-driven KL-regularised step: policy forward, anchor forward, backward, Adam step,
    then the callback's anchor update (what WARP adds on every step)."""
    torch.manual_seed(0)
    x = torch.randn(batch, width)
    candidates = {}
    for kind in ("init", "ema"):
        policy = _mlp(width)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
        warp = WARP(anchor=kind)
        warp._build_anchor(policy)  # the callback's own setup, without a Trainer
        anchor = warp.anchor_module

        def step(policy=policy, opt=opt, warp=warp, anchor=anchor, kind=kind) -> None:
            logp = policy(x).log_softmax(-1)
            with torch.no_grad():
                ref = anchor(x).log_softmax(-1)
            loss = (logp.exp() * (logp - ref)).sum(-1).mean() - logp[:, 0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if kind == "ema":
                warp._move_towards_policy(warp.mu)

        candidates[f"step, {kind} anchor"] = step
    return candidates


def merge_candidates(width: int = 1024, m: int = 4) -> dict:
    torch.manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(width, width) for i in range(4)}
    policies = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(m)]

    def average() -> None:
        {k: torch.stack([p[k] for p in policies]).mean(0) for k in base}

    return {
        f"weighted average, M={m}": average,
        f"multi_slerp, M={m}": lambda: multi_slerp(base, policies),
        "multi_slerp, M=2": lambda: multi_slerp(base, policies[:2]),
        "liti": lambda: liti(base, policies[0], 0.5),
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    steps = interleaved_timings(training_step_candidates(), repeats=7, inner=20)
    ref = median(steps["step, init anchor"])
    for name, times in steps.items():
        rows.append([name, f"{median(times) * 1e3:.2f} ms", f"{median(times) / ref:.3f}"])
    merges = interleaved_timings(merge_candidates(), repeats=5, inner=2, warmup=1)
    ref = median(merges["weighted average, M=4"])
    for name, times in merges.items():
        rows.append([name, f"{median(times) * 1e3:.1f} ms", f"{median(times) / ref:.2f}"])
    body = (
        "Training step: 3-layer MLP, width 512 (0.53M parameters), batch 64, Adam; ratio to the "
        "frozen-anchor step. Merge: 4 tensors of 1024x1024 (4.2M parameters); ratio to a plain "
        "weighted average of the same M=4 state dicts.\n\n"
        + markdown_table(["candidate", "median time", "ratio"], rows)
    )
    write_result(
        "bench_warp_cpu",
        "WARP: anchor-update and merge costs",
        body,
        "python -m benchmarks.bench_warp",
    )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    main()
