"""WARP on a tiny autoregressive policy, on CPU in minutes: TRUE reward vs KL(policy || SFT) when
training optimises a hackable PROXY reward, against the exact optimal front of the true reward.

1. Pre-train ("SFT") a small GRU language model on a synthetic corpus: sequences drawn from a
   seeded, peaky Markov chain over 12 tokens.
2. Fine-tune it with REINFORCE (leave-one-out baseline) against a PROXY reward, the fraction of
   tokens equal to a target token that the corpus makes rare, with the KL penalty folded into the
   reward: R = proxy(y) - beta * log(pi(y) / pi_anchor(y)).
3. Score every policy by the TRUE reward: the fraction of positions that START a run of the
   target token (a repeated target earns nothing). The proxy is the true reward plus an
   exploitable term (the repeats), so pushing the proxy far ends in runs of the target token and
   the true reward falls back: reward over-optimisation, which WARP claims to resist.
4. Compare, at equal steps per fine-tuning:
   - the frozen-SFT anchor (``WARP(anchor="init")``) at several beta: the usual RLHF baseline;
   - the EMA anchor (``WARP(anchor="ema", mu=0.01)``): one fine-tuning;
   - SLERP of M = 2 EMA-anchored fine-tunings, then the LITI eta sweep;
   - a second WARP iteration started from the first one's LITI (eta = 0.5).
5. The optimum of E[r] - beta KL(pi || pi_SFT) is the tilt pi_beta = pi_SFT exp(r / beta) / Z;
   its beta sweep is the optimal TRUE-reward/KL front. The true reward is a sum of pairwise terms
   along the sequence, so the tilt of the corpus' Markov chain is computed exactly by a backward
   recursion; importance sampling from it gives the tilt of the GRU SFT model itself. Each point
   reports its true-reward gap to that front at its own KL.

Run:  python -m examples.warp [--seeds 5] [--steps 150] [--name warp]
Writes benchmarks/results/<name>.md, <name>.json and <name>.png.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]

from lightning_ext._io import atomic_write_json, load_file  # noqa: E402
from lightning_ext.callbacks import WARP  # noqa: E402
from lightning_ext.workflows.warp import run_warp  # noqa: E402

VOCAB, LENGTH, BOS = 12, 12, 12
ETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
# KL weights of the exact optimal front: dense enough that linear interpolation between them is
# within ~1e-3 true reward of the (concave) front; beyond beta = 0.5 the KL is under 0.03 and
# the importance-sampling noise of log Z would dominate it
FRONT_BETAS = tuple(float(b) for b in torch.logspace(math.log10(0.004), math.log10(0.5), 40))


# -- task: corpus, proxy and true rewards -------------------------------------------------------
@dataclass
class Task:
    corpus: Tensor  # [n, LENGTH] sequences of the Markov chain
    trans: Tensor  # [VOCAB, VOCAB] its transition matrix (the first token is uniform)
    target: int  # the token both rewards are about


def markov_task(seed: int, n: int = 4096) -> Task:
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
    return Task(x, trans.double(), target)


def proxy_reward(tokens: Tensor, target: int) -> Tensor:
    """What training optimises: the fraction of target tokens, repeats included."""
    return (tokens == target).float().mean(-1)


def run_starts(tokens: Tensor, target: int) -> Tensor:
    """[B, T] bool: the token is the target and the previous one (or BOS) is not."""
    hit = tokens == target
    return hit & ~F.pad(hit[:, :-1], (1, 0), value=False)


def true_reward(tokens: Tensor, target: int) -> Tensor:
    """What evaluation scores: the fraction of positions starting a run of the target (at most
    1/2, by alternating); the proxy adds the exploitable repeats to it."""
    return run_starts(tokens, target).float().mean(-1)


# -- the exact optimal front of the true reward --------------------------------------------------
def tilted_markov_chain(trans: Tensor, target: int, beta: float) -> tuple[Tensor, Tensor]:
    """Per-position transitions [LENGTH, VOCAB + 1, VOCAB] (row BOS = the first token) of the
    Markov chain tilted by exp(true_reward / beta), and its log normaliser log Z. Exact: the true
    reward is a sum of terms on adjacent pairs, so backward messages solve it."""
    base = torch.cat([trans, torch.full((1, VOCAB), 1.0 / VOCAB, dtype=trans.dtype)])  # BOS row
    start = torch.zeros(VOCAB + 1, VOCAB, dtype=trans.dtype)
    start[:, target] = 1.0
    start[target, target] = 0.0  # a repeat earns nothing
    log_pair = base.log() + start / (beta * LENGTH)  # log P(y_t | y_t-1) + r_t / beta
    log_msg = torch.zeros(VOCAB, dtype=trans.dtype)  # log E[exp(rest / beta) | y_t]
    steps = []
    for _ in range(LENGTH):
        joint = log_pair + log_msg  # [prev, next]
        norm = joint.logsumexp(-1)
        steps.append((joint - norm[:, None]).exp())
        log_msg = norm[:VOCAB]
    steps.reverse()
    return torch.stack(steps), norm[VOCAB]


def sample_chain(steps: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences from per-position transitions, and their log-probabilities."""
    prev = torch.full((n,), BOS, dtype=torch.long)
    out, logp = [], torch.zeros(n, dtype=steps.dtype)
    for t in range(LENGTH):
        probs = steps[t, prev]
        prev = torch.multinomial(probs, 1, generator=g).squeeze(1)
        logp += probs.gather(1, prev[:, None]).squeeze(1).log()
        out.append(prev)
    return torch.stack(out, 1), logp


@torch.no_grad()
def sequence_logp(net: nn.Module, tokens: Tensor) -> Tensor:
    return net(tokens).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1).double()


@torch.no_grad()
def optimal_front(sft: nn.Module, task: Task, n: int = 4096, seed: int = 99) -> list[dict]:
    """True reward and KL(pi_beta || SFT) of the tilt pi_beta = SFT exp(r / beta) / Z of the GRU
    SFT model, per beta of FRONT_BETAS, by self-normalised importance sampling. The proposal is
    the exact tilt of the corpus' Markov chain, which the SFT model approximates, so the weights
    only carry the SFT / Markov-chain ratio (``ess``: effective sample size fraction).
    KL = E_beta[r] / beta - log Z."""
    g = torch.Generator().manual_seed(seed)
    front = []
    for beta in FRONT_BETAS:
        steps, _ = tilted_markov_chain(task.trans, task.target, beta)
        y, log_q = sample_chain(steps, n, g)
        r = true_reward(y, task.target).double()
        log_w = sequence_logp(sft, y) + r / beta - log_q  # SFT exp(r / beta) / q: mean is Z
        w = (log_w - log_w.logsumexp(0)).exp()
        mean_r = float((w * r).sum())
        log_z = float(log_w.logsumexp(0) - math.log(n))
        ess = float(1.0 / (w**2).sum()) / n
        kl = max(mean_r / beta - log_z, 0.0)  # a KL: only sampling noise can make it negative
        front.append({"beta": beta, "reward": mean_r, "kl": kl, "ess": ess})
    return front


def front_value(front: list[dict], kl: float) -> float:
    """True reward of the optimal front at ``kl`` (linear between its points; its end beyond);
    the SFT model (KL 0) is its first point."""
    pts = sorted([(0.0, front[-1]["reward"])] + [(p["kl"], p["reward"]) for p in front])
    if kl <= pts[0][0]:
        return pts[0][1]
    for (k0, r0), (k1, r1) in itertools.pairwise(pts):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / max(k1 - k0, 1e-12)
    return pts[-1][1]


# -- model and SFT --------------------------------------------------------------------------------
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
    """REINFORCE on the PROXY reward with the KL to the anchor folded into it."""

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
        r = proxy_reward(y, self.hparams.target)
        total = r - self.hparams.beta * kl
        n = total.numel()
        advantage = total - (total.sum() - total) / (n - 1)  # leave-one-out baseline
        self.log_dict({"reward": r.mean(), "kl_anchor": kl.mean()}, prog_bar=False)
        return -(advantage * logp).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loader(steps: int) -> DataLoader:
    """Prompts are all BOS: the loader only counts steps."""
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


class RecordEnd(pl.Callback):
    """Keeps the last logged training metrics (proxy reward, KL to the anchor) of a fine-tuning."""

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
    """Mean proxy and true rewards and, for each reference, KL(net || ref): exact per-token KL
    summed along ``n`` sequences sampled from ``net`` (an unbiased, low-variance estimate)."""
    y = net.sample(n, torch.Generator().manual_seed(seed))
    logp = net(y).log_softmax(-1)
    out = {
        "proxy": proxy_reward(y, target).mean().item(),
        "reward": true_reward(y, target).mean().item(),
    }
    for name, ref in refs.items():
        logq = ref(y).log_softmax(-1)
        out[f"kl_{name}"] = (logp.exp() * (logp - logq)).sum(-1).sum(-1).mean().item()
    return out


def front_reward_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """True reward of a method's front at ``kl``: its Pareto-optimal (KL, reward) points joined
    by straight lines, or the best point at a lower KL if that is higher; None outside the KL
    range the points cover."""
    pts = sorted(points)
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    pareto = [p for p in pts if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in pts)]
    best = max(r for k, r in pts if k <= kl)
    for (k0, r0), (k1, r1) in itertools.pairwise(pareto):
        if k0 <= kl <= k1 and k1 > k0:
            best = max(best, r0 + (r1 - r0) * (kl - k0) / (k1 - k0))
    return best


def task_vector_cosine(iteration_dir: Path) -> float:
    """Cosine between the task vectors (policy - init) of an iteration's 2 fine-tunings: near 1,
    SLERP returns either of them and merging brings nothing."""
    init = load_file(iteration_dir / "init.pt")
    a, b = (load_file(iteration_dir / f"policy_{m}.pt") for m in (0, 1))
    va = torch.cat([(a[k] - init[k]).flatten().double() for k in init])
    vb = torch.cat([(b[k] - init[k]).flatten().double() for k in init])
    return float(va @ vb / (va.norm() * vb.norm()))


def run_seed(
    seed: int, steps: int, betas: list[float], long_betas: list[float], warp_beta: float, work: Path
) -> dict:
    task = markov_task(seed)
    target = task.target
    sft = pretrain(task.corpus, seed)
    sft.eval()
    sft_state = {f"net.{k}": v for k, v in sft.state_dict().items()}
    ev = lambda net: evaluate(net, {"sft": sft}, target)  # noqa: E731
    out: dict = {"target": target, "sft": ev(sft), "frozen": {}, "frozen_2x": {}, "warp": {}}
    out["optimal_front"] = optimal_front(sft, task)
    out["training"] = {}

    def module(beta: float) -> Reinforce:
        m = Reinforce(target, beta)
        m.load_state_dict(sft_state)
        return m

    for key, n_steps, bs in (("frozen", steps, betas), ("frozen_2x", 2 * steps, long_betas)):
        for beta in bs:
            pl.seed_everything(seed, verbose=False)
            m = module(beta)
            trainer(n_steps, "init").fit(m, loader(n_steps))
            out[key][f"{beta:g}"] = ev(m.net)

    seed_dir = work / f"seed{seed}"

    def evaluate_liti(m: pl.LightningModule, iteration: int) -> dict:
        start = TinyLM()
        init = load_file(seed_dir / f"iteration_{iteration}/init.pt")
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
        fit_kwargs=lambda run: {"train_dataloaders": loader(steps)},
        evaluate=evaluate_liti,
        eta_sweep=ETAS,
        seed=seed,
    )
    # the single EMA-anchored policy (no merge) of iteration 0
    m = module(warp_beta)
    m.load_state_dict(load_file(seed_dir / "iteration_0/policy_0.pt"))
    out["ema_single"] = ev(m.net)
    out["task_vector_cosine"] = [task_vector_cosine(seed_dir / f"iteration_{i}") for i in (0, 1)]
    out["warp"] = {f"iteration_{i}": metrics for i, metrics in enumerate(result.metrics)}
    return out


# -- summaries ------------------------------------------------------------------------------------
def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _above(values: list[float]) -> str:
    return f"{sum(v > 0 for v in values)}/{len(values)}"


def _frozen_front(run: dict, keys: tuple[str, ...]) -> list[tuple[float, float]]:
    return [(v["kl_sft"], v["reward"]) for key in keys for v in run[key].values()]


def _points(betas: list[float], long_betas: list[float]) -> list:
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


def curves(run: dict) -> dict[str, list[dict]]:
    """Each method's evaluated points in one seed."""
    warp = [run["warp"][f"iteration_{it}"][f"{eta:g}"] for it in (0, 1) for eta in ETAS]
    return {
        "frozen anchor (beta sweep)": list(run["frozen"].values()),
        "frozen anchor, 2x steps": list(run["frozen_2x"].values()),
        "EMA anchor, 1 policy": [run["ema_single"]],
        "WARP iteration 1 (SLERP + LITI sweep)": warp[: len(ETAS)],
        "WARP iteration 2 (SLERP + LITI sweep)": warp[len(ETAS) :],
        "WARP, all points (EMA, it. 1, it. 2)": [run["ema_single"], *warp],
    }


def point_table(runs: dict[int, dict], betas: list[float], long_betas: list[float]) -> tuple:
    from benchmarks._common import markdown_table

    seeds = sorted(runs)
    rows, verdict = [], {"1x": [], "best": []}
    for label, get, is_warp in _points(betas, long_betas):
        pts = [get(runs[s]) for s in seeds]
        gaps: dict[str, list[float]] = {"1x": [], "best": []}
        for s, p in zip(seeds, pts):
            for name, keys in (("1x", ("frozen",)), ("best", ("frozen", "frozen_2x"))):
                ref = front_reward_at(_frozen_front(runs[s], keys), p["kl_sft"])
                if ref is not None:
                    gaps[name].append(p["reward"] - ref)
        if is_warp:
            for name in gaps:
                verdict[name] += gaps[name]
        to_optimal = [
            front_value(runs[s]["optimal_front"], p["kl_sft"]) - p["reward"]
            for s, p in zip(seeds, pts)
        ]
        rows.append(
            [
                label,
                _stats([p["kl_sft"] for p in pts]),
                _stats([p["proxy"] for p in pts]),
                _stats([p["reward"] for p in pts]),
                _stats(to_optimal),
                _stats(gaps["1x"]),
                _above(gaps["1x"]),
                _stats(gaps["best"]),
                _above(gaps["best"]),
            ]
        )
    header = [
        "point",
        "KL(π‖SFT)",
        "proxy reward (trained on)",
        "TRUE reward",
        "gap to optimal true front",
        "Δtrue vs frozen front (same steps)",
        "above",
        "Δtrue vs best frozen front (incl. 2x)",
        "above",
    ]
    return markdown_table(header, rows), verdict


def method_summary(runs: dict[int, dict]) -> tuple[str, dict]:
    """Per method: its best true reward, the true reward at its most proxy-optimised point (the
    drop between the two is over-optimisation), its mean gap to the optimal front, and its best
    true reward minus the frozen sweep's, seed by seed."""
    from benchmarks._common import markdown_table

    seeds = sorted(runs)
    per_method: dict[str, dict[str, list[float]]] = {}
    for s in seeds:
        frozen_peak = max(p["reward"] for p in runs[s]["frozen"].values())
        for name, pts in curves(runs[s]).items():
            peak = max(pts, key=lambda p: p["reward"])
            most_proxy = max(pts, key=lambda p: p["proxy"])
            front = runs[s]["optimal_front"]
            stats = per_method.setdefault(name, {})
            for key, value in (
                ("peak", peak["reward"]),
                ("peak_kl", peak["kl_sft"]),
                ("optimal_at_peak_kl", front_value(front, peak["kl_sft"])),
                ("at_max_proxy", most_proxy["reward"]),
                ("drop", peak["reward"] - most_proxy["reward"]),
                (
                    "gap",
                    statistics.fmean(front_value(front, p["kl_sft"]) - p["reward"] for p in pts),
                ),
                ("vs_frozen_peak", peak["reward"] - frozen_peak),
            ):
                stats.setdefault(key, []).append(value)
    rows = [
        [
            name,
            _stats(v["peak"]),
            _stats(v["peak_kl"]),
            _stats(v["optimal_at_peak_kl"]),
            _stats(v["at_max_proxy"]),
            _stats(v["drop"]),
            _stats(v["gap"]),
            _stats(v["vs_frozen_peak"]),
            _above(v["vs_frozen_peak"]),
        ]
        for name, v in per_method.items()
    ]
    header = [
        "method",
        "best TRUE reward",
        "its KL(π‖SFT)",
        "optimal front at that KL",
        "TRUE reward at its max-proxy point",
        "over-optimisation drop",
        "mean gap to optimal front",
        "best true − frozen best (paired)",
        "seeds above",
    ]
    return markdown_table(header, rows), per_method


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
                    _stats([v["proxy"] for v in vals]),
                    _stats([v["kl_iteration_init"] for v in vals]),
                ]
            )
    return markdown_table(
        [
            "run",
            "proxy reward",
            "KL to its anchor (training: EMA anchor, last batch; LITI: iteration init)",
        ],
        rows,
    )


def front_table(runs: dict[int, dict]) -> str:
    """The optimal true front averaged over seeds at a few betas, with its importance-sampling
    effective sample size."""
    from benchmarks._common import markdown_table

    seeds = sorted(runs)
    rows = []
    for i in range(0, len(FRONT_BETAS), 6):
        pts = [runs[s]["optimal_front"][i] for s in seeds]
        rows.append(
            [
                f"{FRONT_BETAS[i]:.3g}",
                _stats([p["kl"] for p in pts]),
                _stats([p["reward"] for p in pts]),
                f"{min(p['ess'] for p in pts):.2f}",
            ]
        )
    return markdown_table(["beta", "KL(π_β‖SFT)", "TRUE reward", "min ESS fraction"], rows)


def _method_points(run: dict) -> list[tuple[str, str, str, list[dict]]]:
    """(label, marker style, color, points) of each method drawn in the figure."""
    frozen = sorted(run["frozen"].values(), key=lambda p: p["kl_sft"])
    warp = [[run["warp"][f"iteration_{it}"][f"{e:g}"] for e in ETAS] for it in (0, 1)]
    return [
        ("frozen SFT anchor (beta sweep)", "o-", "grey", frozen),
        ("EMA anchor, 1 policy", "s", "C1", [run["ema_single"]]),
        ("WARP iteration 1: SLERP + LITI sweep", "^-", "C0", warp[0]),
        ("WARP iteration 2: SLERP + LITI sweep", "^-", "C3", warp[1]),
    ]


def plot(runs: dict[int, dict], path: Path) -> None:
    """Left: true reward vs KL in seed 0 with its optimal front; middle: every point's gap to
    its seed's optimal front, all seeds; right: the proxy reward that training optimised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    first = sorted(runs)[0]
    front = sorted((p["kl"], p["reward"]) for p in runs[first]["optimal_front"])
    axes[0].plot(*zip(*front), "k--", lw=1.2, label="optimal true front (exact tilt)")
    for k, s in enumerate(sorted(runs)):
        run = runs[s]
        for label, style, color, pts in _method_points(run):
            kl = [p["kl_sft"] for p in pts]
            gap = [p["reward"] - front_value(run["optimal_front"], p["kl_sft"]) for p in pts]
            lab = label if k == 0 else None
            if s == first:
                axes[0].plot(kl, [p["reward"] for p in pts], style, color=color, label=label)
            axes[1].plot(kl, gap, style, color=color, alpha=0.6, label=lab)
            axes[2].plot(kl, [p["proxy"] for p in pts], style, color=color, alpha=0.6, label=lab)
    axes[1].axhline(0.0, color="k", ls="--", lw=1)
    titles = (
        f"TRUE reward, seed {first}",
        f"TRUE reward − optimal front at the same KL, {len(runs)} seeds",
        f"PROXY reward (what training optimised), {len(runs)} seeds",
    )
    for ax, title in zip(axes, titles):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0.0)
        ax.set_xlabel("KL(policy ‖ SFT)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    from lightning_ext._io import atomic_write

    atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--beta", type=float, default=0.05, help="KL weight of WARP's runs")
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.05, 0.07, 0.1, 0.2],
        help="KL weights of the frozen-anchor front",
    )
    parser.add_argument(
        "--long-betas",
        type=float,
        nargs="+",
        default=[0.015, 0.02, 0.03, 0.05, 0.1],
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
    points, verdict = point_table(runs, args.betas, args.long_betas)
    methods, per_method = method_summary(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({str(k): v for k, v in runs.items()}, args.out / f"{args.name}.json")
    plot(runs, args.out / f"{args.name}.png")
    minutes = (time.perf_counter() - start) / 60
    warp_all = per_method["WARP, all points (EMA, it. 1, it. 2)"]
    frozen = per_method["frozen anchor (beta sweep)"]
    cosines = [runs[s]["task_vector_cosine"] for s in sorted(runs)]
    lines = [
        f"- Cosine between the 2 task vectors merged by SLERP: iteration 1 "
        f"{_stats([c[0] for c in cosines])}, iteration 2 {_stats([c[1] for c in cosines])}.",
        f"- Best TRUE reward: WARP (any of its points) {_stats(warp_all['peak'])}, frozen-anchor "
        f"sweep {_stats(frozen['peak'])}; WARP higher in {_above(warp_all['vs_frozen_peak'])} "
        f"seeds (paired difference {_stats(warp_all['vs_frozen_peak'])}).",
        f"- Over-optimisation (best true reward minus the true reward of the most "
        f"proxy-optimised point): WARP {_stats(warp_all['drop'])}, frozen "
        f"{_stats(frozen['drop'])}.",
    ]
    for name, text in (
        ("1x", "the frozen-anchor TRUE-reward front at the same steps per fine-tuning"),
        ("best", "the best frozen-anchor TRUE-reward front, including 2x steps"),
    ):
        g = verdict[name]
        lines.append(
            f"- Against {text}: {_above(g)} WARP points (EMA-anchor, SLERP and LITI points x "
            f"seeds, where the front covers their KL) have more true reward at the same KL; "
            f"mean Δ {_stats(g)}."
        )
    body = (
        f"{args.seeds} seeds; {args.steps} REINFORCE steps per fine-tuning (batch 64) on the "
        f"PROXY reward (fraction of target tokens); the TRUE reward counts only the first token "
        f"of each run of the target. WARP runs use beta={args.beta:g} and mu=0.01; an iteration "
        f"is 2 fine-tunings. KL(π‖SFT) is exact per token, summed along 1024 sampled sequences. "
        f"The optimal true front is the tilt SFT·exp(r/β)/Z over {len(FRONT_BETAS)} β, by "
        f"importance sampling (4096 sequences per β) from the exact tilt of the corpus' Markov "
        f"chain. Δtrue compares each point with the frozen-anchor front linearly interpolated "
        f"at the point's KL. Wall time {minutes:.1f} min on 1 CPU thread, `nice -n 10`, on a "
        f"machine shared with other jobs.\n\n"
        + "\n".join(lines)
        + f"\n\n![true and proxy reward vs KL]({args.name}.png)\n\n### Per method\n\n"
        + methods
        + "\n\n### Per point\n\n"
        + points
        + "\n\n### The optimal true-reward front (exact tilt, importance sampling)\n\n"
        + front_table(runs)
        + "\n\n### Logged per fine-tuning and per eta\n\n"
        + training_table(runs)
    )
    from benchmarks._common import write_result

    command = f"python -m examples.warp --seeds {args.seeds} --steps {args.steps}"
    if args.name != "warp":
        command += f" --name {args.name}"
    write_result(
        args.name,
        "WARP: TRUE reward vs KL(policy ‖ SFT) when training on a hackable proxy reward",
        body,
        command,
    )


if __name__ == "__main__":
    main()
