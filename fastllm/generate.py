"""The generation loop: prefill the prompts, then one token per step.

Sequences of a batch are packed without padding; each step runs the network
on the new tokens of the sequences still running, samples one token for each,
and drops those that finished (their KV blocks go back to the pool).

Decode steps through a graph runner overlap the host with the device
(``_overlapped``): step n + 1 is launched on step n's sampled tokens while
they are still on the device, and only then does the host read step n's
tokens and do its part (detokenizing, stop strings, finishing). A sequence
that step n finishes has one more row computed in step n + 1, which is
dropped. Requests whose next draw needs the host to have seen the last token
(repetition, frequency and presence penalties, structured output) or that ask
for logprobs take the plain loop.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastllm.cache import CachedSequence, KVCache, device_scope, prepare_step, to_device
from fastllm.config import GenerationConfig, GenerationOutput, TokenLogprob
from fastllm.cuda_graph import DecodeGraphRunner
from fastllm.logprobs import prompt_rows, raw_logprobs, score_prompts, token_logprobs
from fastllm.model import Transformer
from fastllm.sampling import LogitContext, check_drawn, sample_next

_RECENT = 256  # characters of a Request's text kept in one short string (see Request._recent)


@dataclass
class Request:
    """One sequence being generated and its decoded text."""

    prompt_ids: list[int]
    config: GenerationConfig
    seed: int
    max_new_tokens: int  # config's, clipped to the context left
    decoder: object | None = None  # tokenizer's IncrementalDecoder
    output_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text handed out by pending_text
    finish_reason: str | None = None
    cached: CachedSequence = field(default_factory=CachedSequence)
    spec_draws: int = 0  # speculative decoding: uniforms drawn, draft tokens proposed and accepted
    spec_proposed: int = 0
    spec_accepted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id when config.logprobs is set
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # of prompt ids 1.. (config.prompt_logprobs)
    eos_ids: frozenset[int] = frozenset()  # the model's, for min_new_tokens
    matcher: object | None = None  # a fastllm.structured.GrammarMatcher (config.structured_output)
    # The decoded text is ``"".join(_chunks) + _recent``, ``_recent`` its last
    # _RECENT to 2 * _RECENT characters: a step appends its piece to the short
    # ``_recent`` and reads only the tail it needs (stop strings, pending_text),
    # so generating n characters costs O(n), not the O(n^2) of ``text += piece``.
    _chunks: list[str] = field(default_factory=list, repr=False)
    _recent: str = field(default="", repr=False)
    _length: int = field(default=0, repr=False)  # len(text)
    _stop_len: int = field(init=False, repr=False)  # the longest stop string's length (0: none)

    def __post_init__(self) -> None:
        self._stop_len = max(map(len, self.config.stop), default=0)

    @property
    def text(self) -> str:
        """The text decoded so far (cut at a stop string)."""
        chunks = self._chunks
        if not chunks:
            return self._recent
        if len(chunks) > 1:
            chunks[:] = ["".join(chunks)]
        return chunks[0] + self._recent

    @text.setter
    def text(self, value: str) -> None:
        self._chunks, self._recent, self._length = [], value, len(value)

    def _append_text(self, piece: str) -> None:
        if not piece:
            return
        r = self._recent + piece
        if len(r) >= 2 * _RECENT:
            self._chunks.append(r[: len(r) - _RECENT])
            r = r[len(r) - _RECENT :]
        self._recent = r
        self._length += len(piece)

    def _tail(self, k: int) -> str:
        """``text[-k:]`` for k >= 0 (the whole text when k exceeds it)."""
        r = self._recent
        if k <= len(r):
            return r[len(r) - k :]
        need, parts, chunks, i = k - len(r), [r], self._chunks, len(self._chunks)
        while need > 0 and i > 0:
            i -= 1
            c = chunks[i]
            parts.append(c if len(c) <= need else c[len(c) - need :])
            need -= len(c)
        return "".join(reversed(parts))

    def token_ids(self) -> list[int]:
        """The prompt and the tokens generated so far."""
        return self.prompt_ids + self.output_ids

    def num_tokens(self) -> int:
        """``len(token_ids())``, without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_range(self, start: int, end: int) -> list[int]:
        """``token_ids()[start:end]`` (0 <= start, 0 <= end), copying only that part."""
        if start < 0 or end < 0:
            raise ValueError(f"token_range takes non-negative bounds, got {start}, {end}")
        n = len(self.prompt_ids)
        if end <= start:
            return []
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    def logit_context(self, extra: list[int] = ()) -> LogitContext:
        """What the logit processors need for the next token, with ``extra``
        (draft tokens) appended to the output: prompt + output for the
        repetition penalty, the output for the frequency and presence
        penalties, and the ids min_new_tokens still bans; each empty when
        unused (so nothing is copied to the device)."""
        c = self.config
        if (not c.penalizes_history and self.matcher is None
                and len(self.output_ids) + len(extra) >= c.min_new_tokens):
            return LogitContext([], [], [])  # the common case, without building anything
        seen = self.token_ids() + list(extra) if c.repetition_penalty != 1.0 else []
        counted = self.output_ids + list(extra) if c.frequency_penalty or c.presence_penalty else []
        banned: list[int] = []
        if len(self.output_ids) + len(extra) < c.min_new_tokens:
            banned = sorted(set(c.stop_token_ids) | (set() if c.ignore_eos else self.eos_ids))
        if self.matcher is not None:
            if extra:
                raise RuntimeError("structured output cannot score draft tokens")
            return LogitContext(seen, counted, banned, self.matcher)
        return LogitContext(seen, counted, banned)

    def prompt_positions(self, start: int, n: int) -> range:
        """The positions among ``[start, start + n)`` whose logits score a
        prompt token not scored yet (position j scores prompt token j + 1);
        empty unless ``config.prompt_logprobs`` is set."""
        if self.config.prompt_logprobs is None:
            return range(0)
        lo, hi = len(self.prompt_scores), min(start + n, len(self.prompt_ids) - 1)
        if lo >= hi:
            return range(0)
        if start > lo:
            raise RuntimeError(f"prompt positions {lo}..{start - 1} were cached before their logits scored the prompt")
        return range(lo, hi)

    def reusable_prefix(self) -> int | None:
        """How many leading tokens may at most come from a prefix cache (None:
        all): none past the first position that still has to score a prompt token."""
        if self.config.prompt_logprobs is None or len(self.prompt_scores) >= len(self.prompt_ids) - 1:
            return None
        return len(self.prompt_scores)

    def pending_text(self) -> str:
        """Text that is final and not yet handed out. While running, a tail
        that could still grow into a stop string is held back."""
        n = self._length
        end = n if self.finish_reason else n - self._stop_prefix_len()
        if end <= self.emitted:
            return ""
        piece = self._tail(n - self.emitted)[: end - self.emitted]  # text[emitted:end]
        self.emitted = end
        return piece

    def _stop_prefix_len(self) -> int:
        """The length of the longest tail of the text, shorter than the longest
        stop string, that some stop string starts with (0: none)."""
        stops = self.config.stop
        if not stops:
            return 0
        text = self._recent  # only a tail of _stop_len - 1 characters can matter: the search is the same on it
        if len(text) < self._stop_len - 1 and self._chunks:
            text = self._tail(self._stop_len - 1)
        cap = min(self._stop_len - 1, len(text))
        best = 0
        for s in stops:  # per stop string, its longest prefix that ends the text
            k = min(cap, len(s))  # a tail of k characters starts at len(text) - k
            if k <= best:
                continue
            j = text.find(s[0], len(text) - k)  # a tail that s starts with starts with s[0]
            while j >= 0 and len(text) - j > best:
                if s.startswith(text[j:]):
                    best = len(text) - j
                    break
                j = text.find(s[0], j + 1)
        return best

    def output(self) -> GenerationOutput:
        return GenerationOutput(
            text=self.text if self.decoder is not None else None,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "length",
            prompt_token_ids=list(self.prompt_ids),
            num_draft_tokens=self.spec_proposed,
            num_accepted_draft_tokens=self.spec_accepted,
            logprobs=list(self.logprobs) if self.config.logprobs is not None else None,
            prompt_logprobs=[None, *self.prompt_scores] if self.config.prompt_logprobs is not None else None,
        )

    def accept(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> None:
        """Append a sampled token (and its logprob, when the request asked for
        them: kept 1:1 with output_ids); update text and finish state."""
        self.output_ids.append(token)
        if self.config.logprobs is not None:
            if logprob is None or logprob.token_id != token:
                raise RuntimeError(f"request asked for logprobs but token {token} came with {logprob!r}")
            self.logprobs.append(logprob)
        if self.matcher is not None:
            self.matcher.consume(token)
        c = self.config
        if not c.ignore_eos and token in eos_ids:
            self._finish("stop")
            return
        if self.decoder is not None:  # a stop id's text stays in the output, as vLLM and transformers keep it
            before = self._length
            self._append_text(self.decoder.feed(token))
            if self._cut_at_stop_string(before):
                return
        if token in c.stop_token_ids:
            self._finish("stop")
        elif self.matcher is not None and self.matcher.done:
            self._finish("stop")  # the grammar is complete
        elif len(self.output_ids) >= self.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.decoder is not None:
            before = self._length
            self._append_text(self.decoder.flush())
            self._cut_at_stop_string(before)

    def _cut_at_stop_string(self, before: int) -> bool:
        """Cut the text at the first stop string that ends past ``before`` (the
        length before the last piece); only the tail such a string can start in is read."""
        stops = self.config.stop
        if not stops:
            return False
        tail = self._recent
        start = self._length - len(tail)  # where tail starts in the text
        lo = before - self._stop_len + 1  # no stop string found here starts before lo
        if lo < start:  # a long stop string (or piece): it may start in the chunks
            lo = lo if lo > 0 else 0
            tail, start = self._tail(self._length - lo), lo
        hits = []
        for s in stops:
            i = before - len(s) + 1 - start  # >= 0 unless start is 0
            pos = tail.find(s, i if i > 0 else 0)
            if pos >= 0:
                hits.append(start + pos)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True


def forward_step(
    network: Transformer,
    cache: KVCache,
    seqs: list[CachedSequence],
    new_tokens: list[list[int]],
    runner: DecodeGraphRunner | None = None,
    scored: list[Request | None] | None = None,
) -> Tensor:
    """Append ``new_tokens`` to ``seqs`` in the cache and return the logits of
    each sequence's last new token [B, V] fp32: through ``runner`` (CUDA graphs)
    when every sequence adds one token and it fits, else one packed pass.
    scored: per sequence, the Request whose prompt tokens the pass scores
    (``GenerationConfig.prompt_logprobs``), or None."""
    return packed_logits(network, cache, seqs, new_tokens, None, scored, runner)


def packed_logits(
    network: Transformer,
    cache: KVCache,
    seqs: list[CachedSequence],
    new_tokens: list[list[int]],
    rows: list[int] | None = None,
    scored: list[Request | None] | None = None,
    runner: DecodeGraphRunner | None = None,
) -> Tensor:
    """One pass that appends ``new_tokens`` to ``seqs``: the fp32 logits [R, V]
    of the packed token indices ``rows`` (default: each sequence's last new
    token); where ``scored`` gives a sequence's Request, the prompt tokens its
    new tokens predict are scored too (appended to ``Request.prompt_scores``)."""
    pr = prompt_rows(scored, [s.num_cached for s in seqs], [len(t) for t in new_tokens]) if scored else None
    if (pr is None and rows is None and runner is not None and all(len(t) == 1 for t in new_tokens)
            and runner.fits(seqs)):
        return runner.step(seqs, [t[0] for t in new_tokens])
    ids, positions, meta, last = prepare_step(cache, seqs, new_tokens)
    idx = last if rows is None else to_device(rows, torch.int64, cache.device)
    if pr is None:
        return network(ids, positions, cache.layers(), meta, idx)
    extra = to_device(pr.rows, torch.int64, cache.device)
    hidden = network.hidden_states(ids, positions, cache.layers(), meta, torch.cat([idx, extra]))
    m = idx.shape[0]
    score_prompts(network.logits, hidden[m:], pr, network.config.vocab_size)
    return network.logits(hidden[:m])


def sample_requests(logits: Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each request's next token from its row of ``logits`` [B, V] (its own
    sampling parameters, penalty history and seeded draw), with its
    TokenLogprob where it asked for logprobs."""
    raw = raw_logprobs(logits, [r.config.logprobs for r in requests])  # before penalties edit logits
    next_ids = sample_next(
        logits,
        [r.config for r in requests],
        [r.logit_context() for r in requests],
        [r.seed for r in requests],
        [len(r.output_ids) for r in requests],
    ).tolist()
    return next_ids, token_logprobs(raw, next_ids)


@torch.inference_mode()
def run(
    network: Transformer,
    cache: KVCache,
    requests: list[Request],
    eos_ids: frozenset[int],
    runner: DecodeGraphRunner | None = None,
) -> Iterator[list[Request]]:
    """Generate all ``requests`` together; after each step yield the requests
    that received a token (finished ones included, once). Decode steps go
    through ``runner`` (CUDA graphs over ``cache``) when given and it fits."""
    active = list(requests)
    new_tokens = [r.prompt_ids for r in active]
    while active:
        if runner is not None and all(len(t) == 1 for t in new_tokens) and all(map(can_step_ahead, active)):
            active = yield from _overlapped(cache, active, eos_ids, runner)
            new_tokens = [[r.output_ids[-1]] for r in active]
            if not active:
                return
        with device_scope(cache.device):  # kernels launch on the model's GPU, whichever is current
            logits = forward_step(network, cache, [r.cached for r in active], new_tokens, runner, active)  # [B, V]
            next_ids, lps = sample_requests(logits, active)
        for r, tok, lp in zip(active, next_ids, lps):
            r.accept(tok, eos_ids, lp)
            if r.finish_reason:
                cache.allocator.release(r.cached.block_table)
                r.cached.block_table = []
        yield active
        active = [r for r in active if not r.finish_reason]
        new_tokens = [[r.output_ids[-1]] for r in active]


def can_step_ahead(r: Request) -> bool:
    """Whether ``r``'s next draw can be launched before the host has read its
    last token: its logit processors need no token history (the count alone
    sets what min_new_tokens bans) and it wants no logprobs."""
    c = r.config
    return not c.penalizes_history and r.matcher is None and c.logprobs is None


class DrawRing:
    """Pinned host buffers, each with a CUDA event, that decode steps copy
    their draws into: reused from step to step instead of a buffer and an
    event allocated per step. A buffer is handed out again only when no
    unread ``DecodeFlight`` holds it (read, or dropped) and its event has
    fired (``Event.query``, which does not synchronise); when none is free a
    buffer is added, so the ring grows to the steps in flight at once (two
    when one step is launched ahead of the one being read). The decode loop
    owns it (``_overlapped``, ``LLMEngine``) and ``launch_next`` hands it on.
    ``pinned`` and ``new_event``: for tests without a GPU."""

    def __init__(self, pinned: bool = True, new_event=None):
        self._pinned = pinned
        self._new_event = new_event if new_event is not None else torch.cuda.Event
        self._buffers: list[Tensor | None] = []
        self._events: list = []
        self._holders: list[weakref.ref | None] = []  # the DecodeFlight reading each buffer, or None
        self._next = 0  # round robin from here: the buffer used longest ago is the likeliest free

    def __len__(self) -> int:
        return len(self._buffers)

    def take(self, n: int, dtype: torch.dtype) -> tuple[int, Tensor, object]:
        """A free buffer's index, its first ``n`` entries and its event."""
        k = len(self._buffers)
        for j in range(k):
            i = (self._next + j) % k
            holder = self._holders[i]
            if (holder is None or holder() is None) and self._events[i].query():
                break
        else:
            i = k
            self._buffers.append(None)
            self._events.append(self._new_event())
            self._holders.append(None)
        buf = self._buffers[i]
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[i] = torch.empty(n, dtype=dtype, pin_memory=self._pinned)
        self._next = (i + 1) % len(self._buffers)
        return i, buf if buf.numel() == n else buf[:n], self._events[i]

    def hold(self, i: int, flight: "DecodeFlight") -> None:
        """Buffer ``i`` is ``flight``'s until it is read or dropped."""
        self._holders[i] = weakref.ref(flight)

    def release(self, i: int) -> None:
        self._holders[i] = None


@dataclass(eq=False)
class DecodeFlight:
    """A decode step launched and not yet read: its requests, their sampled
    tokens on the device, and the host copy of them (ready once ``copied``),
    in buffer ``slot`` of ``ring`` on a GPU."""

    requests: list[Request]
    tokens: Tensor  # [B] int64 on the device
    host: Tensor  # [B] int64, pinned on a GPU
    copied: torch.cuda.Event | None
    ring: DrawRing | None = None
    slot: int = -1
    _drawn: list[int] | None = None

    def read(self) -> list[int]:
        """The sampled tokens, once the device has them on the host (waits).
        Raises the sampler's ValueError for a row it could not draw (NaN
        logits, say), which the launch did not wait to check."""
        if self._drawn is None:
            if self.copied is not None:
                self.copied.synchronize()
            self._drawn = self.host.tolist()
            if self.ring is not None:  # read: the buffer may take a later step's draws
                self.ring.release(self.slot)
        check_drawn(self._drawn)
        return self._drawn


def launch_decode(cache: KVCache, runner: DecodeGraphRunner, requests: list[Request], seqs: list[CachedSequence],
                  tokens: list[int] | Tensor, pending: int, ring: DrawRing | None = None) -> DecodeFlight:
    """One decode step of ``requests`` (their sequences in the cache: ``seqs``)
    on ``tokens`` (host ids, or the last step's samples on the device), its
    draw and the copy of the draws to the host, all enqueued without waiting
    (nothing here may synchronise with the device: the sampler's check of
    its rows waits for ``DecodeFlight.read``). ``pending``: tokens each
    request has drawn that the host has not accepted yet (0 or 1); the draw
    is its ``len(output_ids) + pending``-th. ``ring``: where the draws are
    copied on a GPU (a new one when None; the decode loop passes its own)."""
    logits = runner.step(seqs, tokens)
    extra = [0] * pending  # no history is read: only the count
    contexts = [r.logit_context(extra) for r in requests]
    drawn = sample_next(logits, [r.config for r in requests], contexts, [r.seed for r in requests],
                        [len(r.output_ids) + pending for r in requests], check=False)
    if cache.device.type != "cuda":
        return DecodeFlight(requests, drawn, drawn, None)
    if ring is None:
        ring = DrawRing()
    slot, host, copied = ring.take(drawn.shape[0], drawn.dtype)
    host.copy_(drawn, non_blocking=True)
    copied.record()
    flight = DecodeFlight(requests, drawn, host, copied, ring, slot)
    ring.hold(slot, flight)
    return flight


def launch_next(cache: KVCache, runner: DecodeGraphRunner, flight: DecodeFlight, keep: list[int],
                seqs: list[CachedSequence]) -> DecodeFlight:
    """The step after ``flight`` for its requests at indices ``keep`` (their
    sequences in the cache: ``seqs``), on its samples still on the device,
    its draws copied into ``flight``'s ring."""
    with device_scope(cache.device):
        tokens = flight.tokens
        if len(keep) < len(flight.requests):
            tokens = tokens.index_select(0, to_device(keep, torch.int64, tokens.device))  # pinned: no sync
        return launch_decode(cache, runner, [flight.requests[i] for i in keep], seqs, tokens, 1, flight.ring)


def _overlapped(cache: KVCache, active: list[Request], eos_ids: frozenset[int],
                runner: DecodeGraphRunner) -> Generator[list[Request], None, list[Request]]:
    """Decode ``active`` (each with its last token sampled, not yet cached)
    with the host one step behind the device; yields as ``run`` does and
    returns the requests left unfinished when a step no longer fits the
    runner (none when all finished)."""
    if not runner.fits([r.cached for r in active]):
        return active
    with device_scope(cache.device):
        flight = launch_decode(cache, runner, active, [r.cached for r in active], [r.output_ids[-1] for r in active], 0,
                               DrawRing())  # handed on to each next step by launch_next
    while True:
        # The next step, for what may still need a token after this one: not
        # the requests that finished before this step (their row here is
        # dropped) nor those whose token here is their last by length.
        keep = [i for i, r in enumerate(flight.requests)
                if r.finish_reason is None and len(r.output_ids) + 1 < r.max_new_tokens]
        seqs = [flight.requests[i].cached for i in keep]
        nxt = launch_next(cache, runner, flight, keep, seqs) if keep and runner.fits(seqs) else None
        got = []
        for r, tok in zip(flight.requests, flight.read()):
            if r.finish_reason is not None:
                continue  # finished by the step before: this row was computed ahead and is dropped
            r.accept(tok, eos_ids)
            got.append(r)
            if r.finish_reason:  # free now: a later step that reuses its blocks runs after the one in flight
                cache.allocator.release(r.cached.block_table)
                r.cached.block_table = []
        yield got
        if nxt is None:  # every request is done, or the next step did not fit: the plain loop takes over
            return [r for r in flight.requests if r.finish_reason is None]
        flight = nxt


def holding(leases: Sequence, steps: Iterator[list[Request]]) -> Iterator[list[Request]]:
    """``steps`` (a ``run``) over leased graph caches (``GraphedDecoding.acquire``;
    None entries are skipped), giving the leases back when the run ends, fails
    or is abandoned (generator closed)."""
    with contextlib.ExitStack() as stack:
        for lease in leases:
            if lease is not None:
                stack.enter_context(lease)
        yield from steps
