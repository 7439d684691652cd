"""Continuous batching and prefix caching: the engine gives every request the
tokens Model.generate gives it, whatever the batch company, chunking,
preemption or cache reuse; the block manager's accounting."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.block_manager import BlockManager, SequenceBlocks, block_hash
from fastllm.engine import LLMEngine

PROMPTS = [
    "ROMEO: But soft, what light",
    "JULIET: O Romeo",
    "ROMEO: But soft, what light through yonder window",
    "Café 日本",
    "ROMEO: But soft",
] * 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    make_checkpoint(path, "llama3")
    return Model.from_pretrained(path, device="cpu")


SETTINGS = {
    "roomy": dict(),
    "preempting": dict(num_blocks=16, block_size=4),
    "chunked": dict(max_num_seqs=2, max_num_batched_tokens=7, block_size=4),
    "no-prefix-cache": dict(num_blocks=20, block_size=4, enable_prefix_caching=False),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_outputs_equal_model_generate(model, setting):
    want = model.generate(PROMPTS, max_new_tokens=40, ignore_eos=True)
    engine = LLMEngine(model, **SETTINGS[setting])
    got = engine.generate(PROMPTS, max_new_tokens=40, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    if setting in ("preempting", "no-prefix-cache"):
        assert engine.num_preemptions > 0
    if setting in ("preempting", "chunked"):
        assert engine.prefix_cache_hit_rate > 0.2  # the repeated prompts come from the cache
    if setting == "no-prefix-cache":
        assert engine.prefix_cache_hit_rate == 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_moe_models_in_the_engine_equal_model_generate(tmp_path, arch):
    """Mixture-of-experts models (Qwen2-MoE with its shared expert) batch,
    chunk and preempt in the engine like the dense ones."""
    make_checkpoint(tmp_path, arch)
    moe = Model.from_pretrained(tmp_path, device="cpu")
    want = [o.token_ids for o in moe.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    for setting in ("preempting", "chunked"):
        engine = LLMEngine(moe, **SETTINGS[setting])
        assert [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)] == want, setting
        assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
        assert engine.num_preemptions > 0 if setting == "preempting" else engine.prefix_cache_hit_rate > 0.2


def test_seeded_sampling_survives_preemption(model):
    params = dict(max_new_tokens=30, temperature=0.9, top_k=40, seed=5, stop=["e "])
    want = model.generate(PROMPTS, **params)
    engine = LLMEngine(model, num_blocks=16, block_size=4)
    got = engine.generate(PROMPTS, **params)
    assert engine.num_preemptions > 0
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]


def test_requests_joining_a_running_batch(model):
    engine = LLMEngine(model, block_size=4)
    first = engine.add_request(PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    pieces: dict[int, list[str]] = {first: []}
    outputs = {}
    later = []
    for step in range(60):
        if step in (3, 7):  # join while the first is decoding
            rid = engine.add_request(PROMPTS[2 if step == 3 else 1], max_new_tokens=15, ignore_eos=True)
            later.append(rid)
            pieces[rid] = []
        for out in engine.step():
            pieces[out.request_id].append(out.text)
            if out.finished:
                outputs[out.request_id] = out.output
        if not engine.has_unfinished():
            break
    assert set(outputs) == {first, *later}
    for rid, prompt, n in [(first, PROMPTS[0], 20), (later[0], PROMPTS[2], 15), (later[1], PROMPTS[1], 15)]:
        alone = model.generate(prompt, max_new_tokens=n, ignore_eos=True)
        assert outputs[rid].token_ids == alone.token_ids
        assert "".join(pieces[rid]) == alone.text  # streamed pieces add up to the text
    # PROMPTS[2] starts with PROMPTS[0]: its first blocks came from the cache
    assert engine.blocks.hit_tokens >= 4 * (len(model.tokenizer.encode(PROMPTS[0])) // 4 - 1)


def test_prefix_cache_reuse_across_calls(model):
    engine = LLMEngine(model, block_size=4)
    system = "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. "
    a = engine.generate([system + "ROMEO: Shall I hear more"], max_new_tokens=8)[0]
    before = engine.blocks.hit_tokens
    b = engine.generate([system + "NURSE: Madam"], max_new_tokens=8)[0]
    shared = len(model.tokenizer.encode(system)) - 1
    assert engine.blocks.hit_tokens - before >= 4 * (shared // 4) - 4
    assert a.token_ids == model.generate(system + "ROMEO: Shall I hear more", max_new_tokens=8).token_ids
    assert b.token_ids == model.generate(system + "NURSE: Madam", max_new_tokens=8).token_ids


def test_abort_and_bad_input(model):
    engine = LLMEngine(model, block_size=4, num_blocks=20)
    rid = engine.add_request(PROMPTS[0], max_new_tokens=30)
    engine.step()
    assert engine.abort(rid) and not engine.abort(rid) and not engine.has_unfinished()
    assert engine.blocks.num_free == 20
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(PROMPTS[0], max_new_tokens=200)
    with pytest.raises(ValueError, match="one prompt"):
        engine.add_request(["a", "b"])
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("a", top_p=2.0)
    for bad in (dict(max_num_seqs=0), dict(block_size=0), dict(max_num_batched_tokens=True), dict(num_blocks=1.5),
                dict(num_blocks=True), dict(num_blocks=0)):
        with pytest.raises(ValueError, match="positive int"):
            LLMEngine(model, **bad)


@pytest.mark.parametrize("fail_at", [1, 2, 4])  # the first prompt chunk, a later chunk, a decode step
def test_a_failed_step_drops_the_running_requests(model, monkeypatch, fail_at):
    """A step that raises leaves the KV state of the sequences it ran unknown:
    they are dropped (blocks freed, nothing registered in the prefix cache),
    the waiting ones go on, and the engine still gives Model.generate's tokens."""
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_seqs=1, max_num_batched_tokens=7)
    params = dict(max_new_tokens=6, ignore_eos=True)
    first, queued = engine.add_request(PROMPTS[2], **params), engine.add_request(PROMPTS[1], **params)
    calls, forward = [0], model.network.forward

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("device error")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.network, "forward", failing)
    outs = []
    with pytest.raises(RuntimeError, match="device error") as info:
        for _ in range(fail_at):
            outs += engine.step()
    assert engine.failed_request_ids == [first] and f"[{first}]" in info.value.__notes__[0]
    assert engine.abort(first) is False  # gone
    while engine.has_unfinished():
        outs += engine.step()
    done = {o.request_id: o.output for o in outs if o.finished}
    assert set(done) == {queued} and done[queued].token_ids == model.generate(PROMPTS[1], **params).token_ids
    assert engine.blocks.num_free == 64
    again = engine.generate([PROMPTS[2]], **params)[0]  # its blocks were not cached half-written
    assert again.token_ids == model.generate(PROMPTS[2], **params).token_ids


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = SequenceBlocks(), SequenceBlocks()
    tokens = [5, 6, 7, 8, 9]
    plan = bm.plan(tokens)
    assert (plan.reused, plan.new) == ([], 3)
    bm.admit(a, plan, len(tokens))
    a.num_cached = 5
    bm.register(a, tokens)  # blocks 0 and 1 full: registered; the third holds one token
    assert len(a.hashes) == 2
    # the same prompt reuses the two full blocks; the one with the last token is computed
    plan = bm.plan(tokens)
    assert plan.reused == a.block_table[:2] and plan.new == 1
    bm.admit(b, plan, len(tokens))
    assert b.num_cached == 4 and bm.num_free == 2
    # a prompt ending exactly at a block boundary still computes its last block
    assert bm.plan([5, 6, 7, 8]).reused == a.block_table[:1]
    bm.release(a)
    assert bm.num_free == 3  # a's last block; the shared ones are still b's
    bm.release(b)
    assert bm.num_free == 6
    # released but registered: still hit, until handed out again
    assert bm.plan(tokens).reused == plan.reused
    c = SequenceBlocks()
    assert bm.grow(c, 12) and not bm.grow(c, 13)  # takes all six blocks, evicting the cached ones
    assert bm.plan(tokens).reused == []
    assert not bm.can_admit(bm.plan([1, 2, 3]))


def test_block_hash_is_sha256_of_the_whole_prefix():
    import hashlib
    from array import array

    a = block_hash(None, [1, 2, 3])
    assert a == hashlib.sha256(array("q", [1, 2, 3]).tobytes()).digest()
    assert block_hash(None, [3, 2, 1]) != a  # order matters
    assert block_hash(a, [4, 5, 6]) != block_hash(None, [4, 5, 6])  # so does the prefix before
    assert block_hash(a, [4, 5, 6]) == block_hash(block_hash(None, [1, 2, 3]), [4, 5, 6])
    # values Python's int hash folds together (mod 2**61 - 1) stay apart
    assert block_hash(None, [1]) != block_hash(None, [2**61])


def test_register_stops_at_the_tokens_kept():
    """A speculative round that finished early cached tokens the sequence did
    not keep: only blocks full of kept tokens are registered."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a = SequenceBlocks()
    bm.admit(a, bm.plan([1, 2, 3, 4, 5, 6]), 6)
    a.num_cached = 6
    bm.register(a, [1, 2, 3])  # 6 cached, 3 kept
    assert len(a.hashes) == 1
    bm.register(a, [1, 2, 3, 4, 5, 6], num_tokens=4)  # at most 4 of them
    assert len(a.hashes) == 2 and bm.plan([1, 2, 3, 4, 9]).reused == a.block_table[:2]


def _count_calls(monkeypatch, obj, name) -> list[int]:
    calls = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("free_by", ["finishing", "abort"])
def test_a_head_waiting_for_blocks_is_not_planned_again_until_they_free(model, monkeypatch, free_by):
    """While the cache is full and the waiting head cannot be admitted, steps
    that change no block or prefix-cache state do no admission work (the
    head's prompt is planned once, its verdict decided again only when the
    blocks change); the step after its blocks free up admits it."""
    engine = LLMEngine(model, num_blocks=10, block_size=4)
    big = list(range(10, 26))  # 16 tokens: 4 blocks, growing to 9 over 20 new tokens
    head = list(range(100, 124))  # 24 tokens: needs 6 blocks, never more than 5 free while `big` runs
    first = engine.add_request(big, max_new_tokens=20, ignore_eos=True)
    engine.step()  # prefill `big`
    second = engine.add_request(head, max_new_tokens=4, ignore_eos=True)
    plans = _count_calls(monkeypatch, engine.blocks, "plan")
    verdicts = _count_calls(monkeypatch, engine.blocks, "can_admit")
    changes, freed_at, admitted_at, step = 0, None, None, 1
    while admitted_at is None:
        version = engine.blocks.version
        outs = engine.step()
        step += 1
        if any(o.request_id == second for o in outs):
            admitted_at = step
            break
        assert engine.waiting and engine.waiting[0].id == second
        changes += engine.blocks.version != version  # big grew or registered a block: the verdict is stale
        if free_by == "abort" and step == 9:
            assert engine.abort(first)
            freed_at = step
        if any(o.request_id == first and o.finished for o in outs):
            freed_at = step
    assert freed_at is not None and admitted_at == freed_at + 1
    assert plans[0] == 1  # the head's plan stood while `big` grew: no prompt hashed again
    assert 0 < changes < step - 2 and verdicts[0] <= changes + 2  # decided again only when the blocks changed
    alone = model.generate(head, max_new_tokens=4, ignore_eos=True)
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                assert o.request_id == second and o.output.token_ids == alone.token_ids

