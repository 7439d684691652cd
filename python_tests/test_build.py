"""The extension is built where it should be, and backend selection obeys the environment."""

from __future__ import annotations

import os
import warnings

import pytest

from fastllm import backend, backend_info


def test_backend_info_fields():
    info = backend_info()
    for key in ("torch_version", "cuda_available", "extension_built", "compiled_kernels", "enabled_kernels"):
        assert key in info
    assert isinstance(info["compiled_kernels"], list)
    assert set(info["enabled_kernels"]) <= set(info["compiled_kernels"])
    assert info["extension_built"] == backend.HAS_C


@pytest.mark.skipif(os.environ.get("FASTLLM_EXPECT_C") != "1", reason="FASTLLM_EXPECT_C=1 not set")
def test_extension_was_built():
    assert backend.HAS_C, f"fastllm._C failed to import: {backend._C_ERROR}"
    assert "rmsnorm" in backend.compiled_kernels()
    assert backend_info()["cuda_archs"]


def test_kernel_selection_follows_environment(monkeypatch):
    monkeypatch.setattr(backend, "compiled_kernels", lambda: ["rmsnorm"])
    monkeypatch.setattr(backend, "VERIFIED_KERNELS", frozenset())
    monkeypatch.delenv("FASTLLM_KERNELS", raising=False)
    monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
    backend.reset_settings()
    assert not backend.kernel_enabled("rmsnorm")  # built but unverified: off
    monkeypatch.setenv("FASTLLM_KERNELS", "rmsnorm")
    backend.reset_settings()
    assert backend.kernel_enabled("rmsnorm") and not backend.kernel_enabled("attention")
    monkeypatch.setenv("FASTLLM_KERNELS", "all")
    backend.reset_settings()
    assert backend.kernel_enabled("rmsnorm")
    monkeypatch.setenv("FASTLLM_BACKEND", "torch")
    backend.reset_settings()
    assert not backend.kernel_enabled("rmsnorm")
    monkeypatch.delenv("FASTLLM_BACKEND")
    monkeypatch.delenv("FASTLLM_KERNELS")
    monkeypatch.setattr(backend, "VERIFIED_KERNELS", frozenset({"rmsnorm"}))
    backend.reset_settings()
    assert backend.kernel_enabled("rmsnorm")  # verified: on by default


def test_misspelt_settings_warn(monkeypatch, only_named_kernels):
    """A name in FASTLLM_KERNELS that no compiled kernel has, or a FASTLLM_BACKEND
    other than 'torch', is said, not silently ignored."""
    monkeypatch.setattr(backend, "compiled_kernels", lambda: ["rmsnorm", "sample"])
    monkeypatch.setattr(backend, "HAS_C", True)
    monkeypatch.setenv("FASTLLM_KERNELS", "rmsnrom,sample")
    monkeypatch.setenv("FASTLLM_BACKEND", "troch")
    backend.reset_settings()
    with pytest.warns(RuntimeWarning) as caught:
        assert backend.kernel_enabled("sample") and not backend.kernel_enabled("rmsnorm")
    text = " ".join(str(w.message) for w in caught)
    assert "rmsnrom" in text and "troch" in text
    monkeypatch.setenv("FASTLLM_KERNELS", "all")
    monkeypatch.setenv("FASTLLM_BACKEND", "torch")
    backend.reset_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not backend.kernel_enabled("sample")  # forced reference, and nothing to warn about


def test_cuda_wrapper_rejects_cpu_tensors():
    import torch

    from fastllm.ops import cuda

    if not backend.HAS_C:
        with pytest.raises((RuntimeError, ValueError)):
            cuda.rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-6)
        return
    with pytest.raises(ValueError, match="must be on"):
        cuda.rmsnorm(torch.ones(2, 4), torch.ones(4), 1e-6)
