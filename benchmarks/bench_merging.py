"""Merge benchmark: peak resident memory and time versus the number of ingredients.

16 checkpoints of a ~21M-parameter model (a stack of 2048x2048 linear layers, 80 MiB each in
float32) are merged with the streaming implementation (``soup_io.Ingredients`` feeding
``functional``: uniform soup, TIES, Model Stock, greedy soup) and, for contrast, with the naive
"load every checkpoint, then average" approach. Each measurement runs in a fresh process and
reads its peak RSS (Linux's VmHWM, reset just before merging; ``resource.getrusage``
elsewhere); the table reports it above the process's RSS
before merging, in units of one ingredient.

    python -m benchmarks.bench_merging          # writes benchmarks/results/bench_merging_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import markdown_table, write_result
from lightning_ext._io import load_file

WIDTH, LAYERS = 2048, 5


def make_checkpoints(root: Path, count: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(WIDTH, WIDTH, generator=g) for i in range(LAYERS)}
    base.update({f"layer{i}.bias": torch.randn(WIDTH, generator=g) for i in range(LAYERS)})
    base["norm.num_batches_tracked"] = torch.tensor(0)
    torch.save({"state_dict": base}, root / "base.ckpt")
    paths = []
    for j in range(count):
        sd = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        paths.append(root / f"ingredient{j}.ckpt")
        torch.save({"state_dict": sd, "epoch": j}, paths[-1])
    return paths


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Linux resets the peak RSS (VmHWM) on writing 5 to clear_refs: the peak of the merge alone,
    not of importing torch. Elsewhere, fall back to getrusage's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(method: str, paths: list[str], base: str) -> dict:
    """Runs in a child process: merge, report peak RSS above the starting RSS, and time."""
    from lightning_ext.functional import greedy_soup, model_stock, ties_merge, uniform_soup
    from lightning_ext.io.ingredients import Ingredients, load_state_dict

    torch.set_num_threads(1)
    start_rss = status_mb("VmRSS")
    resettable = reset_peak_rss()
    start = time.perf_counter()
    ings = Ingredients(paths).validate()
    if method == "uniform (streaming)":
        uniform_soup(ings)
    elif method == "TIES (streaming)":
        ties_merge(load_state_dict(base), ings, density=0.2)
    elif method == "Model Stock (streaming)":
        model_stock(load_state_dict(base), ings)
    elif method == "greedy (streaming)":
        # A stand-in held-out score: cheap, and it accepts every other candidate.
        state = {"calls": 0}

        def evaluate(sd: dict) -> float:
            state["calls"] += 1
            return float(state["calls"] % 2)

        greedy_soup(ings, evaluate, mode="max")  # the stand-in score is higher-better
    elif method == "uniform (load all, naive)":
        sds = [load_file(p)["state_dict"] for p in paths]
        {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    if resettable:
        peak = status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak, "start_mb": start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (peaks then vary with allocator history)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(job["method"], job["paths"], job["base"])))
        return
    methods = [
        "uniform (streaming)",
        "TIES (streaming)",
        "Model Stock (streaming)",
        "greedy (streaming)",
        "uniform (load all, naive)",
    ]
    env = dict(os.environ)
    if not args.default_malloc:
        # glibc raises its mmap threshold after freeing a large block, so later per-tensor
        # temporaries land in the heap and fragment it; a fixed threshold measures the algorithm.
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), max(args.counts))
        ingredient_mb = paths[0].stat().st_size / 2**20
        params = LAYERS * (WIDTH * WIDTH + WIDTH)
        for method in methods:
            for n in args.counts:
                job = {
                    "method": method,
                    "paths": [str(p) for p in paths[:n]],
                    "base": str(Path(tmp) / "base.ckpt"),
                }
                out = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(job)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                extra = r["peak_mb"] - r["start_mb"]
                rows.append(
                    [
                        method,
                        n,
                        f"{extra:.0f}",
                        f"{extra / ingredient_mb:.2f}",
                        f"{r['seconds']:.2f}",
                        f"{r['seconds'] / n:.3f}",
                    ]
                )
                print(rows[-1], flush=True)
    body = (
        f"Model: {params / 1e6:.1f}M float32 parameters, {ingredient_mb:.0f} MiB per checkpoint. "
        f"Allocator: {'glibc defaults' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=1MiB'}. "
        "Peak RSS above the process's RSS before merging (torch imported), in MiB and in units "
        "of one ingredient; time includes validating every checkpoint's layout first. "
        "Greedy uses a stand-in score (no model evaluation), so it measures the merge machinery: "
        "the soup, one candidate and one ingredient. The machine is shared with other jobs: "
        "timings vary several-fold between runs; the memory figures do not.\n\n"
        + markdown_table(
            [
                "method",
                "ingredients",
                "peak extra RSS (MiB)",
                "in ingredients",
                "seconds",
                "seconds / ingredient",
            ],
            rows,
        )
    )
    write_result(
        "bench_merging_cpu",
        "Merging: memory and time vs ingredient count",
        body,
        "python -m benchmarks.bench_merging" + " --default-malloc" * args.default_malloc,
    )


if __name__ == "__main__":
    main()
