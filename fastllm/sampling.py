"""From a step's logits to the next token of each sequence.

The logits processors that need a sequence's history (repetition penalty) run
here; the draw itself (temperature, top-k, top-p, min-p, seeded) is the
``sample`` op of the op table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastllm import ops
from fastllm.cache import to_device
from fastllm.config import GenerationConfig


def apply_repetition_penalty(logits: Tensor, histories: list[list[int]], penalties: list[float]) -> None:
    """In place, per row b: for every distinct token in ``histories[b]``,
    ``logit / penalty`` if the logit is positive else ``logit * penalty``
    (the CTRL rule, as in transformers). logits: [B, V] fp32."""
    for b, (hist, pen) in enumerate(zip(histories, penalties)):
        if pen == 1.0 or not hist:
            continue
        idx = torch.tensor(sorted(set(hist)), dtype=torch.int64, device=logits.device)
        row = logits[b]
        vals = row.index_select(0, idx)
        row.index_copy_(0, idx, torch.where(vals > 0, vals / pen, vals * pen))


def sample_next(
    logits: Tensor,
    configs: list[GenerationConfig],
    histories: list[list[int]],
    seeds: list[int],
    steps: list[int],
) -> Tensor:
    """Next token per row. logits: [B, V] fp32 (modified in place by penalties);
    seeds/steps: each row's seed and how many tokens it has drawn so far
    (the pair fixes the row's random number). Returns [B] int64."""
    apply_repetition_penalty(logits, histories, [c.repetition_penalty for c in configs])
    b, dev = len(configs), logits.device
    temperature, top_k, top_p, min_p = row_parameters(configs, dev)
    seeds_offsets = to_device(list(seeds) + list(steps), torch.int64, dev)
    return ops.sample(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeds=seeds_offsets[:b],
        offsets=seeds_offsets[b:],
    )


def row_parameters(configs: list[GenerationConfig], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (temperature, top_k, top_p, min_p) on ``device``, each [B]:
    fp32, int32, fp32, fp32, in one host-to-device copy per dtype."""
    b = len(configs)
    floats = to_device([c.temperature for c in configs] + [c.top_p for c in configs] + [c.min_p for c in configs],
                       torch.float32, device)
    top_k = to_device([c.top_k for c in configs], torch.int32, device)
    return floats[:b], top_k, floats[b : 2 * b], floats[2 * b :]


def derive_seed(seed: int | None, index: int) -> int:
    """Row ``index``'s seed for a request seeded with ``seed`` (None: random
    from torch's global RNG, so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return (seed * 6364136223846793005 + index * 1442695040888963407) % (2**62)
