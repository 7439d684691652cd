"""Timing helpers for the GPU benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def cuda_time_us(fn: Callable[[], object], inner: int = 100) -> float:
    """Mean microseconds per call of ``fn`` over ``inner`` back-to-back launches,
    timed with CUDA events (so microsecond kernels are not drowned by Python)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / inner


@pytest.fixture
def gpu_bench(benchmark):
    """Run ``fn`` under pytest-benchmark with CUDA-event timing per round;
    returns the median microseconds per call and records it in extra_info."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def run(fn: Callable[[], object], inner: int = 100, rounds: int = 20) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        samples: list[float] = []
        benchmark.pedantic(lambda: samples.append(cuda_time_us(fn, inner)), rounds=rounds, iterations=1)
        samples.sort()
        us = samples[len(samples) // 2]
        benchmark.extra_info["us_per_call"] = us
        return us

    return run
