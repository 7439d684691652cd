"""Which backend runs each op: the compiled CUDA extension or the reference.

A kernel runs by default on CUDA tensors only once it has passed its tests on
a GPU (``VERIFIED_KERNELS``). ``FASTLLM_KERNELS=name,name`` (or ``all``) opts
into kernels that are built but not yet verified, and into the experimental
torch-side paths (``TORCH_PATHS``); ``FASTLLM_BACKEND=torch``
forces the PyTorch reference everywhere.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

try:
    from fastllm import _C  # type: ignore[attr-defined]

    HAS_C = True
    _C_ERROR: str | None = None
except ImportError as e:  # pure-Python install, or a broken build
    _C = None
    HAS_C = False
    _pkg = os.path.dirname(os.path.abspath(__file__))
    if any(f.startswith("_C.") for f in os.listdir(_pkg)):
        _C_ERROR = f"fastllm._C failed to import: {e}"
    else:  # the message of a plain missing module is about a "partially initialized module"
        _C_ERROR = (f"no fastllm._C in {_pkg}: a pure-Python install (no nvcc at build time), "
                    "or a source tree imported instead of the installed package")

# Kernels that have passed their tests on a Hopper GPU (an H200, 2026-12-04;
# bench/RESULTS.md): on by default for CUDA tensors.
VERIFIED_KERNELS: frozenset[str] = frozenset({
    "rmsnorm", "silu_and_mul", "rotary_embedding", "reshape_and_cache", "decode_attention", "sample",
    "prefill_attention", "prefill_attention_sm90", "prefill_attention_sm90_pipelined",
    "int8_linear", "int4_linear", "int4_linear_wgmma",
})
# Experimental paths written with torch's own CUDA ops instead of a compiled
# kernel: they take effect where a kernel would (CUDA tensors), once named in
# FASTLLM_KERNELS, with or without the extension (fastllm/ops/grouped_moe.py).
TORCH_PATHS: frozenset[str] = frozenset({"fused_moe_grouped"})


def compiled_kernels() -> list[str]:
    return list(_C.kernels()) if HAS_C else []


@functools.lru_cache(maxsize=None)
def _settings() -> tuple[bool, frozenset[str]]:
    """(reference forced, opted-in kernels) from the environment, read once."""
    backend = os.environ.get("FASTLLM_BACKEND", "").strip().lower()
    if backend not in ("", "torch"):
        warnings.warn(f"fastllm: FASTLLM_BACKEND={backend!r} is not understood (only 'torch', which forces the "
                      "reference ops); ignored", RuntimeWarning, stacklevel=2)
    wanted = {k.strip() for k in os.environ.get("FASTLLM_KERNELS", "").split(",") if k.strip()}
    if "all" in wanted:
        wanted = set(compiled_kernels()) | TORCH_PATHS
    unknown = sorted(wanted - set(compiled_kernels()) - TORCH_PATHS)
    if unknown and HAS_C:  # without the extension, warn_once_no_extension says why nothing runs
        warnings.warn(f"fastllm: FASTLLM_KERNELS names no compiled kernel {unknown}; the compiled ones are "
                      f"{compiled_kernels()}", RuntimeWarning, stacklevel=2)
    return backend == "torch", frozenset(wanted)


def reset_settings() -> None:
    """Re-read FASTLLM_BACKEND / FASTLLM_KERNELS (for tests)."""
    _settings.cache_clear()
    kernel_enabled.cache_clear()


@functools.lru_cache(maxsize=None)
def kernel_enabled(name: str) -> bool:
    """Whether CUDA tensors going through op ``name`` use the compiled kernel
    (or, for a name in ``TORCH_PATHS``, that path)."""
    forced, wanted = _settings()
    if forced:
        return False
    if name in TORCH_PATHS:
        return name in wanted
    if name not in compiled_kernels():
        return False
    return name in VERIFIED_KERNELS or name in wanted


_warned = False


def warn_once_no_extension() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"fastllm: CUDA tensors but no compiled extension ({_C_ERROR}); running the PyTorch "
            "reference ops. Reinstall with nvcc on PATH to build the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


def cuda_available() -> bool:
    return torch.cuda.is_available()


def backend_info() -> dict[str, Any]:
    """What is built and what will run: for bug reports and ``fastllm info``."""
    from fastllm import __version__

    forced, wanted = _settings()
    info: dict[str, Any] = {
        "fastllm_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_available(),
        "extension_built": HAS_C,
        "extension_error": _C_ERROR,
        "cuda_archs": list(_C.cuda_archs()) if HAS_C else [],
        "compiled_kernels": compiled_kernels(),
        "verified_kernels": sorted(VERIFIED_KERNELS),
        "enabled_kernels": [k for k in [*compiled_kernels(), *sorted(TORCH_PATHS)] if kernel_enabled(k)],
        "backend_override": "torch" if forced else None,
        "opted_in_kernels": sorted(wanted),
    }
    if cuda_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info
