"""RMSNorm: the reference against independent formulas; the CUDA kernel against the reference."""

from __future__ import annotations

import pytest
import torch

from conftest import poison_cuda_allocator, requires_cuda
from fastllm.ops import reference as ref

HIDDEN = [1, 16, 111, 769, 4096, 5120, 8192, 8193, 40000]
ROWS = [1, 7, 33, 1000]


def test_reference_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 769, generator=g)
    norm = LlamaRMSNorm(769, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        torch.testing.assert_close(ref.rmsnorm(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_equals_unfused(dtype):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(5, 111, generator=g).to(dtype), torch.randn(5, 111, generator=g).to(dtype)
    w = torch.randn(111, generator=g).to(dtype)
    y, h = ref.rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r)
    assert torch.equal(y, ref.rmsnorm(x + r, w, 1e-6))


def _inputs(rows, cols, dtype, residual, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, device="cuda") * 3).to(dtype)
    w = torch.randn(cols, generator=g, device="cuda").to(dtype)
    r = torch.randn(rows, cols, generator=g, device="cuda").to(dtype) if residual else None
    return x, w, r


def _check(out, expect_fp32, torch_same_dtype):
    """flash-attention's rule: error at most 2x torch's own error in this dtype."""
    assert not torch.isnan(out).any()
    kernel_err = (out.float() - expect_fp32).abs().max().item()
    torch_err = (torch_same_dtype.float() - expect_fp32).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-5, (kernel_err, torch_err)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_matches_reference(rows, cols, dtype, residual):
    from fastllm.ops import cuda

    x, w, r = _inputs(rows, cols, dtype, residual)
    poison_cuda_allocator()
    if residual:
        y, h = cuda.rmsnorm(x, w, 1e-6, residual=r)
        h_ref = (x.float() + r.float()).to(dtype)
        assert torch.equal(h, h_ref)
        expect = ref.rmsnorm(h_ref.float(), w.float(), 1e-6)
        torch_peer = torch.nn.functional.rms_norm(h_ref, (cols,), w, 1e-6)
    else:
        y = cuda.rmsnorm(x, w, 1e-6)
        expect = ref.rmsnorm(x.float(), w.float(), 1e-6)
        torch_peer = torch.nn.functional.rms_norm(x, (cols,), w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    _check(y, expect, torch_peer)


@requires_cuda
def test_kernel_misaligned_and_leading_dims():
    from fastllm.ops import cuda

    base = torch.randn(3 * 4097 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(3, 4097)[:, :4096].contiguous()  # contiguous copy: aligned
    odd = base[1 : 1 + 2 * 4096].view(2, 4096)  # contiguous view, pointer off 16-byte alignment
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    for t in (x, odd, torch.randn(2, 3, 5, 4096, device="cuda", dtype=torch.bfloat16)):
        _check(cuda.rmsnorm(t, w, 1e-5), ref.rmsnorm(t.float(), w.float(), 1e-5),
               torch.nn.functional.rms_norm(t, (4096,), w, 1e-5))
    empty = torch.empty(0, 4096, device="cuda", dtype=torch.bfloat16)
    assert cuda.rmsnorm(empty, w, 1e-5).shape == (0, 4096)


@requires_cuda
def test_kernel_bad_input():
    from fastllm.ops import cuda

    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        cuda.rmsnorm(torch.randn(64, 4, device="cuda", dtype=torch.float16).t(), w, 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        cuda.rmsnorm(x.double(), w.double(), 1e-6)
    with pytest.raises(TypeError, match="weight"):
        cuda.rmsnorm(x, w.float(), 1e-6)
    with pytest.raises(ValueError, match="shape"):
        cuda.rmsnorm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match="must be on"):
        cuda.rmsnorm(x, w.cpu(), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        cuda.rmsnorm(x, w, 1e-6, residual=x[:2])
    with pytest.raises(ValueError, match="eps"):
        cuda.rmsnorm(x, w, -1.0)


@requires_cuda
def test_kernel_under_cuda_graph():
    from fastllm.ops import cuda

    x, w, r = _inputs(33, 4096, torch.bfloat16, True)
    eager_y, eager_h = cuda.rmsnorm(x, w, 1e-6, residual=r)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.rmsnorm(x, w, 1e-6, residual=r)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = cuda.rmsnorm(x, w, 1e-6, residual=r)
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    y2, h2 = cuda.rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    assert not torch.equal(y, eager_y)


@requires_cuda
def test_op_table_uses_kernel_when_enabled(monkeypatch):
    from fastllm import backend, ops

    x, w, _ = _inputs(7, 769, torch.float16, False)
    calls = []
    monkeypatch.setenv("FASTLLM_KERNELS", "rmsnorm")
    backend.reset_settings()
    real = backend._C.rmsnorm
    monkeypatch.setattr(backend._C, "rmsnorm", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    ops.rmsnorm(x, w, 1e-6)
    assert calls
