"""Host-side shortcuts of the decode loop (tools/host_overhead.py measures
them) give what the straightforward code they replace gives."""

from __future__ import annotations

import random

import pytest
import torch

from fastllm.block_manager import BlockManager, SequenceBlocks
from fastllm.cache import CachedSequence, KVCache, append_one_slot, append_slots
from fastllm.config import GenerationConfig
from fastllm import generate
from fastllm.generate import Request


def _request(prompt=(), output=(), stop=()) -> Request:
    r = Request(list(prompt), GenerationConfig(stop=list(stop)), seed=0, max_new_tokens=100)
    r.output_ids = list(output)
    return r


def _stop_prefix_len_by_scan(text: str, stops: list[str]) -> int:
    """Every tail of the text, longest first (the shortcut's definition)."""
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


def test_stop_prefix_len_equals_a_scan_of_every_tail():
    rng = random.Random(0)
    alphabet = "ab é\n日"
    for _ in range(3000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        r = _request(stop=stops)
        r.text = text
        assert r._stop_prefix_len() == _stop_prefix_len_by_scan(text, stops), (text, stops)
    r = _request()
    r.text = "anything"
    assert r._stop_prefix_len() == 0  # no stop strings


def test_pending_text_holds_back_a_possible_stop_string():
    r = _request(stop=["STOP", "xyz"])
    r.text = "hello ST"
    assert r.pending_text() == "hello "
    r.text += "x"  # "STx" can no longer become "STOP"; "x" may still become "xyz"
    assert r.pending_text() == "ST"
    r.finish_reason = "length"
    assert r.pending_text() == "x"


def test_token_range_equals_slicing_token_ids():
    for prompt, output in (([], []), ([1, 2, 3], []), ([], [7, 8]), ([1, 2, 3], [7, 8, 9, 10])):
        r = _request(prompt, output)
        ids = r.token_ids()
        assert r.num_tokens() == len(ids)
        for a in range(len(ids) + 3):
            for b in range(len(ids) + 3):
                assert r.token_range(a, b) == ids[a:b], (prompt, output, a, b)
    with pytest.raises(ValueError):
        _request([1], [2]).token_range(-1, 2)


def test_append_one_slot_equals_append_slots():
    def cache():
        return KVCache(1, 64, 1, 4, torch.float32, torch.device("cpu"), block_size=4, reserved_blocks=1)

    c1, c2 = cache(), cache()
    lengths = [0, 3, 4, 5, 7, 8, 15]
    seqs1, seqs2 = [CachedSequence() for _ in lengths], [CachedSequence() for _ in lengths]
    for ss, c in ((seqs1, c1), (seqs2, c2)):
        for s, n in zip(ss, lengths):
            append_slots(c, s, n)
    seqs1[1].block_table.pop()  # a table shorter than its length needs: more than one block to allocate
    seqs2[1].block_table.pop()
    for _ in range(6):
        want = [append_slots(c1, s, 1)[0] for s in seqs1]
        pos = [s.num_cached - 1 for s in seqs1]
        assert append_one_slot(c2, seqs2) == (want, pos)
        assert [(s.block_table, s.num_cached) for s in seqs2] == [(s.block_table, s.num_cached) for s in seqs1]
        assert c2.allocator.num_free == c1.allocator.num_free


@pytest.mark.parametrize("caching", [True, False])
def test_has_unregistered_says_whether_register_would_register(caching):
    bm = BlockManager(16, 4, enable_prefix_caching=caching)
    seq = SequenceBlocks()
    tokens = list(range(30))
    bm.admit(seq, bm.plan(tokens[:3]), 3)
    for n in range(3, 30):
        bm.grow(seq, n)
        seq.num_cached = n
        for upto in (None, n - 5, n):
            before = len(seq.hashes)
            said = bm.has_unregistered(seq, upto)
            bm.register(seq, tokens[:n], upto)
            assert said == (len(seq.hashes) > before), (n, upto)


def test_a_plan_stands_exactly_when_planning_again_gives_it():
    """BlockManager.plan_stands (the engine keeps a waiting head's plan while
    it holds) against planning again, and BlockManager.version against what
    can_admit decides, over random admissions, growth, registrations (shared
    prefixes: a two-token vocabulary) and releases."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=24, block_size=2)
    running: list[tuple[SequenceBlocks, list[int]]] = []
    watched = []  # (tokens, limit, plan as it was made)
    stood = fell = 0
    for _ in range(3000):
        version = bm.version
        before = [(bm.plan(t, lim), bm.can_admit(bm.plan(t, lim))) for t, lim, _ in watched]
        op = rng.random()
        if op < 0.3 or not running:
            tokens = [rng.randint(0, 1) for _ in range(rng.randint(1, 9))]
            plan = bm.plan(tokens)
            if bm.can_admit(plan):
                seq = SequenceBlocks()
                bm.admit(seq, plan, len(tokens))
                running.append((seq, tokens))
        elif op < 0.8:
            seq, tokens = rng.choice(running)
            tokens.extend(rng.randint(0, 1) for _ in range(rng.randint(1, 3)))
            if bm.grow(seq, len(tokens)):
                seq.num_cached = len(tokens)
                bm.register(seq, tokens)
            else:
                del tokens[seq.num_cached :]
        else:
            seq, _ = running.pop(rng.randrange(len(running)))
            bm.release(seq)
        if bm.version == version:  # nothing changed: neither does any plan nor verdict
            assert [(bm.plan(t, lim), bm.can_admit(bm.plan(t, lim))) for t, lim, _ in watched] == before
        for i, (tokens, limit, plan) in enumerate(watched):
            fresh = bm.plan(tokens, limit)
            if bm.plan_stands(plan):
                assert fresh == plan
                stood += 1
            else:
                assert fresh != plan
                watched[i] = (tokens, limit, fresh)
                fell += 1
        if len(watched) < 6:
            tokens = [rng.randint(0, 1) for _ in range(rng.randint(1, 12))]
            limit = rng.choice([None, None, rng.randint(0, 12)])
            watched.append((tokens, limit, bm.plan(tokens, limit)))
    assert stood > 1000 and fell > 100


class _Pieces:
    """An IncrementalDecoder stand-in: hands out a fixed piece per token, and one at flush."""

    def __init__(self, pieces: list[str], last: str):
        self.pieces, self.last = iter(pieces), last

    def feed(self, token: int) -> str:
        return next(self.pieces)

    def flush(self) -> str:
        return self.last


class _WholeText:
    """What Request did with its text before it kept pieces: ``text += piece``
    and every read on the whole text."""

    def __init__(self, stops: list[str]):
        self.text, self.emitted, self.stops, self.finish_reason = "", 0, stops, None

    def add(self, piece: str) -> bool:
        before = len(self.text)
        self.text += piece
        hits = [p for s in self.stops if (p := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.text, self.finish_reason = self.text[: min(hits)], "stop"
        return bool(hits)

    def pending_text(self) -> str:
        end = len(self.text) if self.finish_reason else len(self.text) - _stop_prefix_len_by_scan(self.text, self.stops)
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


@pytest.mark.parametrize("recent", [2, 5, 256])
def test_text_kept_in_pieces_reads_as_the_whole_text_did(monkeypatch, recent):
    """Request keeps its text as chunks and a short recent part and reads
    tails (stop strings, pending_text): the text, the streamed pieces and
    the finish reason are those of appending to one string and reading all
    of it (a small ``_RECENT`` sends tails across the chunks)."""
    monkeypatch.setattr(generate, "_RECENT", recent)
    rng = random.Random(recent)
    alphabet = "ab é\n日"
    for trial in range(1500):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 3))]
        n = rng.randint(1, 40)
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 1, 2, 3, 7]))) for _ in range(n)]
        last = rng.choice(["", "a", "é日"])
        r = Request([1], GenerationConfig(stop=stops), seed=0, max_new_tokens=n, decoder=_Pieces(pieces, last))
        want = _WholeText(stops)
        got_stream, want_stream = [], []
        for i, piece in enumerate(pieces):
            r.accept(100 + i, frozenset())
            if not want.add(piece) and i == n - 1:  # the last token by length: the decoder is flushed
                want.finish_reason = "length"
                want.add(last)
            assert r.finish_reason == want.finish_reason, (trial, i)
            if rng.random() < 0.7:  # streamed (the engine reads every step; generate() never does)
                got_stream.append(r.pending_text())
                want_stream.append(want.pending_text())
                assert got_stream[-1] == want_stream[-1], (trial, i, stops, pieces[: i + 1])
            if rng.random() < 0.1:
                assert r.text == want.text  # a whole read in between (joins the pieces)
            if r.finish_reason:
                break
        assert r.text == want.text and r.output().text == want.text, (trial, stops, pieces)
        assert r.pending_text() == want.pending_text()


def test_text_setter_and_tail(monkeypatch):
    monkeypatch.setattr(generate, "_RECENT", 2)
    r = _request()
    whole = ""
    for piece in ("ab", "", "cdé", "f", "ghijk", "l", "", "mn"):
        r._append_text(piece)
        whole += piece
        assert r._length == len(whole) and len(r._recent) < 4
        for k in range(len(whole) + 3):
            assert r._tail(k) == whole[max(0, len(whole) - k) :], (whole, k)
        assert r.text == whole
    assert r._chunks and len(r._chunks) == 1  # the whole read joined them
    r.text = "xy"
    assert r.text == "xy" and r._tail(5) == "xy" and r._length == 2 and not r._chunks
