"""CUDA wrappers of the weight-only quantized linears (csrc/int8_linear.cu,
csrc/int4_linear.cu).

``int8_linear`` and ``int4_linear`` have the signatures and semantics of their
references in ``fastllm.ops.reference`` (formats: ``fastllm.quant``). Up to
``FUSED_MAX_TOKENS`` tokens they run one fused kernel that streams the packed
weights once and dequantizes in registers (plus a small split-K reduction when
N alone would leave SMs idle); more tokens are a prefill, where dequantizing to
a temporary 16-bit weight and calling cuBLAS is faster. Everything launches on
torch's current stream without synchronising, so CUDA graphs can capture it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastllm import backend
from fastllm.ops.cuda_common import DTYPE_CODES, check_tensor, current_stream, ext

ACT_DTYPES = (torch.float16, torch.bfloat16)
INT4_GROUP_SIZES = (32, 64, 128)
# Tokens up to which the fused kernel runs; beyond, dequantize + cuBLAS.
FUSED_MAX_TOKENS = 64
# int4_linear's warpgroup-MMA kernel on sm_90 GPUs (``_variant=2``,
# csrc/int4_linear_sm90.cu). It covers M 9..64 (variant 2 is variant 0
# elsewhere) and is the default at M 17..64: on an H200 it took 18-22% off
# M = 64 and tied variant 0 at M = 16 (bench/RESULTS.md). Verified, so on
# unless the kernel is switched off.
INT4_WGMMA_KERNEL = "int4_linear_wgmma"
INT4_WGMMA_TOKENS = (9, 64)  # the M range it covers
INT4_WGMMA_DEFAULT_TOKENS = (17, 64)  # the M range where it is picked by default
# int4_linear's wide tiles at M <= 16 (``_variant=3``, or 4 with two mma chains
# per warp; csrc/int4_linear.cu): twice the warps per SM of variant 0's. Not
# yet run on a GPU, so off unless opted in (FASTLLM_KERNELS=int4_linear_wide),
# which makes them the choice at M <= 16.
INT4_WIDE_KERNEL = "int4_linear_wide"
INT4_WIDE_TOKENS = 16


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _int8_plan(m: int, n: int, k: int, sms: int, splits: int) -> tuple[int, int]:
    return tuple(ext().int8_linear_plan(m, n, k, sms, splits))


@functools.lru_cache(maxsize=4096)
def _int4_plan(m: int, n: int, k: int, group: int, sms: int, splits: int, variant: int = 0) -> tuple[int, int]:
    return tuple(ext().int4_linear_plan(m, n, k, group, sms, splits, variant))


def _check_x(op: str, x: Tensor) -> int:
    """x: [..., K] fp16/bf16, contiguous, on a GPU; returns K."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16")
    if not x.is_cuda:
        raise ValueError(f"{op}: x must be a CUDA tensor, got {x.device}")
    if x.dim() == 0 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must be [..., in_features] with in_features >= 1, got shape {tuple(x.shape)}")
    check_tensor(op, "x", x, x.device)
    return x.shape[-1]


def _check_bias(op: str, bias: Tensor | None, x: Tensor, n: int) -> None:
    if bias is None:
        return
    check_tensor(op, "bias", bias, x.device, x.dtype)
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")


def _out(x: Tensor, n: int) -> Tensor:
    return torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)


def _workspace(floats: int, device: torch.device) -> tuple[Tensor | None, int]:
    if floats == 0:
        return None, 0
    ws = torch.empty(floats, dtype=torch.float32, device=device)
    return ws, ws.data_ptr()


# --------------------------------------------------------------------------- #
# int8
# --------------------------------------------------------------------------- #
def _check_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> tuple[int, int]:
    op = "int8_linear"
    k = _check_x(op, x)
    check_tensor(op, "qweight", qweight, x.device, torch.int8)
    if qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"{op}: qweight must be [out_features, {k}] to match x, got {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if n < 1:
        raise ValueError(f"{op}: out_features must be >= 1")
    check_tensor(op, "scales", scales, x.device, torch.float32)
    if tuple(scales.shape) != (n,):
        raise ValueError(f"{op}: scales must have shape ({n},), got {tuple(scales.shape)}")
    _check_bias(op, bias, x, n)
    return n, k


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """CUDA W8A16 linear; see ``reference.int8_linear``.

    ``y = x @ (qweight * scales[:, None]).T + bias``. x: [..., K] fp16/bf16
    contiguous; qweight: int8 [N, K]; scales: fp32 [N]; bias: [N] in x's dtype
    or None. Returns [..., N] in x's dtype (fp32 accumulation)."""
    n, k = _check_int8(x, qweight, scales, bias)
    m = x.numel() // k
    if m > FUSED_MAX_TOKENS:
        return F.linear(x, int8_dequantize(qweight, scales, x.dtype), bias)
    return _int8_fused(x, qweight, scales, bias)


def _int8_fused(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, splits: int = 0
) -> Tensor:
    """The fused kernel for any number of tokens; ``splits`` 0 = automatic split-K."""
    n, k = _check_int8(x, qweight, scales, bias)
    m = x.numel() // k
    out = _out(x, n)
    if m == 0:
        return out
    num_splits, floats = _int8_plan(m, n, k, _num_sms(x.device.index or 0), splits)
    ws, ws_ptr = _workspace(floats, x.device)
    with torch.cuda.device(x.device):  # per-device smem opt-in and launch: x's device, whichever is current
        ext().int8_linear(
            out.data_ptr(), ws_ptr, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
            bias.data_ptr() if bias is not None else 0, m, n, k, num_splits, DTYPE_CODES[x.dtype],
            current_stream(x.device),
        )
    return out


def int8_dequantize(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 [N, K] and fp32 scales [N] on a GPU -> [N, K] in ``dtype`` (fp16/bf16):
    ``qweight * scales[:, None]`` rounded once, as ``reference.dequantize_int8(...).to(dtype)``."""
    op = "int8_linear"
    if dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: dequantize dtype must be float16 or bfloat16, got {dtype}")
    if not isinstance(qweight, Tensor) or not qweight.is_cuda:
        raise ValueError(f"{op}: qweight must be a CUDA tensor")
    check_tensor(op, "qweight", qweight, qweight.device, torch.int8)
    check_tensor(op, "scales", scales, qweight.device, torch.float32)
    if qweight.dim() != 2 or tuple(scales.shape) != (qweight.shape[0],):
        raise ValueError(f"{op}: need qweight [N, K] and scales [N], got {tuple(qweight.shape)}, {tuple(scales.shape)}")
    n, k = qweight.shape
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if out.numel():
        with torch.cuda.device(qweight.device):
            ext().int8_dequantize(out.data_ptr(), qweight.data_ptr(), scales.data_ptr(), n, k, DTYPE_CODES[dtype],
                                  current_stream(qweight.device))
    return out


def int8_linear_supported(x, qweight, scales, bias=None, *_, **__) -> bool:
    """Whether the kernel covers these inputs: contiguous fp16/bf16 activations, a
    bias in their dtype, fp32 scales. The op table runs the reference otherwise
    (fp32 activations, strided views, other scale dtypes). Malformed inputs
    return True so that the wrapper reports what is wrong."""
    if not all(isinstance(t, Tensor) for t in (x, qweight, scales)):
        return True
    if x.dtype not in ACT_DTYPES or not x.is_contiguous():
        return False
    if scales.dtype != torch.float32 or not qweight.is_contiguous() or not scales.is_contiguous():
        return False
    return bias is None or not isinstance(bias, Tensor) or (bias.dtype == x.dtype and bias.is_contiguous())


# --------------------------------------------------------------------------- #
# int4
# --------------------------------------------------------------------------- #
def _check_int4(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None
) -> tuple[int, int]:
    op = "int4_linear"
    k = _check_x(op, x)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{op}: in_features {k} is not a multiple of group_size {group_size}")
    check_tensor(op, "qweight", qweight, x.device, torch.uint8)
    if qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"{op}: qweight must be uint8 [out_features, {k // 2}] to match x, got {tuple(qweight.shape)}")
    n, groups = qweight.shape[0], k // group_size
    if n < 1:
        raise ValueError(f"{op}: out_features must be >= 1")
    check_tensor(op, "scales", scales, x.device, x.dtype)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"{op}: scales must have shape ({n}, {groups}), got {tuple(scales.shape)}")
    check_tensor(op, "zeros", zeros, x.device, torch.uint8)
    if tuple(zeros.shape) != (n, groups):
        raise ValueError(f"{op}: zeros must have shape ({n}, {groups}), got {tuple(zeros.shape)}")
    _check_bias(op, bias, x, n)
    return n, k


def int4_linear(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """CUDA W4A16 linear; see ``reference.int4_linear``.

    ``y = x @ w.T + bias`` with ``w = (q - zeros) * scales`` per group of
    ``group_size`` (32, 64, 128) input columns. x: [..., K] fp16/bf16
    contiguous; qweight: uint8 [N, K/2] (low nibble = even column); scales:
    [N, K/g] in x's dtype; zeros: uint8 [N, K/g]; bias: [N] in x's dtype or
    None. Returns [..., N] in x's dtype (fp32 accumulation)."""
    n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    m = x.numel() // k
    if m > FUSED_MAX_TOKENS:
        return F.linear(x, int4_dequantize(qweight, scales, zeros, group_size), bias)
    return _int4_fused(x, qweight, scales, zeros, group_size, bias)


def _int4_fused(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
    splits: int = 0, _variant: int | None = None,
) -> Tensor:
    """The fused kernel for any number of tokens; ``splits`` 0 = automatic split-K.
    ``_variant``: 0 the mma.sync kernels, 2 the warpgroup-MMA kernel (at M
    9..64 on an sm_90 GPU with the 90a build; variant 0 elsewhere; not bitwise
    equal to 0), 3 / 4 the wide tiles at M <= 16 with one / two mma chains
    per warp (variant 0 at M > 16; not bitwise equal to 0); there is no
    variant 1 (an 8-stage pipeline at M <= 8, removed: no faster on an H200).
    None picks 2 at M 17..64 when ``int4_linear_wgmma`` is enabled (the
    default), 3 at M <= 16 when ``int4_linear_wide`` is (opt-in), else 0."""
    n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    m = x.numel() // k
    if _variant is None:
        lo, hi = INT4_WGMMA_DEFAULT_TOKENS
        if lo <= m <= hi and backend.kernel_enabled(INT4_WGMMA_KERNEL):
            _variant = 2
        elif m <= INT4_WIDE_TOKENS and backend.kernel_enabled(INT4_WIDE_KERNEL):
            _variant = 3
        else:
            _variant = 0
    if _variant not in (0, 2, 3, 4):
        raise ValueError(f"int4_linear: _variant must be 0 (default), 2 (wgmma), 3 or 4 (wide), got {_variant!r}")
    out = _out(x, n)
    if m == 0:
        return out
    num_splits, floats = _int4_plan(m, n, k, group_size, _num_sms(x.device.index or 0), splits, _variant)
    ws, ws_ptr = _workspace(floats, x.device)
    with torch.cuda.device(x.device):  # per-device smem opt-in and launch: x's device, whichever is current
        ext().int4_linear(
            out.data_ptr(), ws_ptr, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            bias.data_ptr() if bias is not None else 0, m, n, k, group_size, num_splits, DTYPE_CODES[x.dtype],
            current_stream(x.device), _variant,
        )
    return out


def int4_dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Packed uint8 [N, K/2], scales [N, K/g] (fp16/bf16), uint8 zeros [N, K/g] on a
    GPU -> [N, K] in the scales' dtype: ``(q - zero) * scale`` rounded once, as
    ``reference.dequantize_int4(...).to(scales.dtype)``."""
    op = "int4_linear"
    if not isinstance(qweight, Tensor) or not qweight.is_cuda:
        raise ValueError(f"{op}: qweight must be a CUDA tensor")
    if not isinstance(scales, Tensor) or scales.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: scales must be a float16 or bfloat16 tensor")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    check_tensor(op, "qweight", qweight, qweight.device, torch.uint8)
    check_tensor(op, "scales", scales, qweight.device)
    check_tensor(op, "zeros", zeros, qweight.device, torch.uint8)
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be [N, K/2], got {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % group_size or tuple(scales.shape) != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(
            f"{op}: need scales and zeros [{n}, K/{group_size}] for qweight {tuple(qweight.shape)}, got "
            f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    out = torch.empty(n, k, dtype=scales.dtype, device=qweight.device)
    if out.numel():
        with torch.cuda.device(qweight.device):
            ext().int4_dequantize(out.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k,
                                  group_size, DTYPE_CODES[scales.dtype], current_stream(qweight.device))
    return out


def int4_linear_supported(x, qweight, scales, zeros, group_size=None, bias=None, *_, **__) -> bool:
    """Whether the kernel covers these inputs: contiguous fp16/bf16 activations
    with scales (and bias) in the same dtype. The op table runs the reference
    otherwise. Malformed inputs return True so that the wrapper reports what is
    wrong."""
    if not all(isinstance(t, Tensor) for t in (x, qweight, scales, zeros)):
        return True
    if x.dtype not in ACT_DTYPES or not x.is_contiguous():
        return False
    if scales.dtype != x.dtype or not all(t.is_contiguous() for t in (qweight, scales, zeros)):
        return False
    return bias is None or not isinstance(bias, Tensor) or (bias.dtype == x.dtype and bias.is_contiguous())
