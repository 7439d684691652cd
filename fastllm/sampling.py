"""From a step's logits to the next token of each sequence.

The logit processors (repetition, frequency and presence penalties, which
need a sequence's history, logit bias and min_new_tokens) run here; the draw
itself (temperature, top-k, top-p, min-p, seeded) is the ``sample`` op of the
op table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastllm import backend, ops
from fastllm.cache import to_device
from fastllm.config import GenerationConfig
from fastllm.ops.cuda_sample import ARGMAX_KERNEL


class LogitContext(NamedTuple):
    """A row's history for the logit processors (``Request.logit_context``)."""

    seen: Sequence[int]  # prompt + output: the repetition penalty's tokens
    counted: Sequence[int]  # output: the frequency / presence penalties' counts
    banned: Sequence[int] = ()  # no probability (min_new_tokens not reached: EOS, stop ids)
    grammar: object | None = None  # structured output: a GrammarMatcher, whose disallowed tokens get -inf


def apply_logit_processors(logits: Tensor, contexts: list[LogitContext], configs: list[GenerationConfig]) -> None:
    """In place, per row b with ``contexts[b]``: the repetition penalty over the
    distinct ``seen`` tokens (prompt and output), ``logit / p`` if the logit is
    positive else ``logit * p`` (the CTRL rule, as transformers); then
    ``logit -= frequency_penalty * c + presence_penalty * (c > 0)`` with c each
    token's count in ``counted`` (the output; OpenAI's rule, as vLLM); then
    ``logit_bias`` is added; last, ``banned`` tokens and those the row's
    grammar (structured output) does not allow get -inf. logits: [B, V] fp32.
    Each processor runs once over every row that uses it (a few launches per
    step, not a few per row), and the token ids go to the device through
    pinned memory (``to_device``): ``torch.tensor(..., device=cuda)`` would
    wait for the device."""
    dev, dtype = logits.device, logits.dtype
    rep_r: list[int] = []
    rep_t: list[int] = []
    rep_p: list[float] = []
    freq_rows: list[int] = []
    bias_r: list[int] = []
    bias_t: list[int] = []
    bias_v: list[float] = []
    ban_r: list[int] = []
    ban_t: list[int] = []
    grammars: list[tuple[int, object]] = []
    for b, ((seen, counted, banned, grammar), cfg) in enumerate(zip(contexts, configs)):
        if cfg.repetition_penalty != 1.0 and seen:
            toks = sorted(set(seen))
            rep_r += [b] * len(toks)
            rep_t += toks
            rep_p += [cfg.repetition_penalty] * len(toks)
        if (cfg.frequency_penalty or cfg.presence_penalty) and counted:
            freq_rows.append(b)
        if cfg.logit_bias:
            bias_r += [b] * len(cfg.logit_bias)
            bias_t += list(cfg.logit_bias)
            bias_v += list(cfg.logit_bias.values())
        if banned:
            ban_r += [b] * len(banned)
            ban_t += list(banned)
        if grammar is not None:
            grammars.append((b, grammar))
    if rep_r:
        at = (to_device(rep_r, torch.int64, dev), to_device(rep_t, torch.int64, dev))
        pen = to_device(rep_p, dtype, dev)
        vals = logits[at]
        logits.index_put_(at, torch.where(vals > 0, vals / pen, vals * pen))
    if freq_rows:
        rows = to_device(freq_rows, torch.int64, dev)
        counted = [list(contexts[b].counted) for b in freq_rows]
        at = (to_device([i for i, c in enumerate(counted) for _ in c], torch.int64, dev),
              to_device([t for c in counted for t in c], torch.int64, dev))
        counts = torch.zeros(len(freq_rows), logits.shape[-1], dtype=dtype, device=dev)
        counts.index_put_(at, torch.ones(at[0].shape, dtype=dtype, device=dev), accumulate=True)
        fp = to_device([configs[b].frequency_penalty for b in freq_rows], dtype, dev)[:, None]
        pp = to_device([configs[b].presence_penalty for b in freq_rows], dtype, dev)[:, None]
        sel = logits.index_select(0, rows)
        logits.index_copy_(0, rows, sel.sub_(counts * fp + (counts > 0).to(dtype) * pp))
    if bias_r:
        at = (to_device(bias_r, torch.int64, dev), to_device(bias_t, torch.int64, dev))
        logits.index_put_(at, to_device(bias_v, dtype, dev), accumulate=True)
    if ban_r:
        at = (to_device(ban_r, torch.int64, dev), to_device(ban_t, torch.int64, dev))
        logits.index_put_(at, torch.full((), float("-inf"), dtype=dtype, device=dev))  # a fill: no copy
    for b, grammar in grammars:
        logits[b].masked_fill_(~grammar.allowed(dev), float("-inf"))


def sample_next(
    logits: Tensor,
    configs: list[GenerationConfig],
    contexts: list[LogitContext],
    seeds: list[int],
    steps: list[int],
    *,
    check: bool = True,
) -> Tensor:
    """Next token per row. logits: [B, V] fp32 (modified in place by the processors);
    seeds/steps: each row's seed and how many tokens it has drawn so far
    (the pair fixes the row's random number); contexts: each row's
    ``Request.logit_context()``. Returns [B] int64. ``check=False``: on a GPU,
    do not wait for the device to validate the rows (a bad row comes back as
    a negative status code; ``check_drawn`` raises for it once read).
    A step whose rows are all greedy runs ``cuda_sample.argmax`` when
    ``greedy_on_device`` says so (the same tokens as ``ops.sample``)."""
    apply_logit_processors(logits, contexts, configs)
    if greedy_on_device(logits, configs):
        from fastllm.ops import cuda_sample

        return cuda_sample.argmax(logits, check=check)
    temperature, top_k, top_p, min_p, seeds_t, offsets_t = step_inputs(configs, seeds, steps, logits.device)
    return ops.sample(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeds=seeds_t,
        offsets=offsets_t,
        check=check,
    )


def greedy_on_device(logits: Tensor, configs: list[GenerationConfig]) -> bool:
    """Whether a step's draw can be the plain argmax kernel: every row greedy
    (temperature 0), the logits on a GPU and the unverified ``sample_argmax``
    kernel enabled (FASTLLM_KERNELS). It reads no other parameter, as the
    reference does not for greedy rows (GenerationConfig.validate keeps them
    in range anyway)."""
    return (bool(configs) and logits.is_cuda and all(c.temperature == 0 for c in configs)
            and backend.kernel_enabled(ARGMAX_KERNEL))


def check_drawn(tokens: list[int]) -> None:
    """Raise ``sample``'s ValueError (NaN logits, every logit -inf, parameters
    out of range) for the rows of a ``sample_next(..., check=False)`` result,
    read on the host, that hold a negative status code instead of a token."""
    if tokens and min(tokens) < 0:
        from fastllm.ops.cuda_sample import raise_for_status

        raise_for_status(tokens)


def step_inputs(
    configs: list[GenerationConfig], seeds: Sequence[int], steps: Sequence[int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sampler's per-row inputs on ``device``: (temperature, top_k, top_p,
    min_p, seeds, offsets), fp32 / int32 / fp32 / fp32 / int64 / int64, each
    [B], packed into one host buffer so that a step makes one host-to-device
    copy for all of them (each copy costs host time between two decode steps)."""
    b = len(configs)
    ints = np.array(list(seeds) + list(steps), dtype=np.int64)
    floats = np.array([c.temperature for c in configs] + [c.top_p for c in configs] + [c.min_p for c in configs],
                      dtype=np.float32)
    top_k = np.array([c.top_k for c in configs], dtype=np.int32)
    blob = np.concatenate([ints.view(np.uint8), floats.view(np.uint8), top_k.view(np.uint8)])  # 8-byte parts first
    host = torch.from_numpy(blob)
    buf = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    i, f = 16 * b, 28 * b
    return (buf[i : i + 4 * b].view(torch.float32), buf[f:].view(torch.int32),
            buf[i + 4 * b : i + 8 * b].view(torch.float32), buf[i + 8 * b : f].view(torch.float32),
            buf[: 8 * b].view(torch.int64), buf[8 * b : i].view(torch.int64))


def row_parameters(configs: list[GenerationConfig], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (temperature, top_k, top_p, min_p) on ``device``, each [B]:
    fp32, int32, fp32, fp32 (``step_inputs`` without the seeds)."""
    zeros = [0] * len(configs)
    return step_inputs(configs, zeros, zeros, device)[:4]


def derive_seed(seed: int | None, index: int) -> int:
    """Row ``index``'s seed for a request seeded with ``seed`` (None: random
    from torch's global RNG, so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return (seed * 6364136223846793005 + index * 1442695040888963407) % (2**62)
