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

from fastllm import ops
from fastllm.cache import to_device
from fastllm.config import GenerationConfig


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
    The token ids go to the device through pinned memory (``to_device``): a
    plain ``torch.tensor(..., device=cuda)`` would wait for the device per row."""
    for b, ((seen, counted, banned, grammar), cfg) in enumerate(zip(contexts, configs)):
        if not (seen or counted or banned or cfg.logit_bias or grammar is not None):
            continue  # nothing to apply (most rows): not even a view of the row
        row = logits[b]
        if cfg.repetition_penalty != 1.0 and seen:
            pen = cfg.repetition_penalty
            idx = to_device(sorted(set(seen)), torch.int64, logits.device)
            vals = row.index_select(0, idx)
            row.index_copy_(0, idx, torch.where(vals > 0, vals / pen, vals * pen))
        if (cfg.frequency_penalty or cfg.presence_penalty) and counted:
            ids = to_device(list(counted), torch.int64, logits.device)
            counts = torch.zeros_like(row).index_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
            row.sub_(counts * cfg.frequency_penalty + (counts > 0).to(row.dtype) * cfg.presence_penalty)
        if cfg.logit_bias:
            ids = to_device(list(cfg.logit_bias), torch.int64, logits.device)
            row.index_add_(0, ids, to_device(list(cfg.logit_bias.values()), row.dtype, row.device))
        if banned:
            row.index_fill_(0, to_device(list(banned), torch.int64, logits.device), float("-inf"))
        if grammar is not None:
            row.masked_fill_(~grammar.allowed(logits.device), float("-inf"))


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
    a negative status code; ``check_drawn`` raises for it once read)."""
    apply_logit_processors(logits, contexts, configs)
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
