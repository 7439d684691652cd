"""Continuous batching with prefix caching: requests join and leave a running
batch at every step, over one persistent paged KV cache.

Each ``step()`` schedules one forward pass:

1. every running sequence gets its next token's slot; when the cache is full
   the most recently admitted running sequence is preempted (its blocks are
   released and it waits again, to be recomputed from its tokens; its
   registered blocks usually survive in the prefix cache);
2. waiting requests are admitted in arrival order while the batch has room
   (``max_num_seqs``), the step's token budget (``max_num_batched_tokens``)
   and the cache allow; their prompt's cached prefix is reused
   (``BlockManager``), and a prompt longer than the budget is prefilled in
   chunks over several steps. A head that does not fit is not planned
   again while it waits: its plan is kept while it stands, and its verdict
   until the blocks change (``BlockManager.version``);
3. the network runs on the packed batch, and every sequence whose tokens are
   now all cached samples its next token.

With a draft model (``draft_model=``) a sequence speculates instead of
sampling: the draft proposes the tokens ``Model.generate`` would have it
propose (up to ``num_speculative_tokens``) and the target verifies them with
the sequence's uncached tokens in one pass (``fastllm.speculative``),
committing 1 to k + 1 tokens. A round that does not fit the step's budget or
the cache waits (or preempts) rather than proposing fewer tokens, so seeded
draws do not depend on the load. The draft's keys and values live in a cache
of their own that mirrors the target's block tables (same block ids), so
prefix caching, preemption and release cover both; earlier prompt chunks go
through the draft too, so it is level with the target when its sequence
first speculates. Prompt chunks and rounds run as two target passes of the
same step.

In a steady decode (no request could be admitted: none waits, or the batch
is full; every running sequence adds one token through the graph runner,
none needing its last token on the host to draw the next: see
``generate.can_step_ahead``) the steps run one ahead of the host: ``step()``
launches the next step on the device's samples before it reads and returns
this one's, so detokenizing and bookkeeping overlap the GPU. A request that
could be admitted (one added, or a slot freed while others wait), a step
that would not fit, or a sequence that needs the host first ends the run
ahead; the step after is scheduled as usual (a slot freed at step n is
filled at step n + 2 instead of n + 1).

Sampling is the same per-sequence, seeded draw as ``Model.generate`` (with
the same draft model, if any), so a request gets the tokens it would get alone (preemption and batch company do
not change its random numbers; floating-point sums may differ in the last bit
between batch shapes).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastllm.block_manager import BlockManager, BlockPlan, SequenceBlocks
from fastllm.cache import DEFAULT_BLOCK_SIZE, CachedSequence, KVCache, blocks_needed, device_scope
from fastllm.config import GenerationConfig, GenerationOutput, TokenLogprob
from fastllm.cuda_graph import DecodeGraphRunner, graphs_supported
from fastllm.generate import (DecodeFlight, DrawRing, Request, can_step_ahead, forward_step, launch_decode,
                              launch_next, sample_requests)
from fastllm.sampling import derive_seed
from fastllm.speculative import Proposal, SpecRunners, proposals_allowed, speculative_round

DEFAULT_CPU_CACHE_BYTES = 1 << 30
GPU_CACHE_FRACTION = 0.5  # of the free GPU memory at start


@dataclass
class StepOutput:
    """What one request got from a step: its new tokens (one, or up to k + 1
    when it speculated) and their text, their TokenLogprobs when the request
    asked for logprobs (else empty), and the finished GenerationOutput once it
    is done. In a request's first StepOutput: ``prompt_token_ids``, and
    ``prompt_logprobs`` when it asked for them (as
    ``GenerationOutput.prompt_logprobs``); None in later ones."""

    request_id: int
    token_ids: list[int]
    text: str
    finished: bool
    output: GenerationOutput | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass(eq=False)  # compared by identity (ids are unique): list.remove need not compare fields
class _Seq:
    id: int
    req: Request
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    draft_cached: int = 0  # tokens whose draft keys and values are in the draft cache (same block table)

    def tokens(self) -> list[int]:
        return self.req.token_ids()


@dataclass
class _Work:
    """A sequence's part of a step: ``n`` target tokens, ``k`` of them draft
    proposals when it speculates (``spec``: a round that ends its uncached
    tokens, possibly with no proposals, like ``Model.generate``'s)."""

    seq: _Seq
    n: int
    k: int = 0
    spec: bool = False


class LLMEngine:
    """Serve many requests at once from one model.

    >>> engine = LLMEngine(model, max_num_seqs=32)
    >>> rid = engine.add_request("ROMEO:", max_new_tokens=64)
    >>> while engine.has_unfinished():
    ...     for out in engine.step():
    ...         print(out.request_id, out.text, end="")
    """

    def __init__(
        self,
        model: Any,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        cuda_graphs: bool | None = None,
        draft_model: Any | None = None,
        num_speculative_tokens: int = 4,
    ):
        """cuda_graphs: replay decode-only steps from CUDA graphs (default: as
        the model was loaded, ``Model.from_pretrained(..., cuda_graphs=...)``).
        draft_model, num_speculative_tokens: speculative decoding, as for
        ``Model.generate`` (a smaller Model with the same tokenizer)."""
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size), ("num_blocks", 1 if num_blocks is None else num_blocks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        model._check_draft(draft_model, num_speculative_tokens)
        if draft_model is not None and max_num_batched_tokens <= num_speculative_tokens:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed num_speculative_tokens "
                             f"({num_speculative_tokens}): a decoding round takes 1 + k tokens")
        self.model, self.draft_model, self.num_speculative_tokens = model, draft_model, num_speculative_tokens
        cfg = model.config
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        if num_blocks is None:
            num_blocks = self._default_num_blocks(block_size)
        # one reserved block past the managed ones: where CUDA graphs park padding rows
        self.cache = KVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device,
                             block_size, reserved_blocks=1)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        if cuda_graphs is None:
            cuda_graphs = model.cuda_graphs
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the model is on {model.device}")
        self.runner = (DecodeGraphRunner(model.network, self.cache, max_num_seqs, cfg.max_position_embeddings)
                       if cuda_graphs and graphs_supported(model.network) else None)
        self.draft_cache = None
        self.spec_runners = SpecRunners()
        if draft_model is not None:
            dc = draft_model.config
            self.draft_cache = KVCache(dc.num_layers, num_blocks, dc.num_kv_heads, dc.head_dim, draft_model.dtype,
                                       draft_model.device, block_size, reserved_blocks=1)
            if cuda_graphs:
                self.spec_runners = self._spec_runners(max_num_seqs)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.failed_request_ids: list[int] = []  # the requests the last failed step dropped
        self._flight: DecodeFlight | None = None  # a decode step launched ahead, not yet read (see step)
        self._flight_seqs: list[_Seq] = []
        self._draws = DrawRing()  # host buffers the steps ahead copy their draws into
        self._ids = itertools.count()
        self.num_preemptions = 0
        # Admission of the waiting head (_schedule): its plan while it stands,
        # and the (head, budget, blocks.version) at which it last did not fit.
        self._plan: tuple[tuple[_Seq, int, int | None], BlockPlan] | None = None
        self._blocked: tuple[_Seq, int, int] | None = None

    def _spec_runners(self, max_num_seqs: int, use_graphs: bool | None = None) -> SpecRunners:
        """The runners of a speculative round: the draft's decode steps and its
        two-token first step of a round (when the draft can be captured), the
        target's verify pass of 1 + ``num_speculative_tokens`` tokens (when the
        target has a decode runner). ``use_graphs`` as for DecodeGraphRunner
        (False: they step eagerly, as in the CPU tests)."""
        net, cache, ctx = self.draft_model.network, self.draft_cache, self.draft_model.config.max_position_embeddings
        draft = pair = verify = None
        if graphs_supported(net):
            draft = DecodeGraphRunner(net, cache, max_num_seqs, ctx, use_graphs)
            pair = DecodeGraphRunner(net, cache, max_num_seqs, ctx, use_graphs, step_tokens=2, last_logits_only=True)
        if self.runner is not None:
            verify = DecodeGraphRunner(self.model.network, self.cache, max_num_seqs, self.runner.max_seq_len,
                                       use_graphs, step_tokens=self.num_speculative_tokens + 1)
        return SpecRunners(draft, pair, verify)

    def _default_num_blocks(self, block_size: int) -> int:
        cfg, model = self.model.config, self.model
        per_block = sum(2 * m.config.num_layers * block_size * m.config.num_kv_heads * m.config.head_dim
                        * m.dtype.itemsize for m in (model, self.draft_model) if m is not None)
        per_seq = blocks_needed([cfg.max_position_embeddings], block_size)  # one full-context sequence
        if model.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(model.device)[0] * GPU_CACHE_FRACTION)
        else:  # enough for every sequence at full context, within a fixed budget
            full = self.max_num_seqs * per_seq * per_block
            budget = min(full, DEFAULT_CPU_CACHE_BYTES)
        blocks = budget // per_block
        if blocks < per_seq:
            raise ValueError(f"the KV cache budget ({budget / 2**20:.0f} MiB) cannot hold one full-context "
                             "sequence; pass num_blocks")
        return int(blocks)

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
                    seed_index: int = 0, **params: Any) -> int:
        """Queue one prompt (text or token ids); returns its request id.
        Parameters as for ``Model.generate``; bad ones raise here. With a seed,
        ``seed_index=i`` draws as row i of a seeded ``Model.generate`` batch."""
        prompts, batched = self.model._prompts(prompt)
        if batched:
            raise ValueError("add_request takes one prompt; call it once per prompt")
        rid = next(self._ids)
        (req,) = self.model._requests(prompts, self.model._config(config, params))
        if req.matcher is not None and self.draft_model is not None:
            raise ValueError("structured_output does not work with a draft model (speculative decoding)")
        need = self.blocks.blocks_for(len(req.prompt_ids) + req.max_new_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"request needs {need} KV blocks at its longest, the cache has {self.blocks.num_blocks}")
        if req.config.seed is not None:
            req.seed = derive_seed(req.config.seed, seed_index)
        self.waiting.append(_Seq(rid, req))
        return rid

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request; False if it is not here."""
        for queue in (self.waiting, self.running):
            for s in queue:
                if s.id == request_id:
                    queue.remove(s)
                    self.blocks.release(s.blocks)
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of admitted prompt tokens whose KV came from the prefix cache."""
        return self.blocks.hit_tokens / max(self.blocks.queried_tokens, 1)

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[StepOutput]:
        """Schedule and run one forward pass (two when some sequences
        speculate and others do not); returns the requests that got tokens.
        In a steady decode the pass after it is already launched on return.
        If it raises, the running requests are dropped (their KV state is
        unknown after a pass that did not finish; none of it reaches the
        prefix cache): their ids are ``failed_request_ids`` and in a note on
        the exception; waiting requests stay, and stepping may go on."""
        try:
            return self._step()
        except BaseException as e:
            self.failed_request_ids = self._drop_running()
            if self.failed_request_ids and isinstance(e, Exception):
                e.add_note(f"LLMEngine dropped the requests it was running: {self.failed_request_ids}")
            raise

    def _drop_running(self) -> list[int]:
        self._flight, self._flight_seqs = None, []
        ids = [s.id for s in self.running]
        for s in self.running:
            self.blocks.release(s.blocks)
        self.running = []
        return ids

    def _step(self) -> list[StepOutput]:
        with torch.inference_mode():
            if self._flight is not None:
                alive = {id(s) for s in self.running}
                if any(id(s) in alive for s in self._flight_seqs):
                    return self._read_ahead(alive)
                self._flight, self._flight_seqs = None, []  # every row in it was aborted: nothing to read
            batch = self._schedule()
            if batch and self._steady([w.seq for w in batch], [w.n for w in batch]):
                seqs = [w.seq for w in batch]
                with device_scope(self.cache.device):
                    self._flight = launch_decode(self.cache, self.runner, [s.req for s in seqs],
                                                 [s.blocks for s in seqs], [s.req.output_ids[-1] for s in seqs], 0,
                                                 self._draws)
                self._flight_seqs = seqs
                return self._read_ahead()
            plain = [w for w in batch if not w.spec]
            spec = [w for w in batch if w.spec]
            outs = self._plain_step(plain) if plain else []
            if spec:
                outs += self._speculative_step(spec)
        return outs

    def _steady(self, seqs: list[_Seq], counts: list[int]) -> bool:
        """Whether a step of ``seqs`` (``counts`` new tokens each) may run ahead
        of the host: every running sequence, one decode token each through
        the runner, nothing to admit, no draft, and every request drawing
        without its last token on the host. (The steps that follow carry the
        same sequences, less those that finish, until one of these changes.)"""
        return (self.runner is not None and self.draft_model is None and len(seqs) == len(self.running)
                and all(n == 1 and s.req.output_ids and s.blocks.num_cached + 1 == s.req.num_tokens()
                        for s, n in zip(seqs, counts))
                and all(can_step_ahead(s.req) for s in seqs) and self._steady_ahead(seqs))

    def _read_ahead(self, alive: set[int] | None = None) -> list[StepOutput]:
        """Launch the step after the one in flight (when the decode is still
        steady), then read the one in flight and return its outputs. alive:
        ids of the running sequences, when the caller has them."""
        flight, seqs = self._flight, self._flight_seqs
        self._flight, self._flight_seqs = None, []
        if alive is None:
            alive = {id(s) for s in self.running}
        keep = [i for i, s in enumerate(seqs) if id(s) in alive and s.req.finish_reason is None
                and len(s.req.output_ids) + 1 < s.req.max_new_tokens]
        following = [seqs[i] for i in keep]
        if (following and self._steady_ahead(following)
                and all(self.blocks.grow(s.blocks, s.blocks.num_cached + 1) for s in following)):
            self._flight = launch_next(self.cache, self.runner, flight, keep, [s.blocks for s in following])
            self._flight_seqs = following
        try:
            drawn = flight.read()
        except Exception:  # a row the sampler could not draw: the step launched on its draws is never read
            self._flight, self._flight_seqs = None, []
            raise
        outs = []
        for s, tok in zip(seqs, drawn):
            if id(s) not in alive or s.req.finish_reason is not None:
                continue  # aborted, or finished by the step before: this row was computed ahead
            s.req.accept(tok, self.model.eos_ids)
            self._register(s)
            outs.append(self._output(s, [tok]))
        if self._flight is not None and all(s.req.finish_reason is not None for s in self._flight_seqs):
            self._flight, self._flight_seqs = None, []  # only finished rows ahead: nothing to read
        return outs

    def _steady_ahead(self, seqs: list[_Seq]) -> bool:
        """What of ``_steady`` can change from one step to the next (checked
        again for the step after the one in flight): nothing to admit, the
        token budget, and the runner's room."""
        return (self._nothing_to_admit() and len(seqs) <= self.max_num_batched_tokens
                and self.runner.fits([s.blocks for s in seqs]))

    def _nothing_to_admit(self) -> bool:
        """No waiting request could join the batch now (none waits, or it is full)."""
        return not self.waiting or len(self.running) >= self.max_num_seqs

    def _plain_step(self, batch: list[_Work]) -> list[StepOutput]:
        """One target pass over ``batch``; the sequences whose tokens are then
        all cached sample their next token. With a draft, the draft runs over
        the prompt chunks too, to stay level with the target."""
        seqs = [w.seq for w in batch]
        new_tokens = [s.req.token_range(s.blocks.num_cached, s.blocks.num_cached + w.n) for s, w in zip(seqs, batch)]
        with device_scope(self.cache.device):
            if self.draft_model is not None:
                self._draft_prefill(batch)
            logits = forward_step(self.model.network, self.cache, [s.blocks for s in seqs], new_tokens,
                                  self.runner, [s.req for s in seqs])  # [B, V]
            ready = [i for i, s in enumerate(seqs) if s.blocks.num_cached == s.req.num_tokens()]
            for s in seqs:
                self._register(s)
            if not ready:
                return []
            rows = logits if len(ready) == len(seqs) else logits[ready]  # all ready (decode): no gather, no index copy
            next_ids, lps = sample_requests(rows, [seqs[i].req for i in ready])
        outs = []
        for i, tok, lp in zip(ready, next_ids, lps):
            seqs[i].req.accept(tok, self.model.eos_ids, lp)
            outs.append(self._output(seqs[i], [tok]))
        return outs

    def _draft_prefill(self, batch: list[_Work]) -> None:
        """Run the draft over the prompt chunks of ``batch`` that leave their
        sequence unfinished (the last one goes with the first proposals), as
        far as the draft's context reaches."""
        ctx = self.draft_model.config.max_position_embeddings
        rows = [(w.seq, min(w.seq.blocks.num_cached + w.n, ctx)) for w in batch]
        rows = [(s, end) for s, end in rows if s.draft_cached < end < s.req.num_tokens()]
        if not rows:
            return
        drafts = [CachedSequence(s.blocks.block_table, s.draft_cached) for s, _ in rows]
        forward_step(self.draft_model.network, self.draft_cache, drafts,
                     [s.req.token_range(s.draft_cached, end) for s, end in rows])
        for (s, _), d in zip(rows, drafts):
            s.draft_cached = d.num_cached

    def _speculative_step(self, batch: list[_Work]) -> list[StepOutput]:
        """One speculative round over ``batch`` (draft proposals, one target pass)."""
        props = [Proposal(w.seq.req, w.seq.blocks, CachedSequence(w.seq.blocks.block_table, w.seq.draft_cached),
                          w.seq.req.num_tokens(), w.k) for w in batch]
        speculative_round(self.model.network, self.cache, self.draft_model.network, self.draft_cache, props,
                          self.model.eos_ids, self.spec_runners)
        outs = []
        for w, p in zip(batch, props):
            s = w.seq
            s.draft_cached = p.draft.num_cached
            self._register(s)
            outs.append(self._output(s, s.req.output_ids[p.base - len(s.req.prompt_ids) :]))
        return outs

    def _register(self, s: _Seq) -> None:
        """Register the sequence's full blocks in the prefix cache: those both
        models have computed, or the target's alone once the draft has filled
        its whole context (it never reads past it)."""
        upto = s.blocks.num_cached
        if self.draft_model is not None and s.draft_cached < self.draft_model.config.max_position_embeddings:
            upto = min(upto, s.draft_cached)
        if self.blocks.has_unregistered(s.blocks, upto):  # else nothing to do: skip building the token list
            self.blocks.register(s.blocks, s.tokens(), upto)

    def _output(self, s: _Seq, tokens: list[int]) -> StepOutput:
        """The StepOutput of ``s`` that just accepted ``tokens``; a finished
        sequence leaves the batch and frees its blocks."""
        req = s.req
        done = req.finish_reason is not None
        lps = req.logprobs[len(req.logprobs) - len(tokens) :] if req.config.logprobs is not None else []
        prompt_ids = prompt_lps = None
        if len(req.output_ids) == len(tokens):  # its first tokens
            prompt_ids = list(req.prompt_ids)
            if req.config.prompt_logprobs is not None:
                prompt_lps = [None, *req.prompt_scores]
        if done:
            self.running.remove(s)
            self.blocks.release(s.blocks)
        return StepOutput(s.id, tokens, req.pending_text() if req.decoder else "", done,
                          req.output() if done else None, lps, prompt_lps, prompt_ids)

    def _work(self, s: _Seq, cached: int, budget: int) -> _Work | None:
        """What ``s``, with ``cached`` tokens in the cache, does this step
        within ``budget`` tokens (None: nothing).
        With a draft, a round always carries the proposals ``Model.generate``
        would make (so seeded draws do not depend on the load); what does not
        fit waits: a prompt chunk stops one token short of the round, and a
        round that does not fit waits for the next step."""
        remaining = s.req.num_tokens() - cached  # 1 when decoding, more mid-chunked-prefill
        if self.draft_model is None:
            return _Work(s, min(remaining, budget))
        k = proposals_allowed(s.req, self.num_speculative_tokens, self.draft_model.config.max_position_embeddings)
        if remaining + k <= budget:
            return _Work(s, remaining + k, k, spec=True)
        n = min(remaining - 1, budget)
        return _Work(s, n) if n > 0 else None

    def _schedule(self) -> list[_Work]:
        """Each scheduled sequence's share of this step."""
        budget, batch = self.max_num_batched_tokens, []
        running = list(self.running)
        while running and budget > 0:
            s = running.pop(0)
            w = self._work(s, s.blocks.num_cached, budget)
            if w is None:
                continue
            while not self.blocks.grow(s.blocks, s.blocks.num_cached + w.n):
                victim = running.pop() if running else s  # the latest admitted goes first
                self._preempt(victim)
                if victim is s:
                    break
            else:
                batch.append(w)
                budget -= w.n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            verdict = (s, budget, self.blocks.version)
            if verdict == self._blocked:
                break  # the head could not be admitted, and nothing it depends on has changed since
            plan = self._head_plan(s)
            n = s.req.num_tokens()
            w = self._work(s, len(plan.reused) * self.blocks.block_size, budget)
            proposals = 0 if w is None else self.blocks.blocks_for(n + w.k) - self.blocks.blocks_for(n)
            if w is None or not self.blocks.can_admit(plan, reserve=proposals):
                self._blocked = verdict
                break
            self.waiting.popleft()
            self._plan = None
            self.blocks.admit(s.blocks, plan, n)
            self.blocks.grow(s.blocks, s.blocks.num_cached + w.n)  # fits: reserved above
            s.draft_cached = s.blocks.num_cached  # reused blocks hold the draft's keys too (see _register)
            self.running.append(s)
            batch.append(w)
            budget -= w.n
        return batch

    def _head_plan(self, s: _Seq) -> BlockPlan:
        """``BlockManager.plan`` of the waiting head ``s`` (its cached prefix:
        a prompt that still has to score prompt tokens is computed from
        there), kept while it stands (``BlockManager.plan_stands``): a head
        that waits for blocks is not hashed again at every step."""
        key = (s, s.req.num_tokens(), s.req.reusable_prefix())
        if self._plan is not None and self._plan[0] == key and self.blocks.plan_stands(self._plan[1]):
            return self._plan[1]
        plan = self.blocks.plan(s.tokens(), key[2])
        self._plan = (key, plan)
        return plan

    def _preempt(self, s: _Seq) -> None:
        self.running.remove(s)
        self.blocks.release(s.blocks)
        self.waiting.appendleft(s)
        self.num_preemptions += 1

    # ---------------------------------------------------------------- batch use
    def generate(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig | None = None,
                 **params: Any) -> list[GenerationOutput]:
        """Run ``prompts`` (each with ``derive_seed(seed, i)``, as a Model.generate
        batch) to completion; returns their outputs in order."""
        ids = []
        for i, p in enumerate(prompts):
            ids.append(self.add_request(p, config, seed_index=i, **params))
        done: dict[int, GenerationOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out.output
        return [done[i] for i in ids]

