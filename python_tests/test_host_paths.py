"""Host-side shortcuts of the decode loop (tools/host_overhead.py measures
them) give what the straightforward code they replace gives."""

from __future__ import annotations

import random

import pytest
import torch

from fastllm.block_manager import BlockManager, SequenceBlocks
from fastllm.cache import CachedSequence, KVCache, append_one_slot, append_slots
from fastllm.config import GenerationConfig
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
