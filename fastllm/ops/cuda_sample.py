"""CUDA token sampling (csrc/sample.cu): the wrapper of ``reference.sample``.

The kernel validates the per-row parameters and the logits on the device and
writes a negative status instead of a token for a bad row (-1 NaN logits,
-2 every logit -inf, -3 parameters out of range). The wrapper turns those into
the reference's ``ValueError``: that needs the output on the host, i.e. one
synchronisation per call (free in the generation loop, which reads the tokens
right away). Inside CUDA-graph capture, or with ``check=False``, there is no
check: bad rows come back as their negative status codes.

Two unverified kernels sit beside the verified one, each opted into by name
(``FASTLLM_KERNELS``): ``sample_v1``, variant 1 of the sampler
(csrc/sample_v1.cuh: the same draws bit for bit, fewer barriers), which
``sample`` then runs by default; and ``sample_argmax`` (csrc/sample_argmax.cu),
the argmax of every row, which ``sampling.sample_next`` uses for steps whose
rows are all greedy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastllm import backend
from fastllm.ops.cuda_common import DTYPE_CODES, check_tensor, current_stream, ext

SAMPLE_V1_KERNEL = "sample_v1"  # enabled: sample's default _variant is 1
ARGMAX_KERNEL = "sample_argmax"  # enabled: sampling.sample_next sends all-greedy steps to argmax()
_STATUS = {-1: "logits contain NaN", -2: "every logit is -inf", -3: "sampling parameters out of range"}
_MAX_ROWS = 65535
_MAX_VOCAB = (1 << 24) - 1


def _to_int64(op: str, name: str, values: Tensor | Sequence[int], rows: int, device: torch.device) -> Tensor:
    """Seeds or offsets as a contiguous int64 tensor [rows] on ``device``.
    Python integers are taken modulo 2**64 (as two's complement int64)."""
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must hold integers, got dtype {values.dtype}")
        if tuple(values.shape) != (rows,):
            raise ValueError(f"{op}: {name} must have shape ({rows},), got {tuple(values.shape)}")
        return values.to(device=device, dtype=torch.int64).contiguous()
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list of ints or an integer tensor, got {type(values).__name__}") from None
    if len(items) != rows:
        raise ValueError(f"{op}: {name} must have {rows} entries (one per row), got {len(items)}")
    wrapped = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must hold Python ints, got {type(v).__name__}")
        v &= (1 << 64) - 1
        wrapped.append(v - (1 << 64) if v >= 1 << 63 else v)
    return torch.tensor(wrapped, dtype=torch.int64).to(device)


def raise_for_status(tokens: Tensor | Sequence[int]) -> None:
    """Raise the reference's ValueError for the rows of a ``sample`` result
    that hold a negative status code instead of a token (a result taken with
    ``check=False``, read later); nothing when every row holds a token."""
    codes = torch.as_tensor(tokens, dtype=torch.int64).cpu()
    if not bool((codes < 0).any()):
        return
    for code in (-1, -2, -3):  # the reference's order: NaN first
        rows = (codes == code).nonzero().flatten().tolist()
        if rows:
            detail = (
                ": temperature must be finite and >= 0, top_k >= 0, top_p in (0, 1], min_p in [0, 1]"
                if code == -3
                else ""
            )
            raise ValueError(f"sample: {_STATUS[code]} in rows {rows}{detail}")
    raise RuntimeError(f"sample: kernel returned unexpected status codes {sorted(set(codes[codes < 0].tolist()))}")


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor | Sequence[int],
    offsets: Tensor | Sequence[int],
    *,
    check: bool = True,
    _group: int = 0,
    _cache_limit: int | None = None,
    _variant: int | None = None,
) -> Tensor:
    """CUDA sampler: one token per row; see ``reference.sample``.

    logits: [B, V] fp32/fp16/bf16, contiguous, on a GPU. temperature, top_p,
    min_p: fp32 [B]; top_k: int32 (or int64) [B], all on the logits' device.
    seeds, offsets: lists of ints or integer tensors [B] (moved to the device);
    a row's draw depends only on its logits, parameters, seed and offset.
    Returns int64 [B]. The distribution is the reference's; the random numbers
    are not (Philox4x32-10 on the GPU, torch's CPU generator in the reference).
    check: raise the reference's ValueError for bad rows (one host sync; skipped
    while a CUDA graph is being captured). With check=False nothing waits for
    the device: ``raise_for_status`` turns the codes into that error once the
    host reads the tokens. _group / _cache_limit force the blocks
    per row and the shared-memory cache size (tests). _variant: 0 the verified
    kernel, 1 the rescheduled one (bit-identical tokens); None: 1 when
    ``sample_v1`` is enabled (``FASTLLM_KERNELS=sample_v1``), else 0.
    """
    op = "sample"
    if _variant is None:
        _variant = default_variant()
    if isinstance(_variant, bool) or not isinstance(_variant, int):
        raise TypeError(f"{op}: _variant must be an int (0 or 1), got {type(_variant).__name__}")
    if _variant not in (0, 1):
        raise ValueError(f"{op}: _variant must be 0 (the verified kernel) or 1 (rescheduled), got {_variant}")
    rows, vocab = _check_logits(op, logits)
    device = logits.device
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        check_tensor(op, name, t, device, torch.float32)
    check_tensor(op, "top_k", top_k, device)
    if top_k.dtype == torch.int64:
        top_k = top_k.clamp(min=-1, max=2**31 - 1).to(torch.int32)
    elif top_k.dtype != torch.int32:
        raise TypeError(f"{op}: top_k has dtype {top_k.dtype}, expected torch.int32 (or torch.int64)")
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if tuple(t.shape) != (rows,):
            raise ValueError(f"{op}: {name} must have shape ({rows},), got {tuple(t.shape)}")
    seeds_t = _to_int64(op, "seeds", seeds, rows, device)
    offsets_t = _to_int64(op, "offsets", offsets, rows, device)
    if _group not in (0, 1, 2, 4, 8, 16):
        raise ValueError(f"{op}: _group must be 0 (auto), 1, 2, 4, 8 or 16, got {_group}")
    out = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return out
    with torch.cuda.device(device):
        ext().sample(
            out.data_ptr(),
            logits.data_ptr(),
            temperature.data_ptr(),
            top_k.data_ptr(),
            top_p.data_ptr(),
            min_p.data_ptr(),
            seeds_t.data_ptr(),
            offsets_t.data_ptr(),
            rows,
            vocab,
            DTYPE_CODES[logits.dtype],
            int(_group),
            -1 if _cache_limit is None else int(_cache_limit),
            current_stream(device),
            _variant,
        )
    if check and not torch.cuda.is_current_stream_capturing() and int(out.min()) < 0:
        raise_for_status(out)
    return out


def _check_logits(op: str, logits: Tensor) -> tuple[int, int]:
    """(rows, vocab) of logits [B, V] that the kernels take: fp32/fp16/bf16,
    contiguous, on a GPU, within the row and vocabulary limits; else the error."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: logits has dtype {logits.dtype}; supported: float32, float16, bfloat16")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be [B, V], got shape {tuple(logits.shape)}")
    if not logits.is_cuda:
        raise ValueError(f"{op}: logits must be on a CUDA device, got {logits.device}")
    check_tensor(op, "logits", logits, logits.device)
    rows, vocab = logits.shape
    if vocab < 1 or vocab > _MAX_VOCAB:
        raise ValueError(f"{op}: vocabulary size must be in [1, {_MAX_VOCAB}], got {vocab}")
    if rows > _MAX_ROWS:
        raise ValueError(f"{op}: at most {_MAX_ROWS} rows per call, got {rows}")
    return rows, vocab


def default_variant() -> int:
    """``sample``'s ``_variant`` when none is given: 1 when the unverified
    ``sample_v1`` kernel is enabled (opted into with FASTLLM_KERNELS), else 0."""
    return 1 if backend.kernel_enabled(SAMPLE_V1_KERNEL) else 0


def argmax(logits: Tensor, *, check: bool = True, _group: int = 0) -> Tensor:
    """Greedy draw: ``reference.sample`` with every temperature 0, i.e. the
    argmax of each row, the lowest id on ties; +inf is a maximum like any.

    logits: [B, V] fp32/fp16/bf16, contiguous, on a GPU. Returns int64 [B].
    A row with NaN, or with every logit -inf, raises the reference's
    ValueError (one host sync; skipped with ``check=False`` or while a CUDA
    graph is being captured: such rows hold -1 / -2, see ``raise_for_status``).
    No sampling parameter is read, so nothing here is "out of range": the
    caller sends only rows whose temperature is 0. _group forces the blocks
    per row (0 auto, 1, 2, 4, 8; more than one needs sm_90).
    """
    op = "sample_argmax"
    if isinstance(_group, bool) or _group not in (0, 1, 2, 4, 8):
        raise ValueError(f"{op}: _group must be 0 (auto), 1, 2, 4 or 8, got {_group!r}")
    rows, vocab = _check_logits(op, logits)
    device = logits.device
    out = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return out
    with torch.cuda.device(device):
        ext().sample_argmax(out.data_ptr(), logits.data_ptr(), rows, vocab, DTYPE_CODES[logits.dtype], int(_group),
                            current_stream(device))
    if check and not torch.cuda.is_current_stream_capturing() and int(out.min()) < 0:
        raise_for_status(out)
    return out
