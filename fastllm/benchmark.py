"""End-to-end generation speed on synthetic prompts (``fastllm bench``).

Two measurements, both on prompts of random token ids (seeded) that ignore EOS,
so every sequence generates exactly ``output_len`` tokens:

- ``measure_latency``: one batch of ``batch_size`` prompts through the loop of
  ``Model.generate`` (KV cache, CUDA graphs or a draft model as the model is
  set up), ``iters`` times after ``warmup`` runs (and up to
  ``MAX_EXTRA_WARMUP`` more while the last one captured a CUDA graph: a
  capture empties the allocator caches). Per run: the time to the
  first token (the batch's prefill and first sampled token), the mean
  inter-token latency of the decode steps, the end-to-end time.
- ``measure_throughput``: ``num_prompts`` requests queued at once into an
  ``LLMEngine`` (continuous batching, chunked prefill); output tokens per
  second and requests per second until the last one finishes, after the
  engine's graphs of every batch size up to the batch are captured and a
  batch of prompts of the timed length went through it.

Times are wall clock around the steps; each step ends with the sampled ids on
the host (a device synchronisation), so the GPU work is inside them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from fastllm import cuda_graph
from fastllm.cache import device_scope

MAX_EXTRA_WARMUP = 3  # warm-up runs added after runs that captured CUDA graphs


def synthetic_prompts(vocab_size: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids drawn uniformly from the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, length), generator=g).tolist()


def _check_sizes(model: Any, input_len: int, output_len: int, **counts: int) -> None:
    for name, v in {"input_len": input_len, "output_len": output_len, **counts}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    ctx = model.config.max_position_embeddings
    if input_len + output_len > ctx:
        raise ValueError(f"input_len + output_len = {input_len + output_len} exceeds the model's {ctx}-token context")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _latency_run(model: Any, prompts: list[list[int]], cfg: Any, draft_model: Any,
                 k: int) -> tuple[list[Any], float, float, float, int]:
    """One run of ``measure_latency``: its requests, the clock at its start,
    at its first tokens and at its end, and how many tokens each request had
    by the first clock (1, or with a draft a whole first round's)."""
    requests = model._requests(prompts, cfg)
    start = time.perf_counter()
    first, at_first = None, 0
    for _ in model._run(requests, draft_model, k):
        if first is None:
            first, at_first = time.perf_counter(), min(len(r.output_ids) for r in requests)
    return requests, start, first, time.perf_counter(), at_first


def measure_latency(
    model: Any,
    batch_size: int = 1,
    input_len: int = 128,
    output_len: int = 128,
    iters: int = 5,
    warmup: int = 1,
    prompt_seed: int = 0,
    draft_model: Any = None,
    num_speculative_tokens: int = 4,
    progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Latency of one batch (see the module docstring). ``params``: sampling
    parameters (default greedy); prompt_seed: seeds the prompts. Returns medians over the runs: ``ttft_ms``,
    ``itl_ms`` (the time after the first tokens over the tokens that came
    after them: with a draft, a first round yields several at once; None when
    none came after), ``e2e_s``, ``prefill_tok_s``
    (batch x input_len / ttft), ``decode_tok_s`` (batch x decode tokens / decode
    time), with a draft model ``acceptance_rate``, plus the per-run lists and
    the setup."""
    _check_sizes(model, input_len, output_len, batch_size=batch_size, iters=iters)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    prompts = synthetic_prompts(model.config.vocab_size, batch_size, input_len, prompt_seed)
    cfg = model._config(None, {"temperature": 0.0, **params, "max_new_tokens": output_len, "ignore_eos": True})
    model._check_draft(draft_model, num_speculative_tokens)
    ttft, itl, e2e = [], [], []
    with tqdm(total=warmup + iters, desc="bench", unit="run", disable=not progress) as bar:
        warmed, extra = 0, 0
        while warmed < warmup + extra:
            captures = cuda_graph.num_captures()
            _latency_run(model, prompts, cfg, draft_model, num_speculative_tokens)
            warmed += 1
            # The last warm-up run captured a CUDA graph, which emptied the allocator caches
            # (the next run would allocate from the driver again, in its timed region): one more.
            if warmed == warmup + extra and cuda_graph.num_captures() != captures and extra < MAX_EXTRA_WARMUP:
                extra += 1
                bar.total += 1
            bar.update(1)
        for _ in range(iters):
            requests, start, first, end, at_first = _latency_run(model, prompts, cfg, draft_model,
                                                                 num_speculative_tokens)
            bar.update(1)
            generated = min(len(r.output_ids) for r in requests)
            ttft.append((first - start) * 1e3)
            e2e.append(end - start)
            if generated > at_first:  # the tokens that came after the first clock
                itl.append((end - first) * 1e3 / (generated - at_first))
    t, d = _median(ttft), _median(itl)
    spec = {}
    if draft_model is not None:  # of the last run
        proposed = sum(r.spec_proposed for r in requests)
        spec = {"num_speculative_tokens": num_speculative_tokens,
                "acceptance_rate": sum(r.spec_accepted for r in requests) / max(proposed, 1)}
    return {
        "mode": "latency",
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "iters": iters,
        "warmup_runs": warmed,
        "ttft_ms": t,
        "itl_ms": d,
        "e2e_s": _median(e2e),
        "prefill_tok_s": batch_size * input_len / (t / 1e3),
        "decode_tok_s": batch_size * 1e3 / d if d else None,
        **spec,
        "runs": {"ttft_ms": ttft, "itl_ms": itl, "e2e_s": e2e},
    }


def measure_throughput(
    model: Any,
    num_prompts: int = 64,
    input_len: int = 128,
    output_len: int = 128,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 4096,
    prompt_seed: int = 0,
    draft_model: Any = None,
    num_speculative_tokens: int = 4,
    progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Throughput of ``num_prompts`` requests through an LLMEngine (see the
    module docstring), speculating with ``draft_model`` when given. Returns
    ``output_tok_s``, ``total_tok_s`` (prompt and output tokens),
    ``requests_s``, ``elapsed_s``, with a draft model ``acceptance_rate``, and
    the setup."""
    from fastllm.engine import LLMEngine

    _check_sizes(model, input_len, output_len, num_prompts=num_prompts)
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       enable_prefix_caching=False,  # random prompts share nothing; keep the cache out of it
                       draft_model=draft_model, num_speculative_tokens=num_speculative_tokens)
    sampling = {"temperature": 0.0, **params, "max_new_tokens": output_len, "ignore_eos": True}
    _warm_up_engine(engine, min(num_prompts, max_num_seqs), input_len, min(output_len, 2), prompt_seed + 1, sampling)
    for i, p in enumerate(synthetic_prompts(model.config.vocab_size, num_prompts, input_len, prompt_seed)):
        engine.add_request(p, seed_index=i, **sampling)
    tokens = proposed = accepted = 0
    start = time.perf_counter()
    with tqdm(total=num_prompts, desc="bench", unit="req", disable=not progress) as bar:
        while engine.has_unfinished():
            outs = engine.step()
            tokens += sum(len(o.token_ids) for o in outs)
            done = [o.output for o in outs if o.finished]
            proposed += sum(o.num_draft_tokens for o in done)
            accepted += sum(o.num_accepted_draft_tokens for o in done)
            bar.update(len(done))
    elapsed = time.perf_counter() - start
    spec = {}
    if draft_model is not None:
        spec = {"num_speculative_tokens": num_speculative_tokens, "acceptance_rate": accepted / max(proposed, 1)}
    return {
        "mode": "throughput",
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tok_s": tokens / elapsed,
        "total_tok_s": (tokens + num_prompts * input_len) / elapsed,
        "requests_s": num_prompts / elapsed,
        "preemptions": engine.num_preemptions,
        **spec,
    }


def _warm_up_engine(engine: Any, batch: int, input_len: int, output_len: int, seed: int,
                    sampling: dict[str, Any]) -> None:
    """Before timing: capture the CUDA graphs of every batch size up to
    ``batch`` in each of the engine's runners (else a step of a new size
    captures inside the timed loop, synchronising and emptying the allocator
    caches), then run ``batch`` prompts of the timed length through the
    engine for ``output_len`` tokens (the captures emptied the caches: the
    prefill's and the steps' buffers are allocated here, not when timed)."""
    spec = engine.spec_runners
    with torch.inference_mode(), device_scope(engine.cache.device):  # as the engine's steps run
        for runner in (engine.runner, spec.draft, spec.draft_pair, spec.verify):
            if runner is not None:
                runner.capture(batch)
    prompts = synthetic_prompts(engine.model.config.vocab_size, batch, input_len, seed)
    engine.generate(prompts, **{**sampling, "max_new_tokens": output_len})


def format_result(result: dict[str, Any]) -> str:
    """A few human-readable lines of a measure_* result."""
    spec = []
    if "acceptance_rate" in result:
        spec = [f"draft acceptance     {result['acceptance_rate']:10.1%}    "
                f"(up to {result['num_speculative_tokens']} proposed per round)"]
    if result["mode"] == "latency":
        lines = [
            f"time to first token  {result['ttft_ms']:10.2f} ms   (prefill {result['prefill_tok_s']:,.0f} tok/s)",
        ]
        if result["itl_ms"] is not None:
            per_seq = result["decode_tok_s"] / result["batch_size"]
            lines.append(f"inter-token latency  {result['itl_ms']:10.2f} ms   (decode {per_seq:,.1f} tok/s per "
                         f"sequence, {result['decode_tok_s']:,.1f} tok/s in all)")
        lines.append(f"end to end           {result['e2e_s']:10.3f} s")
        return "\n".join(lines + spec)
    return "\n".join([
        f"output tokens        {result['output_tok_s']:10,.1f} tok/s  ({result['output_tokens']} in "
        f"{result['elapsed_s']:.2f} s)",
        f"prompt + output      {result['total_tok_s']:10,.1f} tok/s",
        f"requests             {result['requests_s']:10.2f} req/s  ({result['preemptions']} preemptions)",
        *spec,
    ])
