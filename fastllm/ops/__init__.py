"""The op table: the only functions the model calls.

Each op runs the CUDA kernel when its input lives on a GPU and the kernel is
enabled (built, verified on a GPU or opted in with ``FASTLLM_KERNELS``, and not
overridden by ``FASTLLM_BACKEND=torch``); otherwise it runs the PyTorch
reference in ``fastllm.ops.reference``. This is the one place that branches on
the backend. Signatures and semantics are those of the reference functions.
"""

from __future__ import annotations

from torch import Tensor

from fastllm import backend
from fastllm.ops import reference
from fastllm.ops.reference import AttentionMetadata

__all__ = [
    "AttentionMetadata",
    "attention",
    "embedding",
    "fused_moe",
    "int4_linear",
    "int8_linear",
    "linear",
    "moe_route",
    "reshape_and_cache",
    "rmsnorm",
    "rotary_embedding",
    "sample",
    "silu_and_mul",
]


def _use_kernel(name: str, x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    if backend.kernel_enabled(name):
        return True
    if not backend.HAS_C:
        backend.warn_once_no_extension()
    return False


def rmsnorm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    if _use_kernel("rmsnorm", x):
        from fastllm.ops import cuda

        return cuda.rmsnorm(x, weight, eps, residual)
    return reference.rmsnorm(x, weight, eps, residual)


# Ops without a kernel yet run their reference everywhere (on a GPU they are
# torch's own CUDA ops). Each gains a branch like rmsnorm's when its kernel lands.
embedding = reference.embedding
linear = reference.linear
int8_linear = reference.int8_linear
int4_linear = reference.int4_linear
silu_and_mul = reference.silu_and_mul
rotary_embedding = reference.rotary_embedding
reshape_and_cache = reference.reshape_and_cache
attention = reference.attention
moe_route = reference.moe_route
fused_moe = reference.fused_moe
sample = reference.sample
