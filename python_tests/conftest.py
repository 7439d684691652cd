"""Shared test settings: GPU tests skip cleanly without a GPU or the extension."""

from __future__ import annotations

import os

import pytest
import torch

from fastllm import backend

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and backend.HAS_C),
    reason="needs a CUDA GPU and fastllm's compiled extension",
)


def pytest_collection_modifyitems(config, items):
    """Every test that skips without a GPU (a skipif whose reason names a GPU)
    gets the ``cuda`` marker, so a GPU round can run just those with
    ``-m cuda`` (bench/run_gpu.sh); the others run the same on any machine."""
    for item in items:
        if any("GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _fresh_backend_settings():
    """Tests that change FASTLLM_* variables see them; others see defaults."""
    backend.reset_settings()
    yield
    backend.reset_settings()


@pytest.fixture
def only_named_kernels(monkeypatch):
    """No kernel is on by default (VERIFIED_KERNELS empty): only those FASTLLM_KERNELS
    names run, so a test can compare a named kernel against the reference ops."""
    monkeypatch.setattr(backend, "VERIFIED_KERNELS", frozenset())


def hopper_shared_memory() -> bool:
    """Whether the quantized linears' split-K plan sees Hopper's 228 KB of shared
    memory per SM (as without a GPU), so that its exact choices can be asserted."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] in (9, 10)


def spy_variants(monkeypatch, kernel: str, index: int) -> list:
    """Record argument ``index`` (a kernel's variant) of every call of
    ``fastllm._C.<kernel>`` in the returned list; the calls go through."""
    seen = []
    real = getattr(backend._C, kernel)
    monkeypatch.setattr(backend._C, kernel, lambda *a: (seen.append(a[index]), real(*a))[1], raising=False)
    return seen


def poison_cuda_allocator(device: str = "cuda") -> None:
    """Fill free memory in torch's caching allocator with NaN so that a kernel
    that leaves part of its output unwritten fails the comparison."""
    blob = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=device)
    del blob


def assert_greedy_equal_up_to_ties(want, got, margin: float) -> None:
    """Two greedy runs of different arithmetic (a kernel vs the reference, bf16
    rounding orders) agree token for token until their first difference, and
    that difference is a near-tie: the token taken instead is among the
    reference's top alternatives, within ``margin`` nats of its top choice.
    ``want`` and ``got`` are GenerationOutputs generated with ``logprobs >= 2``. Before the first
    difference both runs saw the same tokens, so the logprobs there belong to
    the same context. Random-weight and small models in 16 bits are tie-prone
    (top-2 logits one bf16 ulp apart or equal), where exact equality would test
    the rounding order rather than the computation."""
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        n = next((j for j, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b), None)
        if n is None:
            assert len(w.token_ids) == len(g.token_ids), (i, w.token_ids, g.token_ids)
            continue
        top = dict(w.logprobs[n].top)
        assert len(top) >= 2, "generate with logprobs >= 2"
        best = max(top.values())
        taken = top.get(g.token_ids[n], float("-inf"))
        assert best - taken <= margin, (
            f"sequence {i} diverges at token {n}: the reference took {w.token_ids[n]}, the run took "
            f"{g.token_ids[n]}, {best - taken:.4f} nats below it (allowed: {margin}); reference top "
            f"{w.logprobs[n].top}"
        )


def logprob_error(path, dtype: str, token_ids: list[int], device: str = "cuda") -> float:
    """The largest |log_softmax| difference between the checkpoint at ``path``
    in ``dtype`` (reference ops) and in float32 over ``token_ids``: the scale
    of ``dtype``'s own rounding, for margins of assert_greedy_equal_up_to_ties."""
    from fastllm import Model

    ids = torch.tensor([token_ids], device=device)
    saved = os.environ.get("FASTLLM_BACKEND")
    os.environ["FASTLLM_BACKEND"] = "torch"
    backend.reset_settings()
    try:
        lp = [torch.log_softmax(Model.from_pretrained(path, device=device, dtype=dt).forward(ids).float(), -1)
              for dt in ("float32", dtype)]
    finally:
        if saved is None:
            os.environ.pop("FASTLLM_BACKEND")
        else:
            os.environ["FASTLLM_BACKEND"] = saved
        backend.reset_settings()
    return (lp[0] - lp[1]).abs().max().item()


@pytest.fixture(scope="session")
def spec_models(tmp_path_factory):
    """A target and a draft for speculative decoding: the same tokenizer,
    different architectures and weights (tiny random checkpoints, CPU)."""
    from checkpoints import make_checkpoint
    from fastllm import Model

    root = tmp_path_factory.mktemp("spec")
    make_checkpoint(root / "target", "llama3")
    make_checkpoint(root / "draft", "qwen2")
    return Model.from_pretrained(root / "target", device="cpu"), Model.from_pretrained(root / "draft", device="cpu")
