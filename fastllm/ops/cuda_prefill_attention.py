"""CUDA wrapper of the prefill (flash) attention kernel (csrc/prefill_attention.cu).

``prefill_attention`` is attention for any step that is not a pure decode step:
prompts, chunks of prompts appended to a cached prefix, several sequences
packed without padding. Keys and values are read from the paged KV cache (the
step's own K/V must already be written there by ``reshape_and_cache``). It has
the signature and semantics of ``reference.prefill_attention`` and launches on
torch's current stream without synchronising, so it can be captured in a CUDA
graph (the grid is sized from the host-side ``meta.query_lens_host``).

Three kernels compute it: ``mma`` (mma.sync, sm_80+, every head dim),
``wgmma`` (csrc/prefill_attention_sm90.cu: Hopper warpgroup MMA, a build for
90a on an sm_90 GPU, head dims 64 and 128) and ``wgmma_pipelined`` (the same
with each tile's P V left running under the next tile's softmax). Where a
wgmma kernel can run, ``impl=None`` takes ``wgmma_pipelined`` if the backend
enables ``prefill_attention_sm90_pipelined`` (verified on a GPU, or opted in
with ``FASTLLM_KERNELS``), else ``wgmma`` if it enables
``prefill_attention_sm90``; otherwise ``mma``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from fastllm import backend
from fastllm.ops.cuda_common import DTYPE_CODES, check_tensor, current_stream, ext

PREFILL_HEAD_DIMS = (64, 80, 96, 128, 256)
PREFILL_DTYPES = (torch.float16, torch.bfloat16)
IMPLS = {"mma": 0, "wgmma": 1, "wgmma_pipelined": 2}
# backend kernel names of the wgmma kernels, in the order impl=None prefers them
WGMMA_KERNELS = {"wgmma_pipelined": "prefill_attention_sm90_pipelined", "wgmma": "prefill_attention_sm90"}
WGMMA_HEAD_DIMS = (64, 128)


def wgmma_usable(head_dim: int, device: torch.device | int | None = None) -> bool:
    """Whether the wgmma kernels run for ``head_dim`` on ``device`` (default: the
    current one): the extension was built for 90a and the GPU is sm_90."""
    if head_dim not in WGMMA_HEAD_DIMS or not backend.HAS_C or not torch.cuda.is_available():
        return False
    index = device.index if isinstance(device, torch.device) else device
    return _wgmma_usable(head_dim, torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _wgmma_usable(head_dim: int, device_index: int) -> bool:
    with torch.cuda.device(device_index):
        return bool(ext().prefill_attention_sm90_usable(head_dim))


def _resolve_impl(op: str, impl: str | None, head_dim: int, device: torch.device) -> int:
    if impl is None:
        if wgmma_usable(head_dim, device):
            for name, kernel in WGMMA_KERNELS.items():
                if backend.kernel_enabled(kernel):
                    return IMPLS[name]
        return IMPLS["mma"]
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be None or one of {sorted(IMPLS)}, got {impl!r}")
    if impl != "mma" and not wgmma_usable(head_dim, device):
        raise ValueError(
            f"{op}: impl={impl!r} needs head_dim in {WGMMA_HEAD_DIMS} (got {head_dim}), an sm_90 GPU and an "
            "extension built for 90a (FASTLLM_CUDA_ARCHS)"
        )
    return IMPLS[impl]


def _strides(t: Tensor) -> tuple[int, ...]:
    """Element strides with 0 for dimensions of size 1 (as cuda_attention._strides):
    torch leaves those arbitrary (a contiguous [1, H, D] q may have stride(0) == 3,
    and clone() keeps it), the kernel only multiplies them by index 0, and a raw
    odd stride would fail its multiple-of-8 check with a RuntimeError."""
    return tuple(st if size > 1 else 0 for size, st in zip(t.shape, t.stride()))


def _valid_scale(scale) -> bool:
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0


def _valid_window(window) -> bool:
    return window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1)


def prefill_attention_supported(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta,
    scale: float,
    sliding_window: int | None = None,
    *,
    return_lse: bool = False,
) -> bool:
    """Whether the kernel handles these arguments; the op table runs the
    reference otherwise (fp32, other head dims, block sizes that are not powers
    of two, non-positive scales, int64 metadata, non-contiguous caches...)."""
    try:
        if not all(isinstance(t, Tensor) for t in (q, k_cache, v_cache)):
            return False
        if not q.is_cuda or q.dim() != 3 or q.dtype not in PREFILL_DTYPES or q.stride(-1) != 1:
            return False
        if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
            return False
        for t in (k_cache, v_cache):
            if t.dtype != q.dtype or t.device != q.device or not t.is_contiguous() or t.data_ptr() % 16:
                return False
        _, hq, d = q.shape
        _, block_size, hk, cache_d = k_cache.shape
        if d != cache_d or d not in PREFILL_HEAD_DIMS or hk < 1 or hq % hk:
            return False
        if block_size < 1 or block_size & (block_size - 1):
            return False
        for t in (meta.cu_seqlens_q, meta.seq_lens, meta.block_tables):
            if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.device != q.device or not t.is_contiguous():
                return False
        return _valid_scale(scale) and _valid_window(sliding_window) and isinstance(return_lse, bool)
    except (AttributeError, TypeError):
        return False


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta,
    scale: float,
    sliding_window: int | None = None,
    *,
    return_lse: bool = False,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """CUDA prefill attention over the paged cache; see ``reference.prefill_attention``.

    q: [N, Hq, D] fp16/bf16 with a contiguous last dim (token and head strides
    free: a view of a fused qkv output works); caches: [num_blocks, block_size,
    Hk, D] contiguous, q's dtype, D in {64, 80, 96, 128, 256}, Hq % Hk == 0,
    block_size a power of two; meta: ``AttentionMetadata`` with int32
    cu_seqlens_q [B+1], seq_lens [B] and block_tables [B, max_blocks] on q's
    device (read there, no sync), and host ``query_lens_host`` (its maximum
    sizes the grid). scale > 0; sliding_window None or >= 1. Returns out
    [N, Hq, D] (and lse [N, Hq] fp32, natural log, with ``return_lse``).
    Tokens after the last sequence's queries get out 0 and lse -inf.
    impl: None (choose), "mma", "wgmma" or "wgmma_pipelined" (ValueError where
    it cannot run).
    """
    op = "prefill_attention"
    if not isinstance(q, Tensor):
        raise TypeError(f"{op}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in PREFILL_DTYPES:
        raise TypeError(f"{op}: q has dtype {q.dtype}; supported: float16, bfloat16")
    if not q.is_cuda:
        raise ValueError(f"{op}: q must be on a CUDA device, got {q.device}")
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        raise ValueError(f"{op}: q must have a contiguous last dimension (call .contiguous() first)")
    device = q.device
    check_tensor(op, "k_cache", k_cache, device)
    check_tensor(op, "v_cache", v_cache, device)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{op}: caches have dtypes {k_cache.dtype}, {v_cache.dtype}; expected q's dtype {q.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must both be [num_blocks, block_size, Hk, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    n, hq, d = q.shape
    num_blocks, block_size, hk, cache_d = k_cache.shape
    if cache_d != d:
        raise ValueError(f"{op}: q head_dim {d} != cache head_dim {cache_d}")
    if d not in PREFILL_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {d} is not supported; supported: {PREFILL_HEAD_DIMS}")
    if hk < 1 or hq % hk:
        raise ValueError(f"{op}: q heads ({hq}) must be a multiple of cache KV heads ({hk})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size must be a power of two, got {block_size}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16:
            raise ValueError(f"{op}: {name} must be 16-byte aligned (a view at an odd offset is not supported)")
    for name in ("cu_seqlens_q", "seq_lens", "block_tables"):
        check_tensor(op, f"meta.{name}", getattr(meta, name), device, torch.int32)
    b = meta.seq_lens.shape[0] if meta.seq_lens.dim() == 1 else -1
    if meta.seq_lens.dim() != 1 or tuple(meta.cu_seqlens_q.shape) != (b + 1,):
        raise ValueError(
            f"{op}: meta.seq_lens must be [B] and meta.cu_seqlens_q [B+1], got {tuple(meta.seq_lens.shape)} "
            f"and {tuple(meta.cu_seqlens_q.shape)}"
        )
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != b:
        raise ValueError(f"{op}: meta.block_tables must be [{b}, max_blocks], got {tuple(meta.block_tables.shape)}")
    query_lens = list(meta.query_lens_host)
    if len(query_lens) != b or any(ql < 0 for ql in query_lens) or sum(query_lens) > n:
        raise ValueError(
            f"{op}: meta.query_lens_host must hold {b} lengths >= 0 summing to at most the {n} tokens of q, "
            f"got {query_lens}"
        )
    if not _valid_scale(scale):
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale!r}")
    if not _valid_window(sliding_window):
        raise ValueError(f"{op}: sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{op}: return_lse must be a bool, got {type(return_lse).__name__}")
    impl_code = _resolve_impl(op, impl, d, device)

    covered = sum(query_lens) == n  # else the tokens after the last sequence get 0 / -inf
    if covered:
        out = torch.empty((n, hq, d), dtype=q.dtype, device=device)
    else:
        out = torch.zeros((n, hq, d), dtype=q.dtype, device=device)
    lse = None
    if return_lse:
        if covered:
            lse = torch.empty((n, hq), dtype=torch.float32, device=device)
        else:
            lse = torch.full((n, hq), -math.inf, dtype=torch.float32, device=device)
    max_query_len = max(query_lens, default=0)
    if n == 0 or b == 0 or max_query_len == 0:
        return (out, lse) if return_lse else out
    qs = _strides(q)
    if qs[0] % 8 or qs[1] % 8 or q.data_ptr() % 16:
        q = q.contiguous() if not q.is_contiguous() else q.clone()  # 16-byte copies need aligned rows
        qs = _strides(q)
    # The launcher opts the kernel in to > 48 KB of shared memory on the current
    # device and launches there: make that q's device, whichever is current.
    with torch.cuda.device(device):
        ext().prefill_attention(
            out.data_ptr(), lse.data_ptr() if lse is not None else 0, q.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), meta.cu_seqlens_q.data_ptr(), meta.seq_lens.data_ptr(),
            meta.block_tables.data_ptr(), n, b, hq, hk, d, qs[0], qs[1], num_blocks, block_size,
            meta.block_tables.shape[1], max_query_len, float(scale), sliding_window or 0, DTYPE_CODES[q.dtype],
            current_stream(device), impl_code,
        )
    return (out, lse) if return_lse else out
