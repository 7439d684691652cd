"""Helpers shared by the CUDA op wrappers: argument checks, streams, the extension."""

from __future__ import annotations

import torch
from torch import Tensor

from fastllm import backend

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ext():
    if not backend.HAS_C:
        raise RuntimeError(f"fastllm's CUDA extension is not built ({backend._C_ERROR})")
    return backend._C


def check_tensor(op: str, name: str, t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda or t.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")


def current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
