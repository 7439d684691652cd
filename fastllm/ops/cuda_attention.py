"""CUDA wrappers of the paged-KV-cache kernels (csrc/attention.cu).

``reshape_and_cache`` writes a step's keys/values into their cache slots;
``decode_attention`` is attention for steps where every sequence has exactly
one new query token. Both have the signatures and semantics of their
references in ``fastllm.ops.reference`` and launch on torch's current stream
without synchronising, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastllm.ops.cuda_common import DTYPE_CODES, check_tensor, current_stream, ext

DECODE_HEAD_DIMS = (64, 80, 96, 128, 256)
DECODE_DTYPES = (torch.float16, torch.bfloat16)
MAX_SPLITS = 256
FLOAT32_MAX = torch.finfo(torch.float32).max
# decode_attention's ``_variant`` (split kernels): 0 tensor cores where the head dim allows (default),
# 1 CUDA cores. (A variant 2, the combine fused into the split kernel's launch, was removed: no faster
# on an H200.)


def _check_rows(op: str, name: str, t: Tensor, dims: int) -> None:
    """A tensor with ``dims`` dimensions whose last dimension is contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (call .contiguous() first)")


def _strides(t: Tensor) -> tuple[int, ...]:
    """Element strides with 0 for dimensions of size 1: the kernels only ever
    multiply those by index 0, and torch leaves them arbitrary (a contiguous
    [1, H, D] tensor may have any stride(0)), which must not fail the kernels'
    alignment checks or turn off their vector paths."""
    return tuple(st if size > 1 else 0 for size, st in zip(t.shape, t.stride()))


def _check_caches(op: str, k_cache: Tensor, v_cache: Tensor, device: torch.device) -> None:
    check_tensor(op, "k_cache", k_cache, device)
    check_tensor(op, "v_cache", v_cache, device, k_cache.dtype)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must both be [num_blocks, block_size, Hk, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )


def reshape_and_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """CUDA cache write, in place; see ``reference.reshape_and_cache``.

    k, v: [N, Hk, D] with any token/head strides and a contiguous last dim
    (views of a fused qkv projection work); caches: [num_blocks, block_size,
    Hk, D] contiguous; slot_mapping: int64 [N] on the device. k and v are
    converted to the cache dtype first if they differ. Slots outside
    ``[0, num_blocks * block_size)`` are skipped (no device sync to check them;
    the reference raises), so -1 can mark a padding token.
    """
    op = "reshape_and_cache"
    _check_rows(op, "k", k, 3)
    _check_rows(op, "v", v, 3)
    device = k.device
    if not k.is_cuda or v.device != device:
        raise ValueError(f"{op}: k and v must be on the same CUDA device, got {k.device} and {v.device}")
    _check_caches(op, k_cache, v_cache, device)
    if k_cache.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: caches have dtype {k_cache.dtype}; supported: float32, float16, bfloat16")
    n, hk, d = k.shape
    if v.shape != k.shape or tuple(k_cache.shape[2:]) != (hk, d):
        raise ValueError(
            f"{op}: k {tuple(k.shape)}, v {tuple(v.shape)} and caches {tuple(k_cache.shape)} do not match "
            "(k, v: [N, Hk, D]; caches: [num_blocks, block_size, Hk, D])"
        )
    check_tensor(op, "slot_mapping", slot_mapping, device, torch.int64)
    if tuple(slot_mapping.shape) != (n,):
        raise ValueError(f"{op}: slot_mapping must have shape ({n},), got {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != k_cache.dtype and t.dtype not in DTYPE_CODES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if k.dtype != k_cache.dtype:
        k = k.to(k_cache.dtype)
    if v.dtype != k_cache.dtype:
        v = v.to(k_cache.dtype)
    if n == 0:
        return
    ks, vs = _strides(k), _strides(v)
    with torch.cuda.device(device):  # launch on the tensors' device, whichever is current
        ext().reshape_and_cache(
            k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), slot_mapping.data_ptr(),
            n, hk, d, ks[0], ks[1], vs[0], vs[1],
            k_cache.shape[0] * k_cache.shape[1], DTYPE_CODES[k_cache.dtype], current_stream(device),
        )


def decode_attention_supported(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    **_: object,
) -> bool:
    """Whether the kernel covers these inputs (16-bit, a supported head dim,
    power-of-two blocks of >= 8 tokens, int32 metadata); the op table runs the
    reference otherwise. Malformed inputs return True so that the kernel's
    wrapper reports what is wrong."""
    if not all(isinstance(t, Tensor) for t in (q, k_cache, block_tables, seq_lens)):
        return True
    if q.dtype not in DECODE_DTYPES or k_cache.dtype != q.dtype or q.shape[-1] not in DECODE_HEAD_DIMS:
        return False
    if k_cache.dim() == 4:
        bs = k_cache.shape[1]
        if bs < 8 or bs & (bs - 1):
            return False
    return block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    _variant: int | None = None,
) -> Tensor:
    """CUDA decode attention over the paged cache; see ``reference.decode_attention``.

    q: [B, Hq, D] fp16/bf16 (token stride free, heads and last dim as in a
    view of a fused qkv output); caches: [num_blocks, block_size, Hk, D]
    contiguous, same dtype, D in {64, 80, 96, 128, 256}, Hq % Hk == 0,
    block_size a power of two >= 8; block_tables: int32 [B, max_blocks] and
    seq_lens: int32 [B], both contiguous on the device. Returns [B, Hq, D].

    The lengths are read on the device, so the call never synchronises and can
    be captured in a CUDA graph. ``max_seq_len`` (a host-side upper bound on
    seq_lens, e.g. ``max(meta.seq_lens_host)`` or the graph's context limit)
    only sizes the grid: a smaller bound costs speed, never correctness. When
    None it is read with one ``seq_lens.max().item()`` (a host sync: pass it
    when capturing). ``num_splits`` forces the number of key splits (1..256;
    tests and tuning); None lets the kernel choose. ``_variant`` (tests and
    benchmarks): 0 (and None) runs the tensor-core split kernel for head dims
    64, 128 and 256 and the CUDA-core one otherwise; 1 the CUDA-core one for
    every head dim (csrc/attention.cu).
    """
    op = "decode_attention"
    _check_rows(op, "q", q, 3)
    if q.dtype not in DECODE_DTYPES:
        raise TypeError(f"{op}: q has dtype {q.dtype}; supported: float16, bfloat16")
    device = q.device
    if not q.is_cuda:
        raise ValueError(f"{op}: q must be on a CUDA device, got {q.device}")
    _check_caches(op, k_cache, v_cache, device)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"{op}: caches have dtype {k_cache.dtype}, expected q's dtype {q.dtype}")
    b, hq, d = q.shape
    num_blocks, block_size, hk, cache_d = k_cache.shape
    if cache_d != d:
        raise ValueError(f"{op}: q head_dim {d} != cache head_dim {cache_d}")
    if d not in DECODE_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {d} is not supported; supported: {DECODE_HEAD_DIMS}")
    if hk < 1 or hq % hk:
        raise ValueError(f"{op}: q heads ({hq}) must be a multiple of cache KV heads ({hk})")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size must be a power of two >= 8, got {block_size}")
    check_tensor(op, "block_tables", block_tables, device, torch.int32)
    check_tensor(op, "seq_lens", seq_lens, device, torch.int32)
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"{op}: block_tables must be [{b}, max_blocks], got {tuple(block_tables.shape)}")
    if tuple(seq_lens.shape) != (b,):
        raise ValueError(f"{op}: seq_lens must have shape ({b},), got {tuple(seq_lens.shape)}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and abs(scale) <= FLOAT32_MAX):
        raise ValueError(f"{op}: scale must be a finite number (in float32 range), got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"{op}: sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"{op}: num_splits must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if _variant is None:
        _variant = 0
    if _variant not in (0, 1):
        raise ValueError(f"{op}: _variant must be 0 (default: tensor cores) or 1 (CUDA cores), got {_variant!r}")
    if b == 0:
        return torch.empty_like(q)
    qs = _strides(q)
    if qs[0] % 8 or qs[1] % 8 or q.data_ptr() % 16:
        q = q.contiguous() if not q.is_contiguous() else q.clone()  # 16-byte vector loads need aligned rows
        qs = _strides(q)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16:
            raise ValueError(f"{op}: {name} must be 16-byte aligned (a view at an odd offset is not supported)")
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())  # host sync; callers that capture graphs pass the bound
    elif not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise ValueError(f"{op}: max_seq_len must be None or an int >= 0, got {max_seq_len!r}")
    dtype = DTYPE_CODES[q.dtype]
    window = sliding_window or 0
    with torch.cuda.device(device):  # the plan queries, and the launch runs on, q's device
        splits, ws_floats = ext().decode_attention_plan(b, hq, hk, d, max_seq_len, window, num_splits or 0, dtype,
                                                        _variant)
        out = torch.empty((b, hq, d), dtype=q.dtype, device=device)
        workspace = torch.empty(ws_floats, dtype=torch.float32, device=device) if ws_floats else None
        ext().decode_attention(
            out.data_ptr(), workspace.data_ptr() if workspace is not None else 0, q.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
            b, hq, hk, d, qs[0], qs[1], num_blocks, block_size, block_tables.shape[1],
            float(scale), window, splits, dtype, current_stream(device), _variant,
        )
    return out
