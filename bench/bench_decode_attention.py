"""Decode attention over the paged KV cache beside torch SDPA (bf16, 32q/8kv heads, d=128).

``fastllm`` is the default (the tensor-core split kernel at d=128),
``fastllm_cuda_cores`` the CUDA-core split kernel (``_variant=1``, which head
dims 80 and 96 run).
Reports microseconds per call and the effective bandwidth of the K/V read
(B * L * Hk * D * 2 tensors * 2 bytes): the kernel's floor is HBM bandwidth.
    pytest bench/bench_decode_attention.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm import backend

HQ, HK, D, BLOCK = 32, 8, 128, 16
CASES = [(1, 1024), (1, 4096), (1, 32768), (8, 4096), (32, 2048), (64, 1024)]


def _kv_bytes(b: int, length: int) -> int:
    return b * length * HK * D * 2 * 2


@pytest.mark.parametrize("impl", ["fastllm", "fastllm_cuda_cores", "torch_sdpa"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}xL{c[1]}")
def test_decode_attention(gpu_bench, benchmark, case, impl):
    b, length = case
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)
    if impl.startswith("fastllm"):
        if not backend.HAS_C:
            pytest.skip("extension not built")
        from fastllm.ops import cuda

        variant = {"fastllm": 0, "fastllm_cuda_cores": 1}[impl]

        blocks = -(-length // BLOCK)
        k_cache = torch.randn(b * blocks, BLOCK, HK, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        perm = torch.randperm(b * blocks, device="cuda").to(torch.int32)
        tables = perm.view(b, blocks)
        lens = torch.full((b,), length, dtype=torch.int32, device="cuda")

        def fn():
            return cuda.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5, max_seq_len=length,
                                         _variant=variant)
    else:
        k = torch.randn(b, HK, length, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q4 = q[:, :, None, :]  # [B, Hq, 1, D]

        def fn():
            return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    us = gpu_bench(fn)
    gbps = _kv_bytes(b, length) / (us * 1e-6) / 1e9
    benchmark.extra_info.update(op="decode_attention", impl=impl, batch=b, ctx=length, GBps=gbps)
    print(f"\ndecode_attention {impl:16s} B={b:<3d} L={length:<6d}: {us:8.2f} us  {gbps:7.1f} GB/s (KV read)")
