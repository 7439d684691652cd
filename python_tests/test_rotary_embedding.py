"""rotary_embedding: CUDA kernel (in place, strided views) against the reference."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from fastllm.model.config import RopeConfig
from fastllm.model.layers import rope_cos_sin_cache
from fastllm.ops import reference as ref


def _qkv(n, hq, hk, d, dtype):
    qkv = torch.randn(n, (hq + 2 * hk) * d, device="cuda").to(dtype)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    return qkv, q, k


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hk, d", [(32, 8, 128), (4, 4, 64), (28, 4, 80), (8, 1, 96), (2, 2, 256), (3, 1, 6)])
@pytest.mark.parametrize("n", [1, 7, 33, 1000])
def test_kernel_matches_reference_on_fused_views(n, hq, hk, d, dtype):
    from fastllm.ops import cuda

    rope = RopeConfig(theta=500000.0, type="llama3", factor=8.0, original_max_position_embeddings=64)
    table = rope_cos_sin_cache(d, 4096, rope).cuda()
    positions = torch.randint(0, 4096, (n,), device="cuda")
    qkv, q, k = _qkv(n, hq, hk, d, dtype)
    expect = qkv.float().clone()
    eq = expect[:, : hq * d].view(n, hq, d)
    ek = expect[:, hq * d : (hq + hk) * d].view(n, hk, d)
    ref.rotary_embedding(eq, ek, positions, table)
    peer = qkv.clone()  # the same rotation computed by torch in the kernel's dtype
    ref_dtype_q, ref_dtype_k = peer[:, : hq * d].view(n, hq, d), peer[:, hq * d : (hq + hk) * d].view(n, hk, d)
    half = d // 2
    cs = table[positions].to(dtype)
    for t in (ref_dtype_q, ref_dtype_k):
        x1, x2 = t[..., :half].clone(), t[..., half:].clone()
        c, s = cs[:, None, :half], cs[:, None, half:]
        t[..., :half], t[..., half:] = x1 * c - x2 * s, x2 * c + x1 * s
    v_before = qkv[:, (hq + hk) * d :].clone()
    cuda.rotary_embedding(q, k, positions, table)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before), "v must be untouched"
    err = (qkv.float() - expect).abs().max().item()
    peer_err = (peer.float() - expect).abs().max().item()
    assert err <= 2 * peer_err + 1e-5, (err, peer_err)


@requires_cuda
def test_kernel_bad_input():
    from fastllm.ops import cuda

    _, q, k = _qkv(4, 4, 2, 64, torch.float16)
    table = rope_cos_sin_cache(64, 128, RopeConfig()).cuda()
    pos = torch.arange(4, device="cuda")
    with pytest.raises(TypeError, match="int64"):
        cuda.rotary_embedding(q, k, pos.int(), table)
    with pytest.raises(TypeError, match="float32"):
        cuda.rotary_embedding(q, k, pos, table.half())
    with pytest.raises(ValueError, match="shape"):
        cuda.rotary_embedding(q, k, pos[:3], table)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        cuda.rotary_embedding(q, k, pos, table[:, :32].contiguous())
    with pytest.raises(TypeError, match="dtype"):
        cuda.rotary_embedding(q, k.float(), pos, table)
