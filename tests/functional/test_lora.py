"""Merging LoRA adapters (``functional.lora``, ``io.adapters``, ``lightning-ext merge-adapters``)
against PEFT's own ``add_weighted_adapter`` on the same adapters of a tiny custom model (nothing
downloaded): the merged weight updates agree for ``svd`` and ``cat``; every registry method runs
on the updates; bad adapters are refused naming what is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_ext.cli import main as cli_main
from lightning_ext.functional import MERGE_METHODS, ties_merge
from lightning_ext.functional.lora import (
    LORA_A,
    LORA_B,
    lora_delta,
    lora_modules,
    merge_lora_adapters,
    svd_factors,
)
from lightning_ext.io.adapters import load_peft_adapter, merge_peft_adapters

peft = pytest.importorskip("peft", reason="peft is in the dev extra: pip install -e '.[dev]'")

TARGETS = ["q", "v"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.v(self.q(x)))


def _peft_model(specs: list[tuple[str, int, float]]) -> peft.PeftModel:
    """A PeftModel over ``Tiny`` with one randomly initialised adapter per (name, r, alpha)."""
    torch.manual_seed(0)
    base = Tiny()
    model = None
    for name, r, alpha in specs:
        config = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False
        )
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    assert model is not None
    return model


def _adapter(model: peft.PeftModel, name: str) -> tuple[dict[str, Tensor], float]:
    """An adapter's tensors in the saved layout (adapter name removed) and its scaling."""
    state = peft.get_peft_model_state_dict(model, adapter_name=name)
    scaling = model.base_model.model.q.scaling[name]
    return {k: v.detach().clone() for k, v in state.items()}, scaling


def _peft_deltas(model: peft.PeftModel, name: str) -> dict[str, Tensor]:
    return {m: getattr(model.base_model.model, m).get_delta_weight(name) for m in TARGETS}


def _our_deltas(merged: dict[str, Tensor], scaling: float = 1.0) -> dict[str, Tensor]:
    return {
        m.rsplit(".", 1)[-1]: lora_delta(merged[m + LORA_A], merged[m + LORA_B], scaling)
        for m in lora_modules(merged)
    }


SPECS = [("x", 4, 8.0), ("y", 4, 16.0), ("z", 2, 3.0)]


@pytest.mark.parametrize("combination", ["svd", "cat"])
def test_merged_updates_match_peft_add_weighted_adapter(combination):
    model = _peft_model(SPECS)
    weights = [0.7, 0.5, -0.3]
    names = [s[0] for s in SPECS]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, svd_rank=4)
    theirs = _peft_deltas(model, "merged")
    adapters, scalings = zip(*(_adapter(model, n) for n in names))
    ours, rank = merge_lora_adapters(
        list(adapters), list(scalings), adapter_weights=weights, combination=combination, rank=4
    )
    assert rank == (10 if combination == "cat" else 4)
    assert set(ours) == set(adapters[0])
    for m, delta in _our_deltas(ours).items():
        torch.testing.assert_close(delta, theirs[m], rtol=1e-4, atol=1e-5)
    exact = {
        m: sum(
            w * lora_delta(ad[k + LORA_A], ad[k + LORA_B], s)
            for ad, s, w in zip(adapters, scalings, weights)
        )
        for m in TARGETS
        for k in [next(p for p in lora_modules(adapters[0]) if p.endswith("." + m))]
    }
    error = max(float((d - exact[m]).abs().max()) for m, d in _our_deltas(ours).items())
    assert (error < 1e-5) if combination == "cat" else (error > 1e-3)  # rank 10 cut to 4


def test_svd_factors_are_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(9, 7, generator=g, dtype=torch.float64)
    a, b = svd_factors(delta, 3)
    s = torch.linalg.svdvals(delta)
    assert float(torch.linalg.matrix_norm(delta - b @ a)) == pytest.approx(
        float(s[3:].square().sum().sqrt())
    )
    a, b = svd_factors(delta[:, :2], 4)  # rank above min(out, in): zero-padded
    assert a.shape == (4, 2) and torch.allclose(b @ a, delta[:, :2])


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_registry_method_runs_on_the_updates(method):
    model = _peft_model(SPECS[:2])
    adapters, scalings = zip(*(_adapter(model, n) for n in ("x", "y")))
    options = {
        "weighted": {"weights": [1.0, 2.0]},
        "dare": {"density": 0.5},
        "dare-ties": {"density": 0.5},
        "della": {"density": 0.5},
        "breadcrumbs": {"density": 0.5},
    }.get(method, {})
    merged, rank = merge_lora_adapters(
        list(adapters), list(scalings), method=method, options=options
    )
    assert rank == 4 and all(torch.isfinite(t).all() for t in merged.values())
    if method == "ties":  # the merge of the full updates, cut to rank 4
        deltas = [
            {m: lora_delta(ad[m + LORA_A], ad[m + LORA_B], s) for m in lora_modules(ad)}
            for ad, s in zip(adapters, scalings)
        ]
        zero = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
        full = ties_merge(zero, deltas)
        for m in lora_modules(merged):
            a, b = svd_factors(full[m], 4)
            torch.testing.assert_close(merged[m + LORA_B] @ merged[m + LORA_A], b @ a)


def test_adapter_folders_merge_on_the_command_line_and_load_in_peft(tmp_path):
    model = _peft_model(SPECS[:2])
    folders = []
    for name in ("x", "y"):
        model.save_pretrained(tmp_path / name, selected_adapters=[name])
        (config,) = (tmp_path / name).glob("**/adapter_config.json")
        folders.append(config.parent)
    out = tmp_path / "merged"
    args = ["merge-adapters", *map(str, folders), "-o", str(out), "--adapter-weights", "1", "0.5"]
    assert cli_main(args) == 0
    _, config = load_peft_adapter(out)
    assert config["r"] == config["lora_alpha"] == 4 and sorted(config["target_modules"]) == TARGETS
    model.add_weighted_adapter(["x", "y"], [1.0, 0.5], "merged", combination_type="svd")
    theirs = _peft_deltas(model, "merged")
    loaded = peft.PeftModel.from_pretrained(Tiny(), out)
    for m in TARGETS:
        ours = getattr(loaded.base_model.model, m).get_delta_weight("default")
        torch.testing.assert_close(ours, theirs[m], rtol=1e-4, atol=1e-5)
    same = merge_peft_adapters(folders, tmp_path / "ties", method="ties", options={"density": 0.5})
    assert load_peft_adapter(same)[1]["r"] == 4


def test_bad_adapters_are_refused_naming_what_is_wrong(tmp_path, capsys):
    a = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(
        ValueError, match=re.escape("'m.lora_magnitude_vector' is not a lora_A/lora_B")
    ):
        lora_modules({**a, "m.lora_magnitude_vector": torch.zeros(4)})
    with pytest.raises(ValueError, match=re.escape("'m.lora_A.weight' has no 'm.lora_B.weight'")):
        lora_modules({"m.lora_A.weight": torch.zeros(2, 3)})
    other = {"n.lora_A.weight": torch.zeros(2, 3), "n.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="adapter 1 adapts other modules than adapter 0"):
        merge_lora_adapters([a, other], [1.0, 1.0])
    with pytest.raises(ValueError, match="needs method='task-arithmetic'"):
        merge_lora_adapters([a, a], [1.0, 1.0], method="ties", combination="cat")
    with pytest.raises(ValueError, match="got 1 scalings for 2 adapters"):
        merge_lora_adapters([a, a], [1.0])
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"m": 8}})
    )
    torch.save(a, folder / "adapter_model.bin")
    out = str(tmp_path / "o")
    assert cli_main(["merge-adapters", str(folder), str(folder), "-o", out]) == 2
    assert "alpha_pattern are not supported" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["merge-adapters", str(empty), str(folder), "-o", out]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not Path(out).exists()


def test_merge_adapters_never_replaces_an_input_or_an_existing_adapter(tmp_path, capsys):
    model = _peft_model(SPECS[:2])
    folders = []
    for name in ("x", "y"):
        model.save_pretrained(tmp_path / name, selected_adapters=[name])
        (config,) = (tmp_path / name).glob("**/adapter_config.json")
        folders.append(config.parent)
    before = {p: p.read_bytes() for f in folders for p in f.iterdir()}
    args = ["merge-adapters", *map(str, folders)]
    assert cli_main([*args, "-o", str(folders[0])]) == 2  # the output is an input folder
    assert "inside the input folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for f in folders for p in f.iterdir()} == before
    out = tmp_path / "merged"
    assert cli_main([*args, "-o", str(out)]) == 0
    written = (out / "adapter_config.json").read_bytes()
    assert cli_main([*args, "-o", str(out), "--adapter-weights", "1", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "adapter_config.json").read_bytes() == written
    assert cli_main([*args, "-o", str(out), "--adapter-weights", "1", "0.5", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "options",
    [
        ["--adapter-weights", "nan", "1"],
        ["--combination", "cat", "--method", "ties", "--density", "0.5"],
        ["--rank", "0"],
    ],
)
def test_a_refused_request_leaves_no_output_folder(tmp_path, capsys, options):
    # The request is checked before the adapters are read and before the output folder is made
    # (it was made, then left empty, when the merge refused an option).
    missing = tmp_path / "not-an-adapter"  # never read: the options are refused first
    out = tmp_path / "merged"
    assert cli_main(["merge-adapters", str(missing), str(missing), "-o", str(out), *options]) == 2
    assert "no adapter_config.json" not in capsys.readouterr().err
    assert not out.exists()
