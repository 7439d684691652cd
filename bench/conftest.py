"""Timing helpers for the GPU benchmarks.

Each kernel benchmark reports three times per call, all from CUDA events:

- ``us_per_call`` (cold): each call alone, replayed from a CUDA graph right after
  a 256 MB read that evicts the call's inputs from L2 (50 MB on an H100, 60 MB on an H200) and
  keeps the GPU busy while the host queues the call (as ``triton.testing.do_bench``
  flushes L2). This is what a call costs inside a real decode step, where the
  weights and the KV cache of one layer are not in L2 and launches come from a
  graph; it excludes the Python wrapper.
- ``us_hot``: ``inner`` back-to-back calls in one graph, inputs warm in L2.
- ``us_eager``: ``inner`` back-to-back Python calls (wrapper and launch overhead
  included: what an eager loop without graphs pays; host-bound below ~15 us).

A callable that cannot be captured in a graph (say, a torch op that syncs) is
timed by plain calls instead, and ``graph=False`` goes in extra_info.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

FLUSH_BYTES = 256 << 20


def cuda_time_us(fn: Callable[[], object], inner: int = 100) -> float:
    """Mean microseconds per call of ``fn`` over ``inner`` back-to-back launches."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / inner


@functools.cache
def _flush_buffer() -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.ones(FLUSH_BYTES // 4, device="cuda")
    return buf, torch.empty((), device="cuda")


def capture(fn: Callable[[], object], reps: int = 1) -> Callable[[], object] | None:
    """A graph of ``reps`` calls of ``fn`` (its ``replay``), or None if ``fn`` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up and lazy initialisation outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except Exception:  # noqa: BLE001 - any capture failure means: time it eagerly
        torch.cuda.synchronize()
        return None
    return graph.replay


def cold_times_us(call: Callable[[], object], n: int) -> list[float]:
    """``n`` timings of one ``call`` each, every one right after an L2-evicting read."""
    buf, sink = _flush_buffer()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        torch.sum(buf, dim=0, out=sink)  # reads (no dirty lines to write back during the call)
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1000.0 for start, end in events]


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


@pytest.fixture
def gpu_bench(benchmark):
    """Run ``fn`` under pytest-benchmark; returns the cold median microseconds per
    call (module docstring) and records it, ``us_hot`` and ``us_eager`` in extra_info."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def run(fn: Callable[[], object], inner: int = 100, rounds: int = 20) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        one, many = capture(fn), capture(fn, inner)
        cold: list[float] = []
        benchmark.pedantic(lambda: cold.extend(cold_times_us(one or fn, inner)), rounds=rounds, iterations=1)
        if many:  # one replay runs `inner` calls
            hot = median([cuda_time_us(many, 1) / inner for _ in range(rounds)])
        else:
            hot = median([cuda_time_us(fn, inner) for _ in range(rounds)])
        eager = median([cuda_time_us(fn, inner) for _ in range(max(3, rounds // 4))])
        us = median(cold)
        benchmark.extra_info.update(us_per_call=us, us_hot=hot, us_eager=eager, graph=one is not None)
        return us

    return run
