"""silu_and_mul and rotary_embedding kernels beside their torch peers (bf16).

    pytest bench/bench_elementwise.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm import backend
from fastllm.model.config import RopeConfig
from fastllm.model.layers import rope_cos_sin_cache
from fastllm.ops import reference as ref


def _need_ext(impl: str) -> None:
    if impl == "fastllm" and not backend.HAS_C:
        pytest.skip("extension not built")


@pytest.mark.parametrize("impl", ["fastllm", "torch"])
@pytest.mark.parametrize("rows, d", [(1, 14336), (16, 14336), (4096, 14336)], ids=lambda v: str(v))
def test_silu_and_mul(gpu_bench, benchmark, impl, rows, d):
    _need_ext(impl)
    from fastllm.ops import cuda

    x = torch.randn(rows, 2 * d, device="cuda", dtype=torch.bfloat16)
    fn = (lambda: cuda.silu_and_mul(x)) if impl == "fastllm" else (lambda: F.silu(x[:, :d]) * x[:, d:])
    us = gpu_bench(fn)
    gbps = 3 * rows * d * 2 / (us * 1e-6) / 1e9
    benchmark.extra_info.update(op="silu_and_mul", impl=impl, shape=f"{rows}x{d}", GBps=gbps)
    print(f"\nsilu_and_mul {impl:8s} {rows}x{d}: {us:8.2f} us  {gbps:7.1f} GB/s")


@pytest.mark.parametrize("impl", ["fastllm", "torch"])
@pytest.mark.parametrize("n", [1, 32, 4096])
def test_rotary_embedding(gpu_bench, benchmark, impl, n):
    _need_ext(impl)
    from fastllm.ops import cuda

    hq, hk, d = 32, 8, 128
    qkv = torch.randn(n, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, : hq * d].view(n, hq, d), qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    table = rope_cos_sin_cache(d, 8192, RopeConfig(theta=500000.0)).cuda()
    pos = torch.randint(0, 8192, (n,), device="cuda")
    op = cuda.rotary_embedding if impl == "fastllm" else ref.rotary_embedding
    us = gpu_bench(lambda: op(q, k, pos, table))
    gbps = 2 * n * (hq + hk) * d * 2 / (us * 1e-6) / 1e9
    benchmark.extra_info.update(op="rotary_embedding", impl=impl, tokens=n, GBps=gbps)
    print(f"\nrotary_embedding {impl:8s} n={n}: {us:8.2f} us  {gbps:7.1f} GB/s")
