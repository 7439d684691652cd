"""Weight-only quantized linears (bf16 activations) beside their torch peers.

fastllm int8 / int4 (g128) against torch's bf16 F.linear, the eager int8
dequantize-then-matmul, and torch's tinygemm int4 kernel
(``torch._weight_int4pack_mm``) where this torch build has it;
``fastllm-int4`` is int4's mma.sync kernel (``_variant=0``),
``fastllm-int4-wgmma`` its warpgroup-MMA kernel (``_variant=2``, M 9..64,
sm_90 GPUs; variant 0 elsewhere; the default at M 17..64),
``fastllm-int4-wide`` / ``fastllm-int4-wide2`` its wide tiles at M <= 16 with
one / two mma chains per warp (``_variant=3`` / ``4``; experimental). Reports
microseconds per call and effective bandwidth: weight bytes (with scales and
zeros) + activations read + outputs written, over the time.
    pytest bench/bench_quant_linear.py --benchmark-only -s
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm import backend
from fastllm.quant import quantize_int4, quantize_int8

SHAPES = [(4096, 14336), (4096, 4096), (14336, 4096)]  # (K, N)
TOKENS = [1, 16, 64, 256]
GROUP = 128
IMPLS = ["fastllm-int8", "fastllm-int4", "fastllm-int4-wgmma", "fastllm-int4-wide", "fastllm-int4-wide2",
         "fastllm-int4-fused", "torch-bf16",
         "torch-int8-dequant", "torch-int4pack"]

_weights: dict = {}


def _get(k: int, n: int) -> dict:
    """Random bf16 weights of one shape and their quantized forms (built once)."""
    if (k, n) not in _weights:
        _weights.clear()  # one shape at a time on the GPU
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, GROUP, torch.bfloat16)
        _weights[(k, n)] = dict(w=w, q8=q8, s8=s8, q4=q4, s4=s4, z4=z4)
    return _weights[(k, n)]


def _int4pack(d: dict, k: int, n: int):
    """torch's tinygemm layout for the same nibbles (timing only): [N, K/2] uint8
    with the even column in the high nibble (torchao's packing), and
    scales_and_zeros [K/g, N, 2] with a float zero, (8 - z) * scale, for
    tinygemm's w = (q - 8) * scale + zero."""
    try:
        q = torch.stack((d["q4"] & 0xF, d["q4"] >> 4), dim=-1).flatten(-2)  # [N, K] in [0, 15]
        packed = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w_packed = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8)
        s = d["s4"].float()
        zero = (8.0 - d["z4"].float()) * s
        sz = torch.stack((s, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, w_packed, GROUP, sz)
        return w_packed, sz
    except (AttributeError, RuntimeError, TypeError) as e:  # op missing or layout changed in this torch
        pytest.skip(f"torch._weight_int4pack_mm unavailable: {str(e).splitlines()[0][:120]}")


def _bytes(impl: str, m: int, k: int, n: int) -> int:
    act = m * k * 2 + m * n * 2
    if "int8" in impl:
        return n * k + n * 4 + act
    if "int4" in impl:
        return n * k // 2 + n * (k // GROUP) * 3 + act
    return n * k * 2 + act


INT4_VARIANTS = {"fastllm-int4": 0, "fastllm-int4-wgmma": 2, "fastllm-int4-wide": 3, "fastllm-int4-wide2": 4}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_quant_linear(gpu_bench, benchmark, shape, m, impl):
    if impl.startswith("fastllm") and not backend.HAS_C:
        pytest.skip("extension not built")
    if impl == "fastllm-int4-fused" and m <= 64:
        pytest.skip("same as fastllm-int4 up to 64 tokens")
    if impl == "fastllm-int4-wgmma" and not 9 <= m <= 64:
        pytest.skip("the wgmma variant changes only M 9..64")
    if impl.startswith("fastllm-int4-wide") and m > 16:
        pytest.skip("the wide variants change only M <= 16")
    from fastllm.ops import cuda, cuda_quant

    k, n = shape
    d = _get(k, n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if impl == "fastllm-int8" and m > 64:  # dequantize + cuBLAS
        fn = lambda: cuda.int8_linear(x, d["q8"], d["s8"])  # noqa: E731
    elif impl == "fastllm-int8":
        fn = lambda: cuda_quant._int8_fused(x, d["q8"], d["s8"])  # noqa: E731
    elif impl == "fastllm-int4" and m > 64:  # dequantize + cuBLAS
        fn = lambda: cuda.int4_linear(x, d["q4"], d["s4"], d["z4"], GROUP)  # noqa: E731
    elif impl in INT4_VARIANTS:  # a variant, explicitly
        variant = INT4_VARIANTS[impl]
        fn = lambda: cuda_quant._int4_fused(x, d["q4"], d["s4"], d["z4"], GROUP, _variant=variant)  # noqa: E731
    elif impl == "fastllm-int4-fused":  # the fused kernel past FUSED_MAX_TOKENS (64-token blocks)
        fn = lambda: cuda_quant._int4_fused(x, d["q4"], d["s4"], d["z4"], GROUP)  # noqa: E731
    elif impl == "torch-bf16":
        fn = lambda: F.linear(x, d["w"])  # noqa: E731
    elif impl == "torch-int8-dequant":
        fn = lambda: x @ (d["q8"].to(torch.bfloat16) * d["s8"].to(torch.bfloat16)[:, None]).T  # noqa: E731
    else:
        w_packed, sz = _int4pack(d, k, n)
        fn = lambda: torch._weight_int4pack_mm(x, w_packed, GROUP, sz)  # noqa: E731
    us = gpu_bench(fn)
    gbps = _bytes(impl, m, k, n) / (us * 1e-6) / 1e9
    op = "int8_linear" if "int8" in impl else "int4_linear" if "int4" in impl else "linear"
    benchmark.extra_info.update(op=op, impl=impl, shape=f"{k}x{n}", M=m, GBps=gbps)
    print(f"\n{op} {impl:20s} {k}->{n} M={m:<4d}: {us:9.2f} us  {gbps:7.1f} GB/s")
