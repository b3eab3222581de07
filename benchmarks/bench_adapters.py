"""LoRA adapter merging beside PEFT's ``add_weighted_adapter``: how far the merged updates are
from PEFT's on the same adapters, and the time of each, side by side in one run.

    python -m benchmarks.bench_adapters

Model: a stack of square ``nn.Linear`` layers (no download), three LoRA adapters on every layer
(ranks 8, 8, 4, randomly initialised), weights ``[0.7, 0.5, -0.3]``; merges to rank 8 (``svd``)
or by concatenation (``cat``). Writes ``benchmarks/results/bench_adapters_cpu.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.functional.lora import LORA_A, LORA_B, lora_delta, merge_lora_adapters

LAYERS, WIDTH = 8, 512
SPECS = [("x", 8, 16.0), ("y", 8, 8.0), ("z", 4, 4.0)]
WEIGHTS = [0.7, 0.5, -0.3]


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))


def _model():  # type: ignore[no-untyped-def]
    import peft

    torch.manual_seed(0)
    model = None
    for name, r, alpha in SPECS:
        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["layers." + str(i) for i in range(LAYERS)],
            init_lora_weights=False,
        )
        if model is None:
            model = peft.get_peft_model(Stack(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def main() -> None:
    import peft

    model = _model()
    names = [s[0] for s in SPECS]
    adapters = [peft.get_peft_model_state_dict(model, adapter_name=n) for n in names]
    scalings = [model.base_model.model.layers[0].scaling[n] for n in names]
    rows = []
    counter = iter(range(10**6))  # PEFT returns at once for a name it has: a new one per call
    for combination in ("svd", "cat"):
        target = f"merged_{combination}"
        model.add_weighted_adapter(names, WEIGHTS, target, combination_type=combination, svd_rank=8)
        ours, rank = merge_lora_adapters(
            adapters, scalings, adapter_weights=WEIGHTS, combination=combination, rank=8
        )
        diff, scale = 0.0, 0.0
        for i, layer in enumerate(model.base_model.model.layers):
            theirs = layer.get_delta_weight(target)
            key = next(k[: -len(LORA_A)] for k in ours if k.endswith(f"layers.{i}{LORA_A}"))
            mine = lora_delta(ours[key + LORA_A], ours[key + LORA_B], 1.0)
            diff = max(diff, float((mine - theirs).abs().max()))
            scale = max(scale, float(theirs.abs().max()))

        def run_peft(combination: str = combination) -> None:
            model.add_weighted_adapter(
                names, WEIGHTS, f"t{next(counter)}", combination_type=combination, svd_rank=8
            )

        def run_ours(combination: str = combination) -> None:
            merge_lora_adapters(
                adapters, scalings, adapter_weights=WEIGHTS, combination=combination, rank=8
            )

        times = interleaved_timings(
            {"peft": run_peft, "ours": run_ours}, repeats=5, inner=1, warmup=1
        )
        rows.append(
            [
                combination,
                rank,
                f"{diff:.2e}",
                f"{scale:.3g}",
                median(times["peft"]) * 1e3,
                median(times["ours"]) * 1e3,
            ]
        )
    body = (
        f"Model: {LAYERS} x nn.Linear({WIDTH}, {WIDTH}); adapters of ranks 8, 8, 4 (lora_alpha "
        "16, 8, 4) on every layer, weights [0.7, 0.5, -0.3]. The update of each merged layer is "
        "compared with PEFT's `get_delta_weight` of its own merged adapter; time is one merge "
        "of all layers (PEFT's includes creating the new adapter's modules), median of 5.\n\n"
        + markdown_table(
            [
                "combination",
                "merged rank",
                "max abs difference vs PEFT",
                "max abs update",
                "PEFT ms",
                "lightning-ext ms",
            ],
            rows,
        )
    )
    write_result(
        "bench_adapters_cpu",
        "LoRA adapter merging beside PEFT's add_weighted_adapter",
        body,
        "python -m benchmarks.bench_adapters",
    )


if __name__ == "__main__":
    main()
