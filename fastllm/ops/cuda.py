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
