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
   chunks over several steps;
3. the network runs on the packed batch, and every sequence whose tokens are
   now all cached samples its next token.

Sampling is the same per-sequence, seeded draw as ``Model.generate``, so a
request gets the tokens it would get alone (preemption and batch company do
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

from fastllm.block_manager import BlockManager, SequenceBlocks
from fastllm.cache import DEFAULT_BLOCK_SIZE, KVCache, blocks_needed, device_scope
from fastllm.config import GenerationConfig, GenerationOutput, TokenLogprob
from fastllm.cuda_graph import DecodeGraphRunner, graphs_supported
from fastllm.generate import Request, forward_step, sample_requests
from fastllm.sampling import derive_seed

DEFAULT_CPU_CACHE_BYTES = 1 << 30
GPU_CACHE_FRACTION = 0.5  # of the free GPU memory at start


@dataclass
class StepOutput:
    """What one request got from a step: its new token and text, the token's
    TokenLogprob when the request asked for logprobs, and the finished
    GenerationOutput once it is done."""

    request_id: int
    token_id: int
    text: str
    finished: bool
    output: GenerationOutput | None = None
    logprobs: TokenLogprob | None = None


@dataclass
class _Seq:
    id: int
    req: Request
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)

    def tokens(self) -> list[int]:
        return self.req.token_ids()


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
    ):
        """cuda_graphs: replay decode-only steps from CUDA graphs (default: as
        the model was loaded, ``Model.from_pretrained(..., cuda_graphs=...)``)."""
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model = model
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
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._ids = itertools.count()
        self.num_preemptions = 0

    def _default_num_blocks(self, block_size: int) -> int:
        cfg, model = self.model.config, self.model
        per_block = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
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
        """Schedule and run one forward pass; returns the requests that got a token."""
        batch = self._schedule()
        if not batch:
            return []
        seqs = [s for s, _ in batch]
        new_tokens = [s.tokens()[s.blocks.num_cached : s.blocks.num_cached + n] for s, n in batch]
        with torch.inference_mode(), device_scope(self.cache.device):
            logits = forward_step(self.model.network, self.cache, [s.blocks for s in seqs], new_tokens,
                                  self.runner)  # [B, V]
            ready = [i for i, s in enumerate(seqs) if s.blocks.num_cached == len(s.tokens())]
            for s in seqs:
                self.blocks.register(s.blocks, s.tokens())
            if not ready:
                return []
            next_ids, lps = sample_requests(logits[ready], [seqs[i].req for i in ready])
        outs = []
        for i, tok, lp in zip(ready, next_ids, lps):
            s = seqs[i]
            s.req.accept(tok, self.model.eos_ids, lp)
            done = s.req.finish_reason is not None
            outs.append(StepOutput(s.id, tok, s.req.pending_text() if s.req.decoder else "", done,
                                   s.req.output() if done else None, lp))
            if done:
                self.running.remove(s)
                self.blocks.release(s.blocks)
        return outs

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """(sequence, number of its tokens to compute) for this step."""
        budget, batch = self.max_num_batched_tokens, []
        running = list(self.running)
        while running and budget > 0:
            s = running.pop(0)
            n = min(len(s.tokens()) - s.blocks.num_cached, budget)  # 1 when decoding, more mid-chunked-prefill
            while not self.blocks.grow(s.blocks, s.blocks.num_cached + n):
                victim = running.pop() if running else s  # the latest admitted goes first
                self._preempt(victim)
                if victim is s:
                    break
            else:
                batch.append((s, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            tokens = s.tokens()
            plan = self.blocks.plan(tokens)
            if not self.blocks.can_admit(plan):
                break
            self.waiting.popleft()
            self.blocks.admit(s.blocks, plan, len(tokens))
            self.running.append(s)
            n = min(len(tokens) - s.blocks.num_cached, budget)
            batch.append((s, n))
            budget -= n
        return batch

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

