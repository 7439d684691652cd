"""Token sampling (temperature + top-k + top-p) beside torch's sort-based sampler.

V = 128256 (Llama 3), fp32 logits, batch 1 and 32 (and 256). Rows: ``fastllm``
(the verified kernel, ``_variant=0``), ``fastllm_v1`` (variant 1: the same
draws, rescheduled), ``fastllm_argmax`` (the argmax kernel, greedy only) and
the torch peers (sort-based sampling; torch.argmax for greedy).
    pytest bench/bench_sample.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastllm import backend

VOCAB = 128256


def torch_sort_sample(logits, temperature, top_k, top_p):
    """The usual eager recipe (as in transformers' warpers): scale, top-k by
    threshold, sort + cumsum for top-p, softmax, multinomial."""
    x = logits / temperature[:, None]
    kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, idx = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x.softmax(-1).cumsum(-1)
    remove = cum <= 1 - top_p[:, None]
    remove[:, -1] = False
    x = x.scatter(1, idx, sorted_x.masked_fill(remove, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1)[:, 0]


@pytest.mark.parametrize("impl", ["fastllm", "fastllm_v1", "fastllm_argmax", "torch_sort"])
@pytest.mark.parametrize("batch", [1, 32, 256])
@pytest.mark.parametrize("mode", ["top_k50_top_p0.9", "top_p0.9", "greedy"])
def test_sample(gpu_bench, benchmark, batch, impl, mode):
    logits = torch.randn(batch, VOCAB, device="cuda") * 3
    temperature = torch.full((batch,), 0.0 if mode == "greedy" else 0.8, device="cuda")
    top_k = torch.full((batch,), 50 if "top_k" in mode else 0, dtype=torch.int32, device="cuda")
    top_p = torch.full((batch,), 0.9 if "top_p" in mode else 1.0, device="cuda")
    min_p = torch.zeros(batch, device="cuda")
    if impl == "fastllm_argmax" and mode != "greedy":
        pytest.skip("the argmax kernel draws greedy rows only")
    if impl.startswith("fastllm") and not backend.HAS_C:
        pytest.skip("extension not built")
    if impl == "fastllm_argmax":
        from fastllm.ops import cuda_sample

        def fn():
            return cuda_sample.argmax(logits, check=False)
    elif impl.startswith("fastllm"):
        from fastllm.ops import cuda

        seeds = torch.arange(batch, device="cuda")
        offsets = torch.zeros(batch, dtype=torch.int64, device="cuda")
        variant = 1 if impl == "fastllm_v1" else 0  # explicit: the default follows FASTLLM_KERNELS

        def fn():
            return cuda.sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, check=False,
                               _variant=variant)
    elif mode == "greedy":
        def fn():
            return torch.argmax(logits, dim=-1)
    else:
        k = 50 if "top_k" in mode else VOCAB

        def fn():
            return torch_sort_sample(logits, temperature, k, top_p)

    us = gpu_bench(fn, inner=20)
    gbps = batch * VOCAB * 4 / (us * 1e-6) / 1e9
    benchmark.extra_info.update(op="sample", impl=impl, batch=batch, mode=mode, GBps=gbps)
    print(f"\nsample {impl:14s} {mode:18s} B={batch:<4d} V={VOCAB}: {us:8.2f} us  {gbps:7.1f} GB/s (logits read)")
