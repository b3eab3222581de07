"""When does sparsity pay at inference on a CPU? The exported CSR model (``sparse-export --format
csr``: ``functional.to_csr``) against the dense one, at 80, 90 and 95% sparsity: forward time
per batch (measured side by side, round-robin) and size in memory and on disk.

    python -m benchmarks.bench_sparse_inference

Model: an MLP of ``LAYERS`` square Linear layers (``WIDTH``), unstructured random masks at the
given sparsity per layer; CSR forward = ``torch.sparse.mm(W_csr, x^T)`` per layer, dense forward
= ``x @ W^T`` with the masked (zero-filled) dense weight. Writes
``benchmarks/results/bench_sparse_inference_cpu.md``.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from benchmarks._common import interleaved_timings, markdown_table, median, write_result
from lightning_ext.functional.sparse import active_count, random_mask, to_csr

LAYERS, WIDTH = 4, 2048
SPARSITIES = (0.8, 0.9, 0.95)
BATCHES = (1, 64)


def _dense_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    for w in weights:
        x = torch.relu(x @ w.t())
    return x


def _csr_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    h = x.t().contiguous()  # (features, batch): CSR @ dense
    for w in weights:
        h = torch.relu(torch.sparse.mm(w, h))
    return h.t()


def _nbytes(t: Tensor) -> int:
    if t.layout == torch.sparse_csr:
        parts = (t.values(), t.col_indices(), t.crow_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


def _file_bytes(state: dict[str, Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def main() -> None:
    torch.manual_seed(0)
    dense_weights = [torch.randn(WIDTH, WIDTH) / WIDTH**0.5 for _ in range(LAYERS)]
    rows = []
    for sparsity in SPARSITIES:
        masks = [
            random_mask(
                w.shape, active_count(1.0 - sparsity, w.numel()), torch.Generator().manual_seed(i)
            )
            for i, w in enumerate(dense_weights)
        ]
        masked = [w * m for w, m in zip(dense_weights, masks)]
        csr = [to_csr(w, m) for w, m in zip(dense_weights, masks)]
        x = torch.randn(max(BATCHES), WIDTH)
        torch.testing.assert_close(_csr_forward(csr, x), _dense_forward(masked, x))
        dense_mem = sum(_nbytes(w) for w in masked)
        csr_mem = sum(_nbytes(w) for w in csr)
        dense_file = _file_bytes({str(i): w for i, w in enumerate(masked)})
        csr_file = _file_bytes({str(i): w for i, w in enumerate(csr)})
        for batch in BATCHES:
            xb = x[:batch]
            times = interleaved_timings(
                {
                    "dense": lambda xb=xb, masked=masked: _dense_forward(masked, xb),
                    "csr": lambda xb=xb, csr=csr: _csr_forward(csr, xb),
                },
                repeats=7,
                inner=5,
            )
            dense_ms, csr_ms = median(times["dense"]) * 1e3, median(times["csr"]) * 1e3
            rows.append(
                [
                    f"{sparsity:.0%}",
                    batch,
                    dense_ms,
                    csr_ms,
                    dense_ms / csr_ms,
                    csr_mem / dense_mem,
                    csr_file / dense_file,
                ]
            )
    body = (
        f"Model: {LAYERS} x Linear({WIDTH}, {WIDTH}) with ReLU, float32, unstructured random "
        f"masks; torch threads {torch.get_num_threads()}. Speed-up above 1: CSR is faster. "
        "Memory counts values, column indices and row pointers (int64, as torch stores them); "
        "file size is `torch.save` of the weights. The CSR and dense outputs agree (checked).\n\n"
        + markdown_table(
            [
                "sparsity",
                "batch",
                "dense ms",
                "CSR ms",
                "CSR speed-up",
                "CSR memory / dense",
                "CSR file / dense",
            ],
            rows,
        )
    )
    write_result(
        "bench_sparse_inference_cpu",
        "Sparse inference on CPU: CSR against dense",
        body,
        "python -m benchmarks.bench_sparse_inference",
    )


if __name__ == "__main__":
    main()
