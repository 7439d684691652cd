"""Causal prefill attention: fastllm's kernels (paged KV cache; ``fastllm`` is
the mma.sync kernel, ``fastllm-wgmma`` and ``fastllm-wgmma_pipelined`` the
sm_90a ones) beside torch SDPA
with each backend forced (flash, cuDNN, memory-efficient) on the equivalent
dense [1, H, S, D] tensors. bf16, batch 1, 32 query / 8 KV heads.

Reports microseconds per call and TFLOP/s, counting 4 * S^2 / 2 * D * Hq flops
(two matmuls, two flops per multiply-add, the causal half), as torch's own
attention benchmarks do. Calls are replayed from CUDA graphs so that Python
overhead does not hide short kernels.
    pytest bench/bench_prefill_attention.py --benchmark-only -s
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastllm import backend

HQ, HK = 32, 8
CASES = [(512, 128), (2048, 128), (8192, 128), (2048, 64)]
IMPLS = ["fastllm", "fastllm-wgmma", "fastllm-wgmma_pipelined", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]


def _flops(s: int, d: int) -> float:
    return 4.0 * s * s / 2 * d * HQ


def _fastllm_fn(s: int, d: int, kernel: str):
    from fastllm.ops import AttentionMetadata, cuda

    bs = 16
    nblocks = s // bs
    g = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(nblocks, bs, HK, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(nblocks, bs, HK, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(s, HQ, d, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(nblocks, device="cuda", generator=g).to(torch.int32)[None]  # a shuffled block table
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, s], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([s], dtype=torch.int32, device="cuda"),
        block_tables=table,
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"),
        query_lens_host=[s],
        seq_lens_host=[s],
    )
    scale = d**-0.5
    return (lambda: cuda.prefill_attention(q, k_cache, v_cache, meta, scale, impl=kernel)), "paged"


def _sdpa_fn(s: int, d: int, sdpa_backend):
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HK, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HK, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kr = k.repeat_interleave(HQ // HK, dim=1)  # for backends without enable_gqa
    vr = v.repeat_interleave(HQ // HK, dim=1)
    variants = [
        ("native", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("repeat", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)),
    ]
    for gqa, fn in variants:
        try:
            with sdpa_kernel(sdpa_backend):
                fn()
            torch.cuda.synchronize()
            return fn, gqa
        except (RuntimeError, TypeError):
            continue
    return None, None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s, d", CASES, ids=lambda v: str(v))
def test_prefill_attention(gpu_bench, benchmark, s, d, impl):
    if impl.startswith("fastllm") and not backend.HAS_C:
        pytest.skip("extension not built")
    if impl.startswith("fastllm-wgmma"):
        from fastllm.ops.cuda_prefill_attention import wgmma_usable

        if not wgmma_usable(d):
            pytest.skip("the wgmma kernel needs an sm_90 GPU and a 90a build")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backend = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }.get(impl)
    if impl.startswith("fastllm"):
        fn, gqa = _fastllm_fn(s, d, impl.split("-", 1)[1] if "-" in impl else "mma")
    else:
        fn, gqa = _sdpa_fn(s, d, sdpa_backend)
        if fn is None:
            pytest.skip(f"{impl} cannot run this shape on this device")
    inner = {512: 50, 2048: 20}.get(s, 5)
    with sdpa_kernel(sdpa_backend) if sdpa_backend is not None else contextlib.nullcontext():
        us = gpu_bench(fn, inner=inner, rounds=10)
    tflops = _flops(s, d) / (us * 1e-6) / 1e12
    benchmark.extra_info.update(op="prefill_attention", impl=impl, S=s, D=d, gqa=gqa, us_per_call=us, TFLOPs=tflops)
    print(f"\nprefill_attention {impl:23s} S={s:5d} D={d:3d} ({gqa}): {us:10.1f} us  {tflops:7.1f} TFLOP/s")
