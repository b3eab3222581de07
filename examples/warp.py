"""WARP on a tiny autoregressive policy, on CPU in minutes: the reward vs KL(policy || SFT) front.

1. Pre-train ("SFT") a small GRU language model on a synthetic corpus: sequences drawn from a
   seeded, peaky Markov chain over 12 tokens.
2. Fine-tune it with REINFORCE (leave-one-out baseline) against a programmatic reward, the
   fraction of tokens equal to a target token that the corpus makes rare, with the KL penalty
   folded into the reward: R = r(y) - beta * log(pi(y) / pi_anchor(y)).
3. Compare, at equal steps per fine-tuning:
   - the frozen-SFT anchor (``WARP(anchor="init")``) at several beta: the usual RLHF front;
   - the EMA anchor (``WARP(anchor="ema", mu=0.01)``): one fine-tuning;
   - SLERP of M = 2 EMA-anchored fine-tunings, then the LITI eta sweep;
   - a second WARP iteration started from the first one's LITI (eta = 0.5).
4. Evaluate each point by its mean reward and KL(pi || pi_SFT) (exact per-token KL summed along
   1024 sampled sequences, a low-variance unbiased estimate), over several seeds, and check
   whether WARP's points lie above the frozen-anchor front at the same KL.

Run:  python examples/warp.py [--seeds 3] [--steps 150]
Writes benchmarks/results/warp.md, warp.json and warp.png.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ext._io import atomic_write_json  # noqa: E402
from lightning_ext.callbacks import WARP  # noqa: E402
from lightning_ext.warp import run_warp  # noqa: E402

VOCAB, LENGTH, BOS = 12, 12, 12
ETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)


# -- model, corpus, reward --------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, dim)
        self.rnn = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits for every position of ``tokens`` [B, T] (BOS prepended)."""
        inputs = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
        return self.head(self.rnn(self.embed(inputs))[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        tokens = torch.full((n, 1), BOS, dtype=torch.long)
        hidden, out = None, []
        for _ in range(LENGTH):
            h, hidden = self.rnn(self.embed(tokens[:, -1:]), hidden)
            probs = self.head(h[:, -1]).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            tokens = torch.cat([tokens, nxt], dim=1)
        return torch.cat(out, dim=1)


def markov_corpus(seed: int, n: int = 4096) -> tuple[Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # Dirichlet sampling draws from the global generator
        torch.manual_seed(seed)
        trans = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.3)).sample((VOCAB,))
    x = torch.empty(n, LENGTH, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, LENGTH):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
    counts = torch.bincount(x.flatten(), minlength=VOCAB)
    target = int(torch.argsort(counts)[VOCAB // 3])  # a token the corpus makes fairly rare
    return x, target


def reward(tokens: Tensor, target: int) -> Tensor:
    return (tokens == target).float().mean(-1)


def pretrain(corpus: Tensor, seed: int, steps: int = 300) -> TinyLM:
    torch.manual_seed(seed)
    net = TinyLM()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = corpus[torch.randint(0, len(corpus), (128,), generator=g)]
        loss = F.cross_entropy(net(batch).flatten(0, 1), batch.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


# -- the fine-tuning: a plain LightningModule whose only WARP line is marked ------------------
class Reinforce(pl.LightningModule):
    def __init__(self, target: int, beta: float, lr: float = 3e-3, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyLM()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        y = self.net.sample(self.hparams.batch_size)
        logp = self(y).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
        ref_logp = WARP.anchor(self)(y).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        kl = (logp.detach() - ref_logp.sum(-1)).clamp_min(-50)  # log pi / pi_anchor per sample
        r = reward(y, self.hparams.target)
        total = r - self.hparams.beta * kl
        n = total.numel()
        advantage = total - (total.sum() - total) / (n - 1)  # leave-one-out baseline
        self.log_dict({"reward": r.mean(), "kl_anchor": kl.mean()}, prog_bar=False)
        return -(advantage * logp).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loader(steps: int, batch_size: int) -> DataLoader:
    """Prompts are all BOS: the loader only counts steps."""
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


class RecordEnd(pl.Callback):
    """Keeps the last logged training metrics (reward, KL to the anchor) of a fine-tuning."""

    def __init__(self, into: dict) -> None:
        self.into = into

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.into.update({k: float(v) for k, v in trainer.callback_metrics.items()})


def trainer(steps: int, anchor: str, out: Path | None = None, record: dict | None = None):
    extra = [RecordEnd(record)] if record is not None else []
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        callbacks=[WARP(anchor=anchor, mu=0.01), *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    net: TinyLM, refs: dict[str, TinyLM], target: int, n: int = 1024, seed: int = 1234
) -> dict:
    """Mean reward and, for each reference, KL(net || ref): exact per-token KL summed along
    ``n`` sequences sampled from ``net`` (an unbiased, low-variance estimate)."""
    y = net.sample(n, torch.Generator().manual_seed(seed))
    logp = net(y).log_softmax(-1)
    out = {"reward": reward(y, target).mean().item()}
    for name, ref in refs.items():
        logq = ref(y).log_softmax(-1)
        out[f"kl_{name}"] = (logp.exp() * (logp - logq)).sum(-1).sum(-1).mean().item()
    return out


def front_reward_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """Reward of the baseline front at ``kl``: its Pareto-optimal (KL, reward) points joined by
    straight lines, or the best point at a lower KL if that is higher; None outside the KL range
    the points cover."""
    pts = sorted(points)
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    pareto = [p for p in pts if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in pts)]
    best = max(r for k, r in pts if k <= kl)
    for (k0, r0), (k1, r1) in itertools.pairwise(pareto):
        if k0 <= kl <= k1 and k1 > k0:
            best = max(best, r0 + (r1 - r0) * (kl - k0) / (k1 - k0))
    return best


def run_seed(
    seed: int, steps: int, betas: list[float], long_betas: list[float], warp_beta: float, work: Path
) -> dict:
    corpus, target = markov_corpus(seed)
    sft = pretrain(corpus, seed)
    sft.eval()
    sft_state = {f"net.{k}": v for k, v in sft.state_dict().items()}
    ev = lambda net: evaluate(net, {"sft": sft}, target)  # noqa: E731
    out: dict = {"target": target, "sft": ev(sft), "frozen": {}, "frozen_2x": {}, "warp": {}}
    out["training"] = {}

    def module(beta: float) -> Reinforce:
        m = Reinforce(target, beta)
        m.load_state_dict(sft_state)
        return m

    for key, n_steps, bs in (("frozen", steps, betas), ("frozen_2x", 2 * steps, long_betas)):
        for beta in bs:
            pl.seed_everything(seed, verbose=False)
            m = module(beta)
            trainer(n_steps, "init").fit(m, loader(n_steps, 64))
            out[key][f"{beta:g}"] = ev(m.net)

    seed_dir = work / f"seed{seed}"

    def evaluate_liti(m: pl.LightningModule, iteration: int) -> dict:
        start = TinyLM()
        init = torch.load(seed_dir / f"iteration_{iteration}/init.pt", weights_only=True)
        start.load_state_dict({k.removeprefix("net."): v for k, v in init.items()})
        return evaluate(m.net, {"sft": sft, "iteration_init": start}, target)

    def make_trainer(run) -> pl.Trainer:
        record = out["training"].setdefault(f"iteration_{run.iteration}/policy_{run.policy}", {})
        return trainer(steps, "ema", run.root_dir, record)

    result = run_warp(
        lambda: module(warp_beta),
        make_trainer,
        seed_dir,
        iterations=2,
        num_policies=2,
        eta=0.5,
        fit_kwargs=lambda run: {"train_dataloaders": loader(steps, 64)},
        evaluate=evaluate_liti,
        eta_sweep=ETAS,
        seed=seed,
    )
    # the single EMA-anchored policy (no merge) of iteration 0
    m = module(warp_beta)
    m.load_state_dict(torch.load(work / f"seed{seed}/iteration_0/policy_0.pt", weights_only=True))
    out["ema_single"] = ev(m.net)
    out["warp"] = {f"iteration_{i}": metrics for i, metrics in enumerate(result.metrics)}
    return out


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _front(run: dict, keys: tuple[str, ...]) -> list[tuple[float, float]]:
    return [(v["kl_sft"], v["reward"]) for key in keys for v in run[key].values()]


def _points(runs: dict[int, dict], betas: list[float], long_betas: list[float]) -> list:
    """(label, getter, is_warp) for every point of the comparison."""
    pts = [("SFT", lambda r: r["sft"], False)]
    pts += [
        (f"frozen anchor, beta={b:g}", lambda r, b=b: r["frozen"][f"{b:g}"], False) for b in betas
    ]
    pts += [
        (f"frozen anchor, 2x steps, beta={b:g}", lambda r, b=b: r["frozen_2x"][f"{b:g}"], False)
        for b in long_betas
    ]
    pts.append(("EMA anchor, 1 policy (no merge)", lambda r: r["ema_single"], True))
    for it in (0, 1):
        for eta in ETAS:
            pts.append(
                (
                    f"WARP iteration {it + 1}: SLERP M=2, LITI eta={eta:g}",
                    lambda r, it=it, eta=eta: r["warp"][f"iteration_{it}"][f"{eta:g}"],
                    True,
                )
            )
    return pts


def summarise(
    runs: dict[int, dict], betas: list[float], long_betas: list[float]
) -> tuple[str, dict]:
    from benchmarks._common import markdown_table

    seeds = sorted(runs)
    rows, verdict = [], {"1x": [], "best": []}
    for label, get, is_warp in _points(runs, betas, long_betas):
        pts = [get(runs[s]) for s in seeds]
        gaps = {"1x": [], "best": []}
        for s, p in zip(seeds, pts):
            for name, keys in (("1x", ("frozen",)), ("best", ("frozen", "frozen_2x"))):
                ref = front_reward_at(_front(runs[s], keys), p["kl_sft"])
                if ref is not None:
                    gaps[name].append(p["reward"] - ref)
        if is_warp:
            for name in gaps:
                verdict[name] += gaps[name]
        rows.append(
            [
                label,
                _stats([p["kl_sft"] for p in pts]),
                _stats([p["reward"] for p in pts]),
                _stats(gaps["1x"]),
                f"{sum(g > 0 for g in gaps['1x'])}/{len(gaps['1x'])}",
                _stats(gaps["best"]),
                f"{sum(g > 0 for g in gaps['best'])}/{len(gaps['best'])}",
            ]
        )
    header = [
        "point",
        "KL(π‖SFT)",
        "reward",
        "Δreward vs frozen front (same steps)",
        "above",
        "Δreward vs best frozen front (incl. 2x steps)",
        "above",
    ]
    return markdown_table(header, rows), verdict


def training_table(runs: dict[int, dict]) -> str:
    from benchmarks._common import markdown_table

    seeds = sorted(runs)
    rows = []
    for key in sorted(runs[seeds[0]]["training"]):
        vals = [runs[s]["training"][key] for s in seeds]
        rows.append(
            [key, _stats([v["reward"] for v in vals]), _stats([v["kl_anchor"] for v in vals])]
        )
    for it in (0, 1):
        for eta in ETAS:
            vals = [runs[s]["warp"][f"iteration_{it}"][f"{eta:g}"] for s in seeds]
            rows.append(
                [
                    f"iteration_{it} LITI eta={eta:g}",
                    _stats([v["reward"] for v in vals]),
                    _stats([v["kl_iteration_init"] for v in vals]),
                ]
            )
    return markdown_table(
        [
            "run",
            "reward",
            "KL to its anchor (training: EMA anchor, last batch; LITI: iteration init)",
        ],
        rows,
    )


def plot(runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, s in enumerate(sorted(runs)):
        r = runs[s]
        lab = (lambda t: t) if k == 0 else (lambda t: None)
        fr = sorted((v["kl_sft"], v["reward"]) for v in r["frozen"].values())
        ax.plot(
            *zip(*fr), "o-", color="grey", alpha=0.7, label=lab("frozen SFT anchor (beta sweep)")
        )
        ax.plot(
            r["ema_single"]["kl_sft"],
            r["ema_single"]["reward"],
            "s",
            color="C1",
            label=lab("EMA anchor, 1 policy"),
        )
        for it, color in ((0, "C0"), (1, "C3")):
            pts = [r["warp"][f"iteration_{it}"][f"{e:g}"] for e in ETAS]
            ax.plot(
                [p["kl_sft"] for p in pts],
                [p["reward"] for p in pts],
                "^-",
                color=color,
                alpha=0.8,
                label=lab(f"WARP iteration {it + 1}: SLERP + LITI eta sweep"),
            )
    ax.set_xlabel("KL(policy ‖ SFT)")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from lightning_ext._io import atomic_write

    atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=110))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--beta", type=float, default=0.05, help="KL weight of WARP's runs")
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.2, 0.3],
        help="KL weights of the frozen-anchor front",
    )
    parser.add_argument(
        "--long-betas",
        type=float,
        nargs="+",
        default=[0.02, 0.03, 0.05, 0.1, 0.3],
        help="KL weights of the frozen-anchor front trained for 2x steps (WARP's compute)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="warp", help="result files: <name>.md/.json/.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            runs[seed] = run_seed(
                seed, args.steps, args.betas, args.long_betas, args.beta, Path(work)
            )
            print(f"seed {seed} done at {time.perf_counter() - start:.0f}s", flush=True)
    table, verdict = summarise(runs, args.betas, args.long_betas)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({str(k): v for k, v in runs.items()}, args.out / f"{args.name}.json")
    plot(runs, args.out / f"{args.name}.png")
    minutes = (time.perf_counter() - start) / 60
    lines = []
    for name, text in (
        ("1x", "the frozen-anchor front at the same steps per fine-tuning"),
        ("best", "the best frozen-anchor front, including 2x steps"),
    ):
        g = verdict[name]
        above = sum(x > 0 for x in g)
        lines.append(
            f"- Against {text}: {above} of {len(g)} WARP points (EMA-anchor, SLERP and LITI points "
            f"x seeds, where the front covers their KL) have more reward at the same KL; "
            f"mean Δreward {_stats(g)}."
        )
    body = (
        f"{args.seeds} seeds; {args.steps} REINFORCE steps per fine-tuning (batch 64); WARP runs "
        f"use beta={args.beta:g} and mu=0.01; an iteration is 2 fine-tunings. KL(π‖SFT) is "
        f"exact per token, summed along 1024 sampled sequences. Δreward compares each point "
        f"with the frozen-anchor front linearly interpolated at the point's KL (a concave front "
        f"is under-estimated between its points, which flatters WARP; the beta grid is dense to "
        f"keep that small). Wall time {minutes:.1f} min on 1 CPU thread.\n\n"
        + "\n".join(lines)
        + f"\n\n![reward vs KL]({args.name}.png)\n\n"
        + table
        + "\n\n### Logged per fine-tuning and per eta\n\n"
        + training_table(runs)
    )
    from benchmarks._common import write_result

    command = f"python examples/warp.py --seeds {args.seeds} --steps {args.steps}"
    if args.name != "warp":
        command += f" --name {args.name}"
    write_result(
        args.name,
        "WARP: reward vs KL(policy ‖ SFT) on a tiny autoregressive policy",
        body,
        command,
    )


if __name__ == "__main__":
    main()
