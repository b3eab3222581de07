"""Pruning math against hand-worked values, closed forms and brute-force loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ext._io import load_file
from lightning_ext.data import IndexedDataset, RS2Sampler, find_indices, pruned_subset
from lightning_ext.data.indexed import labels_of, load_scores
from lightning_ext.data.sampling import InfoBatchSampler
from lightning_ext.functional import (
    combine_runs,
    dataset_fingerprint,
    distillation_loss,
    el2n_scores,
    forgetting_scores,
    forgetting_update_,
    grand_scores,
    infobatch_prune,
    loss_scores,
    margin_scores,
    rs2_epoch_indices,
    select_indices,
)
from tests.helpers.data import digits
from tests.helpers.models import CNN, MLP, TinyTransformer


def test_el2n_loss_margin_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 0])
    p1 = math.exp(2) / (math.exp(2) + 1)
    p2 = 1 / (1 + math.exp(3))
    expected = [math.sqrt(0.5), math.sqrt(2) * (1 - p1), math.sqrt(2) * (1 - p2)]
    torch.testing.assert_close(el2n_scores(logits, y), torch.tensor(expected))
    torch.testing.assert_close(
        loss_scores(logits, y), torch.tensor([math.log(2), -math.log(p1), -math.log(p2)])
    )
    torch.testing.assert_close(margin_scores(logits, y), torch.tensor([0.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match="expected logits"):
        el2n_scores(logits, y[:2])


def _loop_grand(model, x, y, params):
    out = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append(torch.sqrt(sum(p.grad.square().sum() for p in params)))
    return torch.stack(out)


class SharedLinear(torch.nn.Module):
    """A linear layer applied twice and a weight tied to a second layer: the factorised path
    must leave both to torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, 16)
        self.twice = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 10)
        self.tied = torch.nn.Linear(16, 10)
        self.tied.weight = self.out.weight

    def forward(self, x):
        h = torch.tanh(self.twice(torch.tanh(self.twice(torch.tanh(self.inp(x))))))
        return self.out(h) + self.tied(h.flip(-1))


class OddConvs(torch.nn.Module):
    """Layers the closed forms cover (dilated bias-free conv, BatchNorm1d with running statistics)
    and one they must leave to torch.func (grouped conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.dilated = torch.nn.Conv2d(1, 4, 3, padding=2, dilation=2, bias=False)
        self.grouped = torch.nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=2)
        self.norm = torch.nn.BatchNorm1d(64)  # eval mode: running statistics, set non-trivially
        self.norm.running_mean.uniform_(-1, 1)
        self.norm.running_var.uniform_(0.5, 2)
        self.norm.weight.data.uniform_(0.5, 1.5)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.dilated(x.view(-1, 1, 8, 8)))))
        return self.head(self.norm(h.flatten(1)))


@pytest.mark.parametrize("net", [MLP, CNN, TinyTransformer, SharedLinear, OddConvs])
@pytest.mark.parametrize("factorise", [True, False])
def test_grand_matches_a_per_sample_loop(net, factorise):
    torch.manual_seed(0)
    model = net()
    ds = digits(limit=24)
    x, y = ds.tensors
    model.train()  # grand_scores must evaluate in eval mode and restore train mode
    fast = grand_scores(model, F.cross_entropy, x, y, chunk_size=16, factorise_linear=factorise)
    assert model.training
    model.eval()
    slow = _loop_grand(model, x, y, list(model.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_grand_last_layer_closed_form_and_frozen_params():
    torch.manual_seed(0)
    model = MLP()
    x, y = digits(limit=30).tensors
    h = torch.nn.Sequential(*list(model)[:4])(x)
    probs = model(x).softmax(-1)
    err = (probs - F.one_hot(y, 10)).norm(dim=-1)
    expected = err * torch.sqrt(h.square().sum(-1) + 1)  # weight grad (p - y) h^T, bias grad p - y
    last = grand_scores(model, F.cross_entropy, x, y, last_layer=True)
    torch.testing.assert_close(last, expected, rtol=1e-4, atol=1e-6)
    # frozen parameters are excluded from "all trainable parameters"
    for p in model[0].parameters():
        p.requires_grad_(False)
    partial = grand_scores(model, F.cross_entropy, x, y)
    slow = _loop_grand(model, x, y, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(partial, slow, rtol=1e-4, atol=1e-6)


def test_forgetting_follows_toneva():
    n = 4
    last, forgotten, learned = (
        torch.full((n,), -1, dtype=torch.int8),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.bool),
    )
    # rows: presentations; columns: examples
    history = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]])
    for row in history:
        forgetting_update_(last, forgotten, learned, torch.arange(n), row)
    # brute force: count 1 -> 0 transitions per column
    brute = [
        sum(int(a == 1 and b == 0) for a, b in itertools.pairwise(column))
        for column in history.T.tolist()
    ]
    assert forgotten.tolist() == brute == [2, 1, 0, 0]
    scores = forgetting_scores(forgotten, learned, num_presentations=len(history))
    assert scores.tolist() == [2, 1, 4, 0]  # never learned: one event per presentation, hardest
    assert select_indices(scores, 0.25).tolist() == [2]
    assert select_indices(scores, 0.5).tolist() == [0, 2]


def _reference_forgetting_total(histories: list[list[list[int]]]) -> list[int]:
    """Independent restatement of mtoneva/example_forgetting's ranking statistic: per run, count
    1 -> 0 transitions of each example's correctness; an example never correct in a run counts
    as many events as that run had presentations; runs are summed."""
    totals = []
    for example in zip(*[list(zip(*run)) for run in histories]):  # per example: its runs
        total = 0
        for presentations in example:
            if not any(presentations):
                total += len(presentations)
            else:
                total += sum(a == 1 and b == 0 for a, b in itertools.pairwise(presentations))
        totals.append(total)
    return totals


def test_forgetting_over_runs_sums_like_the_reference_code():
    """Old behaviour: runs averaged with +inf for never-learned, so one run that never learned
    an example made it +inf (tied with examples never learned in any run)."""
    g = torch.Generator().manual_seed(0)
    n, runs = 40, []
    histories = []
    for run, epochs in enumerate((5, 7, 4)):
        history = (torch.rand(epochs, n, generator=g) < 0.6).long()
        history[:, 0] = 0  # never learned in any run
        history[:, 1] = 0 if run == 0 else 1  # never learned in one run, then always right
        histories.append(history.tolist())
        last, forgotten, learned = (
            torch.full((n,), -1, dtype=torch.int8),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.bool),
        )
        for row in history:
            forgetting_update_(last, forgotten, learned, torch.arange(n), row)
        runs.append(forgetting_scores(forgotten, learned, num_presentations=epochs))
    total = combine_runs(torch.stack(runs), "forgetting")
    assert total.tolist() == _reference_forgetting_total(histories)
    assert torch.isfinite(total).all() and total[0] == 5 + 7 + 4
    assert total[1] == 5 < total[0]  # old: mean with +inf, tied with example 0 at +inf
    torch.testing.assert_close(combine_runs(torch.stack(runs), "el2n"), torch.stack(runs).mean(0))


def test_selection_modes():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0])
    assert select_indices(scores, 0.3).tolist() == [1, 5, 9]
    assert select_indices(scores, 0.3, "easiest").tolist() == [0, 4, 6]
    assert select_indices(scores, 0.3, "offset", offset=0.2).tolist() == [3, 5, 7]
    rnd = select_indices(scores, 0.5, "random", seed=3)
    assert rnd.numel() == 5 and rnd.unique().numel() == 5
    assert torch.equal(rnd, select_indices(scores, 0.5, "random", seed=3))
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert select_indices(scores, 0.4, "class_balanced", labels=labels).tolist() == [1, 3, 5, 9]
    assert select_indices(scores, 1.0).tolist() == list(range(10))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        select_indices(torch.rand(10), fraction)
    with pytest.raises(ValueError, match="fraction"):
        RS2Sampler(digits(limit=10), fraction)


def test_selection_refuses_nan_and_missing_labels():
    with pytest.raises(ValueError, match="never scored"):
        select_indices(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="one label per score"):
        select_indices(torch.rand(4), 0.5, "class_balanced")


def test_fingerprint_and_score_dataset_mismatch(tmp_path):
    ds = digits(limit=50)
    labels = labels_of(ds)
    fp = dataset_fingerprint(labels)
    assert fp["size"] == 50
    assert dataset_fingerprint(labels.flip(0)) != fp
    path = tmp_path / "s.pt"
    torch.save({"fingerprint": fp, "scores": torch.arange(50.0)}, path)
    sub = pruned_subset(ds, str(path), 0.2)
    assert sub.indices == list(range(40, 50))
    with pytest.raises(ValueError, match="score/dataset mismatch"):
        pruned_subset(digits(limit=60), str(path), 0.2)
    with pytest.raises(ValueError, match="score/dataset mismatch"):
        load_scores(str(path), labels.flip(0))
    with pytest.raises(ValueError, match="score/dataset mismatch"):
        pruned_subset(ds, torch.rand(49), 0.5)


def test_indexed_dataset_and_missing_indices():
    ds = IndexedDataset(digits(limit=8))
    x, y, i = ds[3]
    assert i == 3 and y == digits(limit=8)[3][1]
    batch = torch.utils.data.default_collate([ds[j] for j in range(4)])
    assert find_indices(batch).tolist() == [0, 1, 2, 3]
    assert find_indices({"x": x, "index": torch.tensor([5])}).tolist() == [5]
    with pytest.raises(ValueError, match="IndexedDataset"):
        find_indices(torch.utils.data.default_collate([digits(limit=4)[j] for j in range(4)])[:1])
    with pytest.raises(ValueError, match="IndexedDataset"):
        plain = torch.utils.data.default_collate([digits(limit=4)[j] for j in range(4)])
        find_indices([plain[0], x[:2]])


def test_rs2_is_without_replacement_across_epochs():
    n, fraction = 23, 0.3  # slice 7 does not divide 23: slices straddle permutations
    m = round(n * fraction)
    stream = torch.cat([rs2_epoch_indices(n, fraction, e, seed=1) for e in range(10)])
    assert stream.numel() == 10 * m
    for k in range(stream.numel() // n):  # every window of n consecutive positions per cycle
        assert sorted(stream[k * n : (k + 1) * n].tolist()) == list(range(n))
    # the sampler shards an epoch across ranks, covering it
    ds = digits(limit=n)
    shards = []
    for rank in range(2):
        s = RS2Sampler(ds, fraction, seed=1, num_replicas=2, rank=rank)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    assert set(shards[0]) | set(shards[1]) == set(
        rs2_epoch_indices(n, fraction, 3, seed=1).tolist()
    )


@pytest.mark.parametrize("n", [7, 23, 50, 103, 256])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.45, 0.7, 0.99])
def test_rs2_never_repeats_inside_an_epoch(n, fraction):
    """Old behaviour: an epoch straddling two permutations could draw an example from both
    (8 repeats in 12 epochs at n=103, fraction 0.3)."""
    epochs = [rs2_epoch_indices(n, fraction, e, seed=2) for e in range(40)]
    m = round(n * fraction)
    for e, idx in enumerate(epochs):
        assert idx.numel() == m and idx.unique().numel() == m, f"epoch {e} repeats"
    stream = torch.cat(epochs)
    for k in range(stream.numel() // n):  # each pass still covers every example once
        assert sorted(stream[k * n : (k + 1) * n].tolist()) == list(range(n))
    # stateless: an epoch asked for alone (e.g. after a resume) is the same
    torch.testing.assert_close(rs2_epoch_indices(n, fraction, 17, seed=2), epochs[17])


def test_sequence_scores_average_over_scored_tokens():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    targets[0, 3:] = -100
    targets[2, :] = -100  # nothing scored: 0
    for fn in (el2n_scores, loss_scores, margin_scores):
        per_token = fn(logits.reshape(15, 4), targets.clamp_min(0).reshape(15)).reshape(3, 5)
        valid = targets != -100
        expected = torch.stack(
            [
                per_token[i][valid[i]].mean() if valid[i].any() else torch.tensor(0.0)
                for i in range(3)
            ]
        )
        torch.testing.assert_close(fn(logits, targets), expected)
    with pytest.raises(ValueError, match="expected logits"):
        el2n_scores(logits, targets[:, :4])


def test_ccs_keeps_every_score_stratum_and_drops_the_hardest():
    g = torch.Generator().manual_seed(0)
    # a long easy tail and few hard examples: hardest-first would keep only the hard end
    scores = torch.cat([torch.rand(900, generator=g) * 0.1, 0.1 + torch.rand(100, generator=g)])
    keep = select_indices(scores, 0.2, "ccs", offset=0.05, strata=10, seed=1)
    assert keep.numel() == 200 and keep.unique().numel() == 200
    hardest_50 = torch.sort(scores, descending=True).indices[:50]
    assert not set(hardest_50.tolist()) & set(keep.tolist())  # the offset cut
    # independently: bins over the remaining range, budget spread smallest bin first
    rest = torch.sort(scores, descending=True).indices[50:]
    low, high = scores[rest].min(), scores[rest].max()
    bins = ((scores[rest] - low) / ((high - low) / 10)).floor().clamp(0, 9).long()
    sizes = sorted(int((bins == b).sum()) for b in range(10) if (bins == b).any())
    budget, expected = 200, []
    for left, size in zip(range(len(sizes), 0, -1), sizes):
        expected.append(min(size, budget // left))
        budget -= expected[-1]
    kept_bins = bins[torch.isin(rest, keep)]
    assert sorted(int((kept_bins == b).sum()) for b in kept_bins.unique()) == sorted(expected)
    assert torch.equal(keep, select_indices(scores, 0.2, "ccs", offset=0.05, strata=10, seed=1))


def test_grand_with_forward_fn_on_dict_inputs():
    """An HF-style model: forward(**inputs) returns an object with .logits; sequence targets."""
    torch.manual_seed(0)

    class TokenModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids) * attention_mask[..., None]
            return {"logits": self.head(torch.tanh(h.cumsum(1)))}

    model = TokenModel()
    ids = torch.randint(0, 11, (6, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100

    def forward_fn(module, batch):
        return module(**batch)["logits"]

    def loss_fn(logits, t):
        from lightning_ext._batch import per_sample_cross_entropy

        return per_sample_cross_entropy(logits, t).mean()

    fast = grand_scores(model, loss_fn, inputs, targets, forward_fn=forward_fn)
    slow = []
    for i in range(6):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss_fn(forward_fn(model, one), targets[i : i + 1]).backward()
        slow.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())))
    torch.testing.assert_close(fast, torch.stack(slow), rtol=1e-4, atol=1e-6)


def test_infobatch_rule():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.zeros(5000), torch.ones(5000)])  # mean 0.5
    kept, weights = infobatch_prune(scores, 0.75, g)
    dropped = torch.ones(10000, dtype=torch.bool)
    dropped[kept] = False
    assert not dropped[5000:].any()  # above mean: always kept
    assert abs(dropped[:5000].float().mean().item() - 0.75) < 0.03
    kept_low = kept[kept < 5000]
    torch.testing.assert_close(weights[kept_low], torch.full_like(weights[kept_low], 4.0))
    assert (weights[5000:] == 1).all()
    # expected total weight is unchanged: sum of kept weights ~ number of examples
    assert abs(weights[kept].sum().item() - 10000) / 10000 < 0.05
    nan_kept, _ = infobatch_prune(torch.full((4,), float("nan")), 0.5, g)
    assert nan_kept.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="prune_prob"):
        infobatch_prune(scores, 1.0, g)
    sampler = InfoBatchSampler(digits(limit=100), seed=0)
    sampler.configure(torch.arange(100.0), 0.5, pruning=True)
    assert 60 <= len(list(sampler)) <= 90


def test_distillation_loss():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    torch.testing.assert_close(distillation_loss(s, s, y, alpha=1.0), torch.tensor(0.0))
    kl = (
        (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1)))
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=2.0, alpha=1.0), 4 * kl)


def _cli(argv):
    import argparse

    from lightning_ext.cli import pruning as pruning_cli

    parser = argparse.ArgumentParser(prog="lightning-ext")
    pruning_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_prune_select_cli_writes_the_subset_and_reports_class_coverage(tmp_path, capsys):
    labels = torch.arange(40) % 4
    scores = labels.double() + torch.linspace(0, 0.5, 40)  # class 3 hardest, class 0 easiest
    fp = dataset_fingerprint(labels)
    path = tmp_path / "s.pt"
    torch.save({"fingerprint": fp, "scores": scores, "labels": labels, "score": "el2n"}, path)
    out = tmp_path / "keep.pt"
    assert _cli(["prune-select", str(path), "--keep", "0.25", "--out", str(out)]) == 0
    kept = load_file(out)  # a plain tensor: loads weights-only
    assert torch.equal(kept, select_indices(scores, 0.25))
    report = capsys.readouterr().out
    assert "kept 10 of 40" in report and "no example left: [0, 1, 2]" in report
    out_json = tmp_path / "keep.json"
    _cli(
        [
            "prune-select",
            str(path),
            "--keep",
            "0.25",
            "--strategy",
            "class_balanced",
            "--out",
            str(out_json),
        ]
    )
    import json

    balanced = torch.tensor(json.loads(out_json.read_text()))
    assert torch.bincount(labels[balanced]).tolist() == [2, 2, 2, 2]  # round(0.25 * 10) each
    assert "no example left" not in capsys.readouterr().out
    torch.save({**torch.load(path), "task": "sequence"}, path)
    with pytest.raises(ValueError, match="sequence targets"):
        _cli(
            [
                "prune-select",
                str(path),
                "--keep",
                "0.5",
                "--strategy",
                "class_balanced",
                "--out",
                str(out.with_name("sequence_keep.pt")),
            ]
        )


def test_class_ccs_is_ccs_inside_each_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    scores = torch.rand(300, generator=g) + labels  # class 2 hardest as a whole
    keep = select_indices(scores, 0.2, "class_ccs", labels=labels, offset=0.1, strata=5, seed=4)
    assert torch.bincount(labels[keep]).tolist() == [20, 20, 20]  # hardest-first: all class 2
    for cls in range(3):  # each class's part is CCS over that class alone, with its budget
        members = (labels == cls).nonzero()[:, 0]
        alone = select_indices(scores[members], 0.2, "ccs", offset=0.1, strata=5, seed=4 + cls)
        assert torch.equal(keep[labels[keep] == cls], members[alone])
    with pytest.raises(ValueError, match="class_ccs selection needs one label per score"):
        select_indices(scores, 0.2, "class_ccs")


class _Pickled:
    """An arbitrary object: a weights-only load must refuse it."""


def test_score_files_load_weights_only_unless_trusted(tmp_path):
    """Old behaviour: torch.load(weights_only=False) unpickled anything in a score file."""
    labels = labels_of(digits(limit=10))
    path = tmp_path / "s.pt"
    record = {"fingerprint": dataset_fingerprint(labels), "scores": torch.rand(10)}
    torch.save({**record, "extra": _Pickled()}, path)
    with pytest.raises(ValueError, match="trusted=True"):
        load_scores(path)
    with pytest.raises(ValueError, match="trusted=True"):
        pruned_subset(digits(limit=10), str(path), 0.5)
    assert isinstance(load_scores(path, trusted=True)["extra"], _Pickled)
    assert len(pruned_subset(digits(limit=10), str(path), 0.5, trusted=True)) == 5


def test_an_option_the_selection_mode_does_not_use_is_named_not_silently_dropped() -> None:
    """``offset=0.2`` with ``hardest`` kept the very examples the offset was meant to drop, with
    no word; defaults (not given) stay silent, and a mode's own options are used."""
    import warnings

    from lightning_ext.functional.pruning import select_indices

    scores = torch.arange(10.0)
    with pytest.warns(UserWarning, match=r"'hardest' does not use offset, strata \(ignored\)"):
        kept = select_indices(scores, 0.3, "hardest", offset=0.2, strata=4)
    assert kept.tolist() == [7, 8, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_indices(scores, 0.3).tolist() == [7, 8, 9]
        assert select_indices(scores, 0.3, "offset", offset=0.2).tolist() == [5, 6, 7]
