"""Shared test settings: GPU tests skip cleanly without a GPU or the extension."""

from __future__ import annotations

import pytest
import torch

from fastllm import backend

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and backend.HAS_C),
    reason="needs a CUDA GPU and fastllm's compiled extension",
)


@pytest.fixture(autouse=True)
def _fresh_backend_settings():
    """Tests that change FASTLLM_* variables see them; others see defaults."""
    backend.reset_settings()
    yield
    backend.reset_settings()


def poison_cuda_allocator(device: str = "cuda") -> None:
    """Fill free memory in torch's caching allocator with NaN so that a kernel
    that leaves part of its output unwritten fails the comparison."""
    blob = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=device)
    del blob
