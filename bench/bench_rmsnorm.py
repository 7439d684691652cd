"""RMSNorm: fastllm's kernel beside torch.nn.functional.rms_norm (bf16).

Reports microseconds per call and effective bandwidth (bytes read + written).
    pytest bench/bench_rmsnorm.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm import backend

SHAPES = [(1, 4096), (16, 4096), (16384, 4096), (16384, 8192)]


def _bytes(rows: int, cols: int, residual: bool) -> int:
    tensors = 4 if residual else 2  # x (+ residual) read, y (+ h) written
    return (tensors * rows * cols + cols) * 2


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("impl", ["fastllm", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rmsnorm(gpu_bench, benchmark, shape, impl, residual):
    if impl == "fastllm" and not backend.HAS_C:
        pytest.skip("extension not built")
    from fastllm.ops import cuda

    rows, cols = shape
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    if impl == "fastllm":
        fn = (lambda: cuda.rmsnorm(x, w, 1e-6, residual=r)) if residual else (lambda: cuda.rmsnorm(x, w, 1e-6))
    else:
        fn = (lambda: F.rms_norm(x + r, (cols,), w, 1e-6)) if residual else (lambda: F.rms_norm(x, (cols,), w, 1e-6))
    us = gpu_bench(fn)
    gbps = _bytes(rows, cols, residual) / (us * 1e-6) / 1e9
    benchmark.extra_info.update(op="rmsnorm", impl=impl, shape=f"{rows}x{cols}", residual=residual, GBps=gbps)
    print(f"\nrmsnorm {impl:8s} {rows}x{cols} residual={residual}: {us:8.2f} us  {gbps:7.1f} GB/s")
