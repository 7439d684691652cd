"""Log-probabilities of generated tokens: the model's raw distribution.

For a row that asked for ``k`` alternatives (``GenerationConfig.logprobs``)::

    lp = log_softmax(logits, dim=-1)        # [V] fp32, before any logits processor
    logprob = lp[token]
    rank = 1 + (lp > logprob).sum()
    top = the k pairs (id, lp[id]) with the largest lp, descending, ties by lower id

This is vLLM's default ("raw") mode: the penalties, temperature, top-k,
top-p and min-p change which token is drawn, not the reported numbers.

Two calls per step: ``raw_logprobs`` before sampling (the logits processors
modify logits in place), ``token_logprobs`` once the tokens are known. Rows
that did not ask cost nothing; the rows that did go through one batched
log_softmax, one gather and one top-k.

Prompt logprobs (``GenerationConfig.prompt_logprobs``) are the same numbers
for the prompt's own tokens: a pass over prompt positions ``j`` keeps their
hidden states (``prompt_rows``), and ``score_prompts`` turns the hidden state
at ``j`` into the TokenLogprob of prompt token ``j + 1``, a bounded number of
rows of logits at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastllm.cache import to_device
from fastllm.config import TokenLogprob

PROMPT_SCORE_FLOATS = 1 << 26  # fp32 logits one prompt-scoring chunk holds (256 MiB)


@dataclass
class StepLogprobs:
    """The log-probabilities of a step's rows that asked for them.

    rows: batch rows that asked; ks: their number of alternatives;
    lp: [len(rows), V] fp32 log_softmax of those rows' logits.
    """

    rows: list[int]
    ks: list[int]
    lp: Tensor


def raw_logprobs(logits: Tensor, ks: Sequence[int | None]) -> StepLogprobs | None:
    """log_softmax of the rows ``b`` with ``ks[b] is not None`` (None when no
    row asked: no tensor work at all). logits: [B, V]; read, not modified."""
    rows = [b for b, k in enumerate(ks) if k is not None]
    if not rows:
        return None
    if len(rows) == logits.shape[0]:
        picked = logits
    else:
        picked = logits.index_select(0, to_device(rows, torch.int64, logits.device))
    lp = torch.log_softmax(picked.float(), dim=-1)  # [R, V]; a new tensor, safe from in-place penalties
    return StepLogprobs(rows, [int(ks[b]) for b in rows], lp)


def token_logprobs(step: StepLogprobs | None, tokens: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Per batch row, the TokenLogprob of ``tokens[b]`` (None where the row did
    not ask or ``tokens[b]`` is None). tokens: one entry per batch row."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if step is None:
        return out
    keep = [i for i, b in enumerate(step.rows) if tokens[b] is not None]
    if not keep:
        return out
    lp = step.lp if len(keep) == len(step.rows) else step.lp[keep]  # [R', V]
    ks = [min(step.ks[i], lp.shape[-1]) for i in keep]
    rows = [step.rows[i] for i in keep]
    picked = to_device([tokens[b] for b in rows], torch.int64, lp.device)
    chosen = lp.gather(1, picked[:, None])  # [R', 1]
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    tops = _top_alternatives(lp, ks)
    for b, token_lp, top, rank in zip(rows, chosen[:, 0].tolist(), tops, ranks):
        out[b] = TokenLogprob(int(tokens[b]), token_lp, top, int(rank))
    return out


def _top_alternatives(lp: Tensor, ks: list[int]) -> list[list[tuple[int, float]]]:
    """Row r's ks[r] largest (id, logprob), descending, ties by lower id. One
    top-k over the largest k; a row whose k-th value is tied with entries
    outside its top-k (rare) is resolved exactly from all entries >= it."""
    kmax = max(ks)
    if kmax == 0:
        return [[] for _ in ks]
    vals, ids = lp.topk(kmax, dim=-1)  # [R, kmax]; order among equal values unspecified
    k_idx = to_device([max(k, 1) - 1 for k in ks], torch.int64, lp.device)
    threshold = vals.gather(1, k_idx[:, None])  # [R, 1]: each row's k-th largest value
    at_least = (lp >= threshold).sum(dim=-1).tolist()
    vals_h, ids_h, out = vals.tolist(), ids.tolist(), []
    for r, k in enumerate(ks):
        if k == 0:
            out.append([])
            continue
        if at_least[r] == k:  # exactly k entries reach the k-th value: all are in topk(kmax)
            pairs = [p for p in zip(ids_h[r], vals_h[r]) if p[1] >= vals_h[r][k - 1]]
        else:  # ties across the boundary: take every candidate, lowest ids win
            cand = (lp[r] >= threshold[r]).nonzero()[:, 0]
            pairs = list(zip(cand.tolist(), lp[r, cand].tolist()))
        pairs.sort(key=lambda p: (-p[1], p[0]))
        out.append([(int(i), float(v)) for i, v in pairs[:k]])
    return out


@dataclass
class PromptRows:
    """Rows of a packed pass that score prompt tokens: the hidden state of
    packed token ``rows[i]`` predicts ``targets[i]``, a prompt token of
    ``owners[i]`` (a generate.Request)."""

    rows: list[int]
    owners: list[Any]
    targets: list[int]


def prompt_rows(scored: Sequence[Any | None], starts: Sequence[int], counts: Sequence[int]) -> PromptRows | None:
    """The rows of a pass in which sequence ``i`` adds ``counts[i]`` tokens at
    positions from ``starts[i]`` that score prompt tokens of ``scored[i]`` (a
    Request, or None); None when there are none."""
    rows, owners, targets, offset = [], [], [], 0
    for req, start, n in zip(scored, starts, counts):
        if req is not None:
            for pos in req.prompt_positions(start, n):
                rows.append(offset + pos - start)
                owners.append(req)
                targets.append(req.prompt_ids[pos + 1])
        offset += n
    return PromptRows(rows, owners, targets) if rows else None


def score_prompts(logits_of: Callable[[Tensor], Tensor], hidden: Tensor, pr: PromptRows, vocab_size: int) -> None:
    """Append each target's TokenLogprob to its owner's ``prompt_scores``, in
    row order. hidden: [len(pr.rows), H]; ``logits_of`` maps hidden states to
    fp32 logits (the LM head), applied to chunks of at most
    PROMPT_SCORE_FLOATS logits."""
    chunk = max(1, PROMPT_SCORE_FLOATS // vocab_size)
    for a in range(0, len(pr.rows), chunk):
        owners, targets = pr.owners[a : a + chunk], pr.targets[a : a + chunk]
        lp = torch.log_softmax(logits_of(hidden[a : a + chunk]), dim=-1)  # [R, V]
        step = StepLogprobs(list(range(len(owners))), [o.config.prompt_logprobs for o in owners], lp)
        for owner, scored in zip(owners, token_logprobs(step, targets)):
            owner.prompt_scores.append(scored)
