"""silu_and_mul: CUDA kernel against the fp32 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import poison_cuda_allocator, requires_cuda
from fastllm.ops import reference as ref


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [1, 7, 111, 769, 4096, 14336])
@pytest.mark.parametrize("rows", [1, 7, 33, 1000])
def test_kernel_matches_reference(rows, d, dtype):
    from fastllm.ops import cuda

    x = (torch.randn(rows, 2 * d, device="cuda") * 4).to(dtype)
    poison_cuda_allocator()
    out = cuda.silu_and_mul(x)
    assert out.shape == (rows, d) and out.dtype == dtype
    xd = x.double()  # float64 truth: in fp32 the reference and torch's peer are the same computation
    expect = F.silu(xd[:, :d]) * xd[:, d:]
    torch.testing.assert_close(ref.silu_and_mul(x.float()).double(), expect, rtol=1e-6, atol=1e-6)
    peer = F.silu(x[:, :d]) * x[:, d:]  # torch in the kernel's dtype
    err = (out.double() - expect).abs().max().item()
    peer_err = (peer.double() - expect).abs().max().item()
    assert not torch.isnan(out).any()
    # 2x torch's own error, plus one fp32 ulp of the largest output (expf and
    # torch's exp may round differently in the last bit).
    assert err <= 2 * peer_err + 2.0**-23 * expect.abs().max().item() + 1e-12, (err, peer_err)


@requires_cuda
def test_kernel_leading_dims_misaligned_and_errors():
    from fastllm.ops import cuda

    x = torch.randn(2, 3, 2 * 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(cuda.silu_and_mul(x), ref.silu_and_mul(x), rtol=1e-2, atol=1e-2)
    base = torch.randn(1 + 5 * 128, device="cuda", dtype=torch.float16)
    odd = base[1:].view(5, 128)  # misaligned by 2 bytes: scalar path
    torch.testing.assert_close(cuda.silu_and_mul(odd), ref.silu_and_mul(odd), rtol=1e-3, atol=1e-3)
    assert cuda.silu_and_mul(torch.empty(0, 8, device="cuda", dtype=torch.float16)).shape == (0, 4)
    with pytest.raises(ValueError, match="even"):
        cuda.silu_and_mul(torch.randn(3, 5, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        cuda.silu_and_mul(torch.randn(8, 3, device="cuda", dtype=torch.float16).t())
    with pytest.raises(TypeError, match="dtype"):
        cuda.silu_and_mul(torch.randn(3, 4, device="cuda", dtype=torch.float64))
