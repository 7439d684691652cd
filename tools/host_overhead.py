#!/usr/bin/env python3
"""Host (Python) time per decode step, with the device work stubbed out.

    python tools/host_overhead.py [--batch 32 1] [--new-tokens 64]
        [--repeats 5] [--min-time 1] [--cases greedy sampled stop] [--paths generate engine]
        [--profile [N]] [--sort tottime]

On a GPU with CUDA graphs, a decode step of a small model at a big batch is
bound by the host: the Python around each step (scheduling, the graph
runner's host mirrors, sampling parameters, accepting tokens, incremental
detokenization, stop strings, output objects). This script measures that
part alone, on the CPU: the shipped ``shakespeare-15m`` (or ``--model``)
decodes through the graph runner stepping eagerly (``use_graphs=False``, the
same padded static-buffer step the graphs replay), and the work that would
run on the device is replaced by cheap stand-ins:

- the runner's forward pass (``DecodeGraphRunner._forward``) and the
  network's own forward (the prefill) return rows of preallocated, seeded
  random fp32 logits [n, V] (a pool of them, cycled per call, so tokens vary
  from step to step and row to row);
- the sampler op (``fastllm.ops.sample``) returns the argmax of those rows,
  precomputed per pool entry (a tensor it has not seen is argmaxed).

The processors, the sampler's parameter packing, the runner's ``_load`` and
everything in ``generate`` / ``engine`` still run as they are. What is timed:
``Model.generate`` (``--paths generate``; the model's ``GraphedDecoding``
with ``use_graphs=False``) and ``LLMEngine.generate`` (``--paths engine``;
the engine's ``runner`` a ``DecodeGraphRunner`` with ``use_graphs=False``)
of ``--batch`` prompts x ``--new-tokens`` tokens (ignore_eos, so every
request runs to length), per case:

    greedy   temperature 0
    sampled  temperature 0.8, top_p 0.9, seeded (the stub draws the argmax:
             the host work differs only in the parameters packed)
    stop     greedy with two stop strings that never match (checked each step)
    penalty  greedy with a repetition penalty (only when named in ``--cases``):
             the request needs its history on the host, so decoding takes
             the plain loop (no step ahead); its processors run torch ops per row

and reports ms per step (wall time of the call / new tokens; the one prefill
step is included, stubbed like the rest) as the best of ``--repeats`` calls
(more if they take under ``--min-time`` seconds).
Small torch ops that would be kernel launches on a GPU (the runner's copies,
index_select, clamp) run on tiny CPU tensors here, at a comparable host cost;
pinned-memory allocation and CUDA events cost extra on a GPU and are not seen.

``--profile`` runs each case once more under cProfile and prints the top N
functions (``--sort`` tottime or cumtime).

The fastllm imported is this checkout's unless PYTHONPATH is set: to compare
two trees, run this script with ``PYTHONPATH=<other checkout>`` too. On a
shared machine the timings drift by tens of percent from minute to minute;
alternate the two trees over several runs and compare ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

CASES = {  # explicit: a model's generation_config.json may default to sampling
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_p=0.9, top_k=0, seed=1234),
    "stop": dict(temperature=0.0, stop=["\n\nTHE END OF IT", "<<never>>"]),
    "penalty": dict(temperature=0.0, repetition_penalty=1.1),  # not by default: the plain loop, no overlap
}
DEFAULT_CASES = ["greedy", "sampled", "stop"]

PROMPTS = [
    "ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING HENRY:\nOnce more unto the breach, dear friends,", "Enter HAMLET.\n\nHAMLET:\n", "MACBETH:\nIs this",
    "NURSE:\nMadam", "A", "LEAR:\nBlow, winds,", "PROSPERO:\nOur revels now are ended.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shakespeare-15m", help="a model directory or shipped name")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="at least this many timed calls per case")
    p.add_argument("--min-time", type=float, default=1.0, help="and as many more as fit in this many seconds")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--paths", nargs="+", default=["generate", "engine"], choices=["generate", "engine"])
    p.add_argument("--profile", type=int, nargs="?", const=25, default=0, help="print the top N under cProfile")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumtime"])
    return p.parse_args(argv)


@contextmanager
def stubbed_device(vocab: int, rows: int, pool_size: int = 64, seed: int = 0):
    """Replace the forward passes and the sampler by lookups into a pool of
    preallocated random logits (see the module docstring)."""
    from fastllm import ops
    from fastllm.cuda_graph import DecodeGraphRunner
    from fastllm.model import Transformer

    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(rows, vocab, generator=g) for _ in range(pool_size)]
    argmax = {t.data_ptr(): t.argmax(-1) for t in pool}
    calls = [0]

    def logits(n: int) -> torch.Tensor:
        calls[0] += 1
        t = pool[calls[0] % pool_size]
        if n <= rows:
            return t[:n]
        return t.repeat(-(-n // rows), 1)[:n]

    def forward(self, input_ids, positions, kv_caches, meta, logits_indices=None):
        return logits(input_ids.shape[0] if logits_indices is None else logits_indices.shape[0])

    def runner_forward(self, n):
        return logits(n)

    def sample(lg, temperature, top_k, top_p, min_p, seeds, offsets, *, check=True):
        hit = argmax.get(lg.data_ptr())
        if hit is not None and lg.shape[0] <= hit.shape[0]:
            return hit[: lg.shape[0]].clone()  # the caller may own it (as a fresh kernel output)
        return lg.argmax(-1)

    saved = (Transformer.forward, DecodeGraphRunner._forward, ops.sample)
    Transformer.forward, DecodeGraphRunner._forward, ops.sample = forward, runner_forward, sample
    try:
        yield
    finally:
        Transformer.forward, DecodeGraphRunner._forward, ops.sample = saved


def make_generate(model, prompts, params):
    def go():
        return model.generate(prompts, **params)
    return go


def make_engine(model, batch: int):
    from fastllm.cuda_graph import DecodeGraphRunner
    from fastllm.engine import LLMEngine

    engine = LLMEngine(model, max_num_seqs=max(batch, 1), cuda_graphs=False)
    engine.runner = DecodeGraphRunner(model.network, engine.cache, max(batch, 1),
                                      model.config.max_position_embeddings, use_graphs=False)
    return engine


def make_engine_call(engine, prompts, params):
    def go():
        return engine.generate(prompts, **params)
    return go


def time_call(fn, repeats: int, min_time: float) -> float:
    """The fastest of at least ``repeats`` calls, and of as many more as fit in ``min_time`` seconds."""
    best, start, i = float("inf"), time.perf_counter(), 0
    while i < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


def profile(fn, top: int, sort: str) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "PYTHONPATH" not in os.environ:  # this checkout, not an installed fastllm
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastllm import Model
    from fastllm.cuda_graph import GraphedDecoding

    torch.set_num_threads(1)
    model = Model.from_pretrained(args.model, device="cpu")
    model._graphs = GraphedDecoding(model.network, use_graphs=False)
    vocab = model.config.vocab_size
    print(f"model {args.model}: vocab {vocab}; {args.new_tokens} new tokens; best of {args.repeats}+ calls")
    print(f"{'path':<9} {'case':<8} {'batch':>5} {'ms/step':>8} {'us/token':>9}")
    gc.collect()
    gc.freeze()  # the model's objects: later collections need not walk them (steadier timings)
    with stubbed_device(vocab, max(args.batch)), torch.inference_mode():
        for path in args.paths:
            for batch in args.batch:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
                engine = make_engine(model, batch) if path == "engine" else None
                for case in args.cases:
                    params = dict(CASES[case], max_new_tokens=args.new_tokens, ignore_eos=True)
                    if engine is None:
                        fn = make_generate(model, prompts, params)
                    else:
                        fn = make_engine_call(engine, prompts, params)
                    fn()  # warm up
                    t = time_call(fn, args.repeats, args.min_time)
                    ms = 1e3 * t / args.new_tokens
                    print(f"{path:<9} {case:<8} {batch:>5} {ms:>8.3f} {1e3 * ms / batch:>9.1f}", flush=True)
                    if args.profile:
                        print(profile(fn, args.profile, args.sort))
    return 0


if __name__ == "__main__":
    sys.exit(main())
