"""int8_linear: the CUDA W8A16 kernel against the reference (flash-attention's
2x rule: its error against an fp64 computation on the same quantized weights is
at most twice that of torch's F.linear on the dequantized weight in the same
dtype), plus the wrapper's checks and the host-side plan (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hopper_shared_memory, poison_cuda_allocator, requires_cuda
from fastllm import backend
from fastllm.ops import reference as ref
from fastllm.quant import quantize_int8

# (K, N): Llama-2-7B / 13B / 3-8B MLPs, Qwen2-0.5B up and down, odd N, small K
SHAPES = [(4096, 11008), (5120, 13824), (896, 4864), (4096, 14336), (4864, 896), (128, 129), (96, 200)]
TOKENS = [1, 3, 16, 33, 64, 200]
DTYPES = [torch.float16, torch.bfloat16]

_cache: dict = {}


def _weights(k: int, n: int, seed: int = 0):
    """(qweight, scales, fp32 bias) for a random [n, k] weight, cached per shape."""
    key = (k, n, seed)
    if key not in _cache:
        _cache.clear()
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, generator=g, device="cuda") / k**0.5
        q, s = quantize_int8(w)
        _cache[key] = (q, s, torch.randn(n, generator=g, device="cuda"))
    return _cache[key]


def _x(shape, dtype, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def _check(out, x, q, s, b):
    """out against fp64 on the same inputs; torch in out's dtype is the yardstick."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], q.shape[0])
    assert not torch.isnan(out).any()
    w = ref.dequantize_int8(q, s)
    expect = F.linear(x.double(), w.double(), None if b is None else b.double())
    peer = F.linear(x, w.to(x.dtype), b)
    err = (out.double() - expect).abs().max().item()
    peer_err = (peer.double() - expect).abs().max().item()
    assert err <= 2 * peer_err + 1e-6, (err, peer_err)


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_reference(shape, m, dtype, bias):
    from fastllm.ops import cuda

    k, n = shape
    q, s, b = _weights(k, n)
    b = b.to(dtype) if bias else None
    x = _x((m, k), dtype)
    poison_cuda_allocator()
    _check(cuda.int8_linear(x, q, s, b), x, q, s, b)


@requires_cuda
@pytest.mark.parametrize("m", [65, 130, 200])
def test_fused_kernel_past_64_tokens(m):
    """The wrapper dequantizes + cuBLAS there; the fused kernel itself loops 64-token blocks."""
    from fastllm.ops import cuda_quant

    q, s, b = _weights(1024, 777)
    x = _x((m, 1024), torch.bfloat16)
    poison_cuda_allocator()
    _check(cuda_quant._int8_fused(x, q, s, b.bfloat16()), x, q, s, b.bfloat16())


@requires_cuda
@pytest.mark.parametrize("splits", [2, 3, 16])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_split_k(m, splits):
    from fastllm.ops import cuda_quant

    q, s, b = _weights(4096, 1000)
    x = _x((m, 4096), torch.float16)
    poison_cuda_allocator()
    _check(cuda_quant._int8_fused(x, q, s, b.half(), splits=splits), x, q, s, b.half())
    _check(cuda_quant._int8_fused(x, q, s, None, splits=splits), x, q, s, None)


@requires_cuda
@pytest.mark.parametrize("k", [1, 8, 100, 129, 1000])
def test_any_k_and_misaligned_inputs(k):
    """K % 16 != 0 or unaligned x take the scalar path; results must not change."""
    from fastllm.ops import cuda

    q, s, b = _weights(k, 37)
    for m in (1, 9, 70):
        x = _x((m, k), torch.bfloat16)
        _check(cuda.int8_linear(x, q, s, b.bfloat16()), x, q, s, b.bfloat16())
    q, s, b = _weights(256, 300)
    base = _x((1 + 5 * 256,), torch.float16)
    odd = base[1:].view(5, 256)  # contiguous, 2 bytes off 16-byte alignment
    assert odd.data_ptr() % 16
    _check(cuda.int8_linear(odd, q, s, b.half()), odd, q, s, b.half())


@requires_cuda
def test_leading_dims_and_empty():
    from fastllm.ops import cuda

    q, s, b = _weights(512, 320)
    x = _x((2, 3, 512), torch.bfloat16)
    out = cuda.int8_linear(x, q, s, b.bfloat16())
    assert out.shape == (2, 3, 320)
    _check(out, x, q, s, b.bfloat16())
    assert cuda.int8_linear(x[:0], q, s).shape == (0, 3, 320)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [4096, 100])
def test_dequantize_matches_torch_cast(k, dtype):
    from fastllm.ops import cuda_quant

    q, s, _ = _weights(k, 129)
    assert torch.equal(cuda_quant.int8_dequantize(q, s, dtype), ref.dequantize_int8(q, s).to(dtype))


@requires_cuda
def test_bad_input():
    from fastllm.ops import cuda

    q, s, b = _weights(64, 32)
    x = _x((4, 64), torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        cuda.int8_linear(x.float(), q, s)
    with pytest.raises(ValueError, match="CUDA"):
        cuda.int8_linear(x.cpu(), q, s)
    with pytest.raises(ValueError, match="contiguous"):
        cuda.int8_linear(_x((64, 4), torch.float16).t(), q, s)
    with pytest.raises(ValueError, match="qweight"):
        cuda.int8_linear(x[:, :32].contiguous(), q, s)
    with pytest.raises(TypeError, match="qweight"):
        cuda.int8_linear(x, q.to(torch.uint8), s)
    with pytest.raises(ValueError, match="must be on"):
        cuda.int8_linear(x, q.cpu(), s)
    with pytest.raises(TypeError, match="scales"):
        cuda.int8_linear(x, q, s.half())
    with pytest.raises(ValueError, match="scales"):
        cuda.int8_linear(x, q, s[:16])
    with pytest.raises(TypeError, match="bias"):
        cuda.int8_linear(x, q, s, b)  # fp32 bias, fp16 x
    with pytest.raises(ValueError, match="bias"):
        cuda.int8_linear(x, q, s, b[:5].half())


@requires_cuda
def test_under_cuda_graph():
    from fastllm.ops import cuda

    q, s, b = _weights(2048, 1000)
    b = b.bfloat16()
    x = _x((3, 2048), torch.bfloat16)
    eager = cuda.int8_linear(x, q, s, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.int8_linear(x, q, s, b)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda.int8_linear(x, q, s, b)
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, cuda.int8_linear(x, q, s, b))
    assert not torch.equal(y, eager)


@requires_cuda
def test_op_table_uses_kernel_when_enabled(monkeypatch):
    from fastllm import ops

    q, s, b = _weights(256, 64)
    x = _x((5, 256), torch.float16)
    calls = []
    monkeypatch.setenv("FASTLLM_KERNELS", "int8_linear")
    backend.reset_settings()
    real = backend._C.int8_linear
    monkeypatch.setattr(backend._C, "int8_linear", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    _check(ops.int8_linear(x, q, s, b.half()), x, q, s, b.half())
    assert len(calls) == 1
    ops.int8_linear(x.float(), q, s)  # fp32 activations: the reference, not the kernel
    assert len(calls) == 1


# --------------------------------------------------------------------------- #
# Host-side pieces (no GPU needed)
# --------------------------------------------------------------------------- #
def test_supported_predicate():
    from fastllm.ops.cuda_quant import int8_linear_supported as supported

    q, s = torch.zeros(8, 32, dtype=torch.int8), torch.ones(8)
    for dtype in DTYPES:
        x = torch.zeros(3, 32, dtype=dtype)
        assert supported(x, q, s) and supported(x, q, s, torch.zeros(8, dtype=dtype))
        assert not supported(x, q, s, torch.zeros(8))  # fp32 bias: the reference
        assert not supported(x, q, s.half())
    assert not supported(torch.zeros(3, 32), q, s)  # fp32 activations
    assert not supported(torch.zeros(32, 3, dtype=torch.float16).t(), q, s)
    assert supported(torch.zeros(3, 32, dtype=torch.float16), "not a tensor", s)  # the wrapper reports it


@pytest.mark.skipif(not backend.HAS_C, reason="needs fastllm's compiled extension")
def test_plan():
    plan = backend._C.int8_linear_plan
    assert plan(1, 14336, 4096, 132, 0) == (1, 0)  # 224 CTAs: no split
    splits, ws = plan(1, 4096, 14336, 132, 0)  # 64 CTAs: split K
    assert 2 <= splits <= 16 and ws == splits * 4096 and 64 * splits >= 132
    if hopper_shared_memory():  # 2 CTAs of 80 KB fit an SM: the splits the H200 sweep found best
        assert splits == 4
        assert plan(16, 4096, 14336, 132, 0)[0] == 8  # 32 CTAs
        assert plan(16, 14336, 4096, 132, 0)[0] == 2  # 112 CTAs
    assert plan(7, 1000, 4096, 132, 3) == (3, 3 * 7 * 1000)
    assert plan(1, 100, 64, 132, 16)[0] == 1  # clamped to the one K tile
    assert plan(0, 100, 64, 132, 0) == (1, 0)
    for m in (1, 8, 9, 16, 17, 33, 64, 65, 1000):
        splits, ws = plan(m, 896, 896, 132, 0)
        assert splits >= 1 and ws == (splits * m * 896 if splits > 1 else 0)
    with pytest.raises(RuntimeError, match="K"):
        plan(1, 10, 0, 132, 0)
    with pytest.raises(RuntimeError, match="num_splits"):
        plan(1, 10, 64, 132, 17)
