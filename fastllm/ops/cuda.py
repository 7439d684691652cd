"""Python wrappers of the CUDA kernels: check arguments, allocate outputs, launch.

Each wrapper has the signature and semantics of its reference in
``fastllm.ops.reference``; the op table calls ``fastllm.ops.cuda.<op>`` by name.
Kernel families with several wrappers live in ``cuda_<family>.py`` modules,
imported at the end of this file. Kernels receive raw device pointers and the current
torch stream, so they run inside CUDA graphs captured by torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastllm.ops.cuda_common import DTYPE_CODES, check_tensor, ext, current_stream


def rmsnorm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """CUDA RMSNorm (+ fused residual add); see ``reference.rmsnorm``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"rmsnorm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"rmsnorm: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.dim() == 0:
        raise ValueError("rmsnorm: x must have at least one dimension")
    check_tensor("rmsnorm", "x", x, x.device)
    check_tensor("rmsnorm", "weight", weight, x.device, x.dtype)
    cols = x.shape[-1]
    if cols < 1:
        raise ValueError("rmsnorm: the last dimension of x must be >= 1")
    if tuple(weight.shape) != (cols,):
        raise ValueError(f"rmsnorm: weight must have shape ({cols},), got {tuple(weight.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"rmsnorm: eps must be a positive finite number, got {eps!r}")
    if residual is not None:
        check_tensor("rmsnorm", "residual", residual, x.device, x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // cols
    ext().rmsnorm(
        out.data_ptr(),
        h.data_ptr() if h is not None else 0,
        x.data_ptr(),
        residual.data_ptr() if residual is not None else 0,
        weight.data_ptr(),
        rows,
        cols,
        float(eps),
        DTYPE_CODES[x.dtype],
        current_stream(x.device),
    )
    return (out, h) if h is not None else out


def silu_and_mul(x: Tensor) -> Tensor:
    """CUDA SwiGLU gate; see ``reference.silu_and_mul``. x: [..., 2d] -> [..., d]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"silu_and_mul: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"silu_and_mul: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    check_tensor("silu_and_mul", "x", x, x.device)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: the last dimension of x must be even, got shape {tuple(x.shape)}")
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ext().silu_and_mul(out.data_ptr(), x.data_ptr(), rows, d, DTYPE_CODES[x.dtype], current_stream(x.device))
    return out


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
    """CUDA rotary embedding, in place; see ``reference.rotary_embedding``.

    q: [N, Hq, D], k: [N, Hk, D], same dtype, any token/head strides with a
    contiguous last dim (views of a fused qkv output work); positions: int64
    [N]; cos_sin_cache: fp32 [max_pos, D] contiguous. Positions outside the
    table leave their token unrotated (no device sync to check them)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rotary_embedding: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"rotary_embedding: {name} must be [tokens, heads, head_dim] with a contiguous last dim")
    if q.dtype not in DTYPE_CODES or k.dtype != q.dtype:
        raise TypeError(f"rotary_embedding: q and k must share a float dtype, got {q.dtype} and {k.dtype}")
    device = q.device
    if not q.is_cuda or k.device != device:
        raise ValueError(f"rotary_embedding: q and k must be on the same CUDA device, got {q.device} and {k.device}")
    n, hq, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or d % 2:
        raise ValueError(f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} do not match (even head_dim)")
    check_tensor("rotary_embedding", "positions", positions, device, torch.int64)
    check_tensor("rotary_embedding", "cos_sin_cache", cos_sin_cache, device, torch.float32)
    if positions.shape != (n,):
        raise ValueError(f"rotary_embedding: positions must have shape ({n},), got {tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d:
        raise ValueError(f"rotary_embedding: cos_sin_cache must be [max_pos, {d}], got {tuple(cos_sin_cache.shape)}")
    ext().rotary_embedding(
        q.data_ptr(), k.data_ptr(), positions.data_ptr(), cos_sin_cache.data_ptr(), n,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), hq, k.shape[1], d, cos_sin_cache.shape[0],
        DTYPE_CODES[q.dtype], current_stream(device),
    )


from fastllm.ops.cuda_sample import sample  # noqa: E402,F401
from fastllm.ops.cuda_attention import decode_attention, decode_attention_supported, reshape_and_cache  # noqa: E402,F401
from fastllm.ops.cuda_prefill_attention import prefill_attention, prefill_attention_supported  # noqa: E402,F401
from fastllm.ops.cuda_quant import int4_linear, int4_linear_supported, int8_linear, int8_linear_supported  # noqa: E402,F401
