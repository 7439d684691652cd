"""Speculative decoding: a small draft model proposes tokens, the target model
checks them all in one forward pass.

One round, per sequence, with ``k`` proposals:

1. The draft runs ``k`` steps from the committed tokens and samples
   ``d_1..d_k`` from its distributions ``q_1..q_k``.
2. The target runs once on the tokens it has not cached yet followed by
   ``d_1..d_k`` and gives ``p_1..p_{k+1}`` (``p_j`` predicts the position of
   ``d_j``; ``p_{k+1}`` the one after ``d_k``).
3. ``d_j`` is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``, in
   order. At the first rejection one token is drawn from the residual
   ``max(p_j - q_j, 0)`` (renormalised) and the round ends; when all ``k`` are
   accepted a bonus token is drawn from ``p_{k+1}``.

The committed tokens then follow the target's distribution exactly (Leviathan
et al., 2023; Chen et al., 2023), so every round commits between 1 and k + 1
tokens for one target pass. ``p`` and ``q`` are the distributions after the
penalties (repetition, frequency, presence), temperature, top-k, top-p and min-p
(``reference.sampling_mask``), so each sampling parameter keeps its meaning.
Greedy rows accept ``d_j`` iff it is the target's argmax: the output is the
target's greedy output token for token.

The random numbers are Philox draws from the request's seed and a per-request
counter, so a seeded request repeats exactly (its tokens differ from the same
seed without a draft: the draws are used differently). Both KV caches roll back
to the accepted prefix by lowering ``num_cached``; the stale slots are
overwritten by the next round. This path samples with torch ops, not the
``sample`` kernel, because acceptance needs the whole distributions.
Logprobs (``GenerationConfig.logprobs``) are read from the verify pass: the
target's raw log_softmax at the position of each committed token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastllm.cache import CachedSequence, KVCache, device_scope, to_device
from fastllm.config import TokenLogprob
from fastllm.cuda_graph import DecodeGraphRunner
from fastllm.generate import Request, forward_step, packed_logits
from fastllm.logprobs import raw_logprobs, token_logprobs
from fastllm.model import Transformer
from fastllm.ops.reference import philox_u64, sampling_mask
from fastllm.sampling import LogitContext, apply_logit_processors, row_parameters

SPEC_STREAM = 0x73706563  # Philox counter word of the speculative draws ("spec"), apart from the sampler's
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpecRunners:
    """The CUDA-graph runners a round may step through (each optional; a pass
    that does not fit one runs eagerly):

    - ``draft``: the draft's decode steps, one token per sequence;
    - ``draft_pair``: the draft's first step of a round, two tokens per
      sequence and the logits of the last (``step_tokens=2,
      last_logits_only=True``). After a round the draft lacks one or two
      committed tokens; a sequence that lacks one re-feeds the token before
      it (its keys and values are written again: the same values, up to the
      rounding of another batch shape), so that every sequence adds two;
    - ``verify``: the target's verify pass, ``k + 1`` tokens per sequence and
      all their logits (``step_tokens=k + 1``), for rounds in which every
      sequence brings ``k`` proposals after its one uncached token.
    """

    draft: DecodeGraphRunner | None = None
    draft_pair: DecodeGraphRunner | None = None
    verify: DecodeGraphRunner | None = None


@dataclass
class Proposal:
    """One request's state within a round: its target and draft cache entries
    (the engine gives its own target entry; ``generate`` uses ``req.cached``)."""

    req: Request
    target: CachedSequence
    draft: CachedSequence
    base: int  # committed tokens before the round
    k: int  # proposals this round (0: a plain target step)
    tokens: list[int] = field(default_factory=list)  # d_1..d_k
    q: list[Tensor] = field(default_factory=list)  # q_j [V] of sampled rows


def _uniforms(r: Request, n: int) -> list[float]:
    """The request's next ``n`` uniforms in [0, 1)."""
    out = [philox_u64(r.seed, r.spec_draws + i, SPEC_STREAM) / 2.0**64 for i in range(n)]
    r.spec_draws += n
    return out


def _draw_rows(probs: Tensor, u: list[float]) -> Tensor:
    """Inverse-CDF draw per row, on the device: the first index whose
    cumulative mass exceeds ``u * total`` (never a zero-probability index).
    probs: [R, V] fp32. Returns [R] int64."""
    cdf = torch.cumsum(probs, dim=-1)
    x = to_device(u, torch.float32, probs.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def _processed(logits: Tensor, reqs: list[Request], contexts: list[LogitContext]) -> tuple[Tensor, Tensor | None]:
    """Logit processors (penalties, bias, min_new_tokens) in place, then (argmax [R] int64, probs [R, V] fp32) after
    temperature/top-k/top-p/min-p (None when every row is greedy). Row i belongs to ``reqs[i]``."""
    apply_logit_processors(logits, contexts, [r.config for r in reqs])
    if all(r.config.temperature == 0 for r in reqs):
        return logits.argmax(dim=-1), None
    _, probs = sampling_mask(logits, *row_parameters([r.config for r in reqs], logits.device))
    return logits.argmax(dim=-1), probs


def _first_draft_step(net: Transformer, cache: KVCache, rows: list[Proposal],
                      pair: DecodeGraphRunner | None) -> Tensor:
    """The draft's first step of a round: its uncached committed tokens per
    row; through ``pair`` (two tokens per row) when every row lacks one or two
    and the step fits, re-feeding the token before where a row lacks one.
    Returns each row's last logits [B, V]."""
    drafts = [p.draft for p in rows]
    missing = [p.req.num_tokens() - d.num_cached for p, d in zip(rows, drafts)]
    if pair is not None and all(m == 2 or (m == 1 and d.num_cached > 0) for m, d in zip(missing, drafts)):
        back = [CachedSequence(d.block_table, d.num_cached - (2 - m)) for d, m in zip(drafts, missing)]
        if pair.fits(back):
            for d, m in zip(drafts, missing):
                d.num_cached -= 2 - m
            return pair.step(drafts, [p.req.token_ids()[-2:] for p in rows])
    return forward_step(net, cache, drafts, [p.req.token_ids()[d.num_cached :] for p, d in zip(rows, drafts)])


def _draw(logits: Tensor, rows: list[Proposal], contexts: list[LogitContext]) -> tuple[Tensor, list[Tensor | None]]:
    """Each row's next draft token, on the device ([B] int64: the argmax of a
    greedy row, a draw from q of a sampled one), and q [V] of each sampled row
    (None for greedy rows). Takes each sampled row's next uniform."""
    reqs = [p.req for p in rows]
    argmax, probs = _processed(logits, reqs, contexts)
    sampled = [i for i, r in enumerate(reqs) if r.config.temperature > 0]
    q: list[Tensor | None] = [None] * len(rows)
    if not sampled:
        return argmax, q
    u = [_uniforms(reqs[i], 1)[0] for i in sampled]
    idx = to_device(sampled, torch.int64, logits.device)
    for i in sampled:
        q[i] = probs[i]
    return argmax.index_copy(0, idx, _draw_rows(probs.index_select(0, idx), u)), q


def _stays_on_device(rows: list[Proposal], k: int, runner: DecodeGraphRunner | None) -> bool:
    """Whether the draft's steps after the first can feed each step's tokens to
    the next on the device: every row proposes ``k`` tokens, needs no token
    history (no repetition, frequency or presence penalty) and its next
    ``k - 1`` steps fit ``runner``."""
    return (runner is not None and len(rows) <= runner.max_batch_size
            and all(p.k == k and p.draft.num_cached + k - 1 <= runner.max_seq_len for p in rows)
            and not any(p.req.config.penalizes_history for p in rows))


def _draft_round(net: Transformer, cache: KVCache, props: list[Proposal], runners: SpecRunners) -> None:
    """Run the draft ``max k`` steps (through ``runners.draft_pair`` and
    ``runners.draft``, CUDA graphs over ``cache``, where they fit); fill each
    proposal's tokens and q. Where ``_stays_on_device``, the tokens go from
    step to step on the device and the host reads them once, at the end."""
    rows = [p for p in props if p.k > 0]
    if not rows:
        return
    logits = _first_draft_step(net, cache, rows, runners.draft_pair)  # [B, V]
    k = max(p.k for p in rows)
    if _stays_on_device(rows, k, runners.draft):
        drafts, tokens, qs = [p.draft for p in rows], [], []
        for j in range(k):
            if j:
                logits = runners.draft.step(drafts, tokens[-1])
            tok, q = _draw(logits, rows, [p.req.logit_context([0] * j) for p in rows])  # only the count is read
            tokens.append(tok)
            qs.append(q)
        host = torch.stack(tokens, dim=1).tolist()  # [B, k]: the round's one wait for the draft
        for i, p in enumerate(rows):
            p.tokens.extend(host[i])
            p.q.extend(q[i] for q in qs if q[i] is not None)
        return
    for j in range(k):
        if j:
            rows = [p for p in rows if p.k > j]
            logits = forward_step(net, cache, [p.draft for p in rows], [p.tokens[-1:] for p in rows], runners.draft)
        tok, q = _draw(logits, rows, [p.req.logit_context(p.tokens) for p in rows])
        for p, t, qi in zip(rows, tok.tolist(), q):
            p.tokens.append(t)
            if qi is not None:
                p.q.append(qi)


def _verify_logits(net: Transformer, cache: KVCache, props: list[Proposal], inputs: list[list[int]],
                   rows: list[int], runner: DecodeGraphRunner | None) -> Tensor:
    """The target's logits [R, V] at the packed rows ``rows`` of one pass
    appending ``inputs``: through ``runner`` when every sequence brings its
    one uncached token and the runner's ``k`` proposals (then ``rows`` is
    every token, and no prompt token is scored), else one packed pass."""
    targets = [p.target for p in props]
    if (runner is not None and all(len(t) == runner.step_tokens == p.k + 1 for p, t in zip(props, inputs))
            and runner.fits(targets)):
        return runner.step(targets, inputs)
    return packed_logits(net, cache, targets, inputs, rows, [p.req for p in props])


def _verify(net: Transformer, cache: KVCache, props: list[Proposal],
            runner: DecodeGraphRunner | None = None) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
    """One target pass over every proposal (through ``runner`` where it fits,
    see ``_verify_logits``); returns the tokens each request commits and their
    logprobs (the target's raw distribution at the position of each committed
    token: exactly what decoding without a draft reports)."""
    inputs = [p.req.token_ids()[p.target.num_cached :] + p.tokens for p in props]
    rows, owners, contexts, end = [], [], [], 0
    for p, toks in zip(props, inputs):
        end += len(toks)
        rows.extend(range(end - p.k - 1, end))  # the k + 1 positions that predict d_1..d_k and the bonus
        owners.extend([p.req] * (p.k + 1))
        contexts.extend(p.req.logit_context(p.tokens[:j]) for j in range(p.k + 1))
    logits = _verify_logits(net, cache, props, inputs, rows, runner)  # [R, V]
    raw = raw_logprobs(logits, [r.config.logprobs for r in owners])  # before penalties edit logits
    argmax, probs = _processed(logits, owners, contexts)
    argmax_host = argmax.tolist()
    # p_j(d_j) and q_j(d_j) of the sampled rows, in one gather each.
    spots, start = [], 0
    for p in props:
        if p.q:
            spots.extend((start + j, d) for j, d in enumerate(p.tokens))
        start += p.k + 1
    p_at = q_at = []
    if spots:
        r_idx, t_idx = (to_device(list(c), torch.int64, cache.device) for c in zip(*spots))
        p_at = probs[r_idx, t_idx].tolist()
        q_at = torch.stack([q[d] for p in props for q, d in zip(p.q, p.tokens)]).tolist()
    commits, finals, final_dists, final_u, start, s = [], [], [], [], 0, 0
    for p in props:
        if p.req.config.temperature == 0:  # greedy: accept while the draft matches the target's argmax
            n = next((j for j, d in enumerate(p.tokens) if d != argmax_host[start + j]), p.k)
            commits.append(p.tokens[:n] + [argmax_host[start + n]])
        else:
            u = _uniforms(p.req, p.k + 1)
            n = next((j for j in range(p.k) if u[j] * q_at[s + j] >= p_at[s + j]), p.k)  # accept iff u < p/q
            if n < p.k:  # rejected: draw from the residual max(p - q, 0)
                resid = (probs[start + n] - p.q[n]).clamp_(min=0)
                final_dists.append(torch.where(resid.sum() > 0, resid, probs[start + n]))
            else:
                final_dists.append(probs[start + p.k])
            final_u.append(u[p.k])
            finals.append(len(commits))
            commits.append(p.tokens[:n])
            s += p.k
        start += p.k + 1
    if finals:
        for i, tok in zip(finals, _draw_rows(torch.stack(final_dists), final_u).tolist()):
            commits[i].append(tok)
    picks: list[int | None] = []  # per verified row: the token committed at its position, if any
    for p, toks in zip(props, commits):
        picks.extend(toks[j] if j < len(toks) else None for j in range(p.k + 1))
    lps, start, per_commit = token_logprobs(raw, picks), 0, []
    for p, toks in zip(props, commits):
        per_commit.append(lps[start : start + len(toks)])
        start += p.k + 1
    return commits, per_commit


def proposals_allowed(req: Request, num_speculative_tokens: int, draft_context: int) -> int:
    """How many tokens the draft may propose for ``req`` this round: none past
    its last token (the bonus token needs no proposal) or past the draft's
    context (its inputs must fit)."""
    base = len(req.prompt_ids) + len(req.output_ids)
    k = min(num_speculative_tokens, req.max_new_tokens - len(req.output_ids) - 1, draft_context + 1 - base)
    return max(k, 0)


def speculative_round(network: Transformer, cache: KVCache, draft_network: Transformer, draft_cache: KVCache,
                      props: list[Proposal], eos_ids: frozenset[int], runners: SpecRunners | None = None) -> None:
    """One round for ``props``: the draft proposes, the target verifies (each
    pass through ``runners`` where it fits), each request accepts its
    committed tokens (``Request.accept``, stopping at a finish) and both cache
    entries roll back to the committed prefix."""
    runners = runners or SpecRunners()
    with device_scope(cache.device):
        _draft_round(draft_network, draft_cache, props, runners)
        commits, logprobs = _verify(network, cache, props, runners.verify)
    for p, toks, lps in zip(props, commits, logprobs):
        r = p.req
        r.spec_proposed += p.k
        accepted = 0
        for tok, lp in zip(toks, lps):
            r.accept(tok, eos_ids, lp)
            accepted += 1
            if r.finish_reason:
                break
        r.spec_accepted += min(accepted, len(toks) - 1)
        for seq in (p.target, p.draft):  # keep only the committed prefix
            seq.num_cached = min(seq.num_cached, p.base + len(toks) - 1)


@torch.inference_mode()
def run_speculative(
    network: Transformer,
    cache: KVCache,
    draft_network: Transformer,
    draft_cache: KVCache,
    requests: list[Request],
    eos_ids: frozenset[int],
    num_speculative_tokens: int,
    runners: SpecRunners | None = None,
) -> Iterator[list[Request]]:
    """Like ``generate.run`` with a draft model: after each round yield the
    requests that received tokens (finished ones included, once). Passes go
    through ``runners`` (CUDA graphs over ``draft_cache`` and ``cache``) where
    they fit."""
    drafts = {id(r): CachedSequence() for r in requests}
    draft_ctx = draft_network.config.max_position_embeddings
    active = list(requests)
    while active:
        props = [Proposal(r, r.cached, drafts[id(r)], len(r.prompt_ids) + len(r.output_ids),
                          proposals_allowed(r, num_speculative_tokens, draft_ctx)) for r in active]
        speculative_round(network, cache, draft_network, draft_cache, props, eos_ids, runners)
        for p in props:
            if p.req.finish_reason:
                cache.allocator.release(p.target.block_table)
                draft_cache.allocator.release(p.draft.block_table)
                p.target.block_table, p.draft.block_table = [], []
        yield active
        active = [r for r in active if not r.finish_reason]
