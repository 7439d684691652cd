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
from fastllm.ops import grouped_moe, reference
from fastllm.ops.reference import AttentionMetadata

__all__ = [
    "AttentionMetadata",
    "attention",
    "decode_attention",
    "embedding",
    "fused_moe",
    "int4_linear",
    "int8_linear",
    "linear",
    "moe_route",
    "prefill_attention",
    "reshape_and_cache",
    "rmsnorm",
    "rotary_embedding",
    "sample",
    "sigmoid_gated_add",
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


def _op(name: str):
    """Op ``name``: ``fastllm.ops.cuda.<name>`` when its first argument is a CUDA
    tensor and the kernel is enabled, else ``reference.<name>``.

    A kernel that covers only part of the op's domain (some head dims, 16-bit
    dtypes) defines ``fastllm.ops.cuda.<name>_supported(*args, **kwargs)``; calls
    outside it run the reference instead of failing."""
    ref = getattr(reference, name)

    def op(*args, **kwargs):
        if _use_kernel(name, args[0]):
            from fastllm.ops import cuda

            supported = getattr(cuda, f"{name}_supported", None)
            if supported is None or supported(*args, **kwargs):
                return getattr(cuda, name)(*args, **kwargs)
        return ref(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = ref.__doc__
    op.__wrapped__ = ref
    return op


# An op without a compiled kernel always runs its reference (on a GPU that is
# torch's own CUDA ops); a kernel takes over once built and enabled.
embedding = _op("embedding")
rmsnorm = _op("rmsnorm")
linear = _op("linear")
int8_linear = _op("int8_linear")
int4_linear = _op("int4_linear")
silu_and_mul = _op("silu_and_mul")
rotary_embedding = _op("rotary_embedding")
reshape_and_cache = _op("reshape_and_cache")
attention = _op("attention")
moe_route = _op("moe_route")
def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
    if x.is_cuda and backend.kernel_enabled(grouped_moe.KERNEL) and grouped_moe.supported(x, w13, w2):
        return grouped_moe.fused_moe(x, w13, w2, weights, expert_ids)  # no host sync: graph-capturable
    return reference.fused_moe(x, w13, w2, weights, expert_ids)


fused_moe.__doc__ = reference.fused_moe.__doc__
fused_moe.__wrapped__ = reference.fused_moe
sigmoid_gated_add = _op("sigmoid_gated_add")
sample = _op("sample")
decode_attention = _op("decode_attention")
prefill_attention = _op("prefill_attention")
