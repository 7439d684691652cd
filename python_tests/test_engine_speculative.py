"""Speculative decoding inside the continuous-batching engine: every request
gets the tokens ``Model.generate`` gives it with the same draft (greedy: the
target's own tokens; seeded sampling: the same draws), whatever the batch
company, chunking, preemption or prefix-cache reuse; steps stream several
tokens at once; the draft's cache mirrors the target's blocks."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.engine import LLMEngine

PROMPTS = [
    "ROMEO: But soft, what light",
    "JULIET: O Romeo",
    "ROMEO: But soft, what light through yonder window",
    "Café 日本",
] * 2

SETTINGS = {
    "roomy": dict(),
    "preempting": dict(num_blocks=20, block_size=4),
    "chunked": dict(max_num_seqs=3, max_num_batched_tokens=9, block_size=4),
    "no-prefix-cache": dict(num_blocks=24, block_size=4, enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def models(spec_models):
    return spec_models


def _run(engine: LLMEngine, prompts, **params):
    """Step the engine to the end; returns (outputs in order, StepOutputs per request)."""
    ids = [engine.add_request(p, seed_index=i, **params) for i, p in enumerate(prompts)]
    steps: dict[int, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            steps[out.request_id].append(out)
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    return [steps[i][-1].output for i in ids], [steps[i] for i in ids]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_equals_the_target_alone(models, setting):
    target, draft = models
    want = target.generate(PROMPTS, max_new_tokens=30, ignore_eos=True)
    engine = LLMEngine(target, draft_model=draft, num_speculative_tokens=3, **SETTINGS[setting])
    got, steps = _run(engine, PROMPTS, max_new_tokens=30, ignore_eos=True)
    assert [(o.token_ids, o.text) for o in got] == [(o.token_ids, o.text) for o in want]
    for out, pieces in zip(got, steps):
        assert 0 <= out.num_accepted_draft_tokens <= out.num_draft_tokens > 0
        assert [t for p in pieces for t in p.token_ids] == out.token_ids  # steps add up to the output
        assert "".join(p.text for p in pieces) == out.text
        assert sum(p.finished for p in pieces) == 1 and pieces[-1].finished
    if setting in ("preempting", "no-prefix-cache"):
        assert engine.num_preemptions > 0
    if setting in ("preempting", "chunked"):
        assert engine.prefix_cache_hit_rate > 0.2  # the repeated prompts come from the cache


@pytest.mark.parametrize("setting", ["roomy", "preempting", "chunked"])
def test_seeded_sampling_equals_model_generate_with_the_draft(models, setting):
    target, draft = models
    params = dict(max_new_tokens=25, temperature=0.9, top_k=40, seed=5, stop=["e "], draft_model=draft,
                  num_speculative_tokens=4)
    want = target.generate(PROMPTS, **params)
    engine = LLMEngine(target, draft_model=draft, num_speculative_tokens=4, **SETTINGS[setting])
    got, _ = _run(engine, PROMPTS, **{k: v for k, v in params.items() if k not in ("draft_model", "num_speculative_tokens")})
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    assert [o.num_draft_tokens for o in got] == [o.num_draft_tokens for o in want]
    if setting == "preempting":
        assert engine.num_preemptions > 0


def test_self_draft_accepts_everything_and_steps_carry_several_tokens(models):
    target, _ = models
    k, n = 4, 23
    engine = LLMEngine(target, draft_model=target, num_speculative_tokens=k, block_size=4)
    got, steps = _run(engine, PROMPTS[:3], max_new_tokens=n, ignore_eos=True)
    want = target.generate(PROMPTS[:3], max_new_tokens=n, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for out, pieces in zip(got, steps):
        assert out.num_accepted_draft_tokens == out.num_draft_tokens == n - -(-n // (k + 1))
        assert [len(p.token_ids) for p in pieces] == [k + 1] * (n // (k + 1)) + [n % (k + 1)] * (n % (k + 1) > 0)


def test_logprobs_stream_with_their_tokens(models):
    target, draft = models
    engine = LLMEngine(target, draft_model=draft, num_speculative_tokens=3)
    got, steps = _run(engine, PROMPTS[:2], max_new_tokens=15, ignore_eos=True, logprobs=2)
    want = target.generate(PROMPTS[:2], max_new_tokens=15, ignore_eos=True, logprobs=2)
    for out, w, pieces in zip(got, want, steps):
        assert out.token_ids == w.token_ids
        assert [lp for p in pieces for lp in p.logprobs] == out.logprobs
        assert all([lp.token_id for lp in p.logprobs] == p.token_ids for p in pieces)
        for g, x in zip(out.logprobs, w.logprobs):
            assert g.logprob == pytest.approx(x.logprob, abs=1e-5)


def test_prompts_past_the_drafts_context(models, tmp_path):
    """A prompt longer than the draft's context decodes without proposals and
    its blocks still go to the prefix cache; shorter ones speculate."""
    target = models[0]
    make_checkpoint(tmp_path, "qwen2", max_position_embeddings=24)
    short = Model.from_pretrained(tmp_path, device="cpu")
    long_prompt = "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name"
    assert len(target.tokenizer.encode(long_prompt)) > 24
    prompts = [long_prompt, PROMPTS[1], long_prompt + "; or, if thou wilt not"]
    want = target.generate(prompts, max_new_tokens=20, ignore_eos=True)
    engine = LLMEngine(target, draft_model=short, num_speculative_tokens=3, block_size=4, max_num_batched_tokens=16)
    got, _ = _run(engine, prompts, max_new_tokens=20, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[0].num_draft_tokens == 0 and got[1].num_draft_tokens > 0
    assert engine.blocks.hit_tokens >= 4 * (len(target.tokenizer.encode(long_prompt)) // 4 - 1)


def test_bad_drafts(models, tmp_path):
    target, draft = models
    for k in (0, 17, 2.5):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            LLMEngine(target, draft_model=draft, num_speculative_tokens=k)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine(target, draft_model=draft, num_speculative_tokens=4, max_num_batched_tokens=4)
    with pytest.raises(TypeError, match="draft_model"):
        LLMEngine(target, draft_model="draft")
    make_checkpoint(tmp_path, "llama", tokenizer=False, vocab_size=40)
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, draft_model=Model.from_pretrained(tmp_path, device="cpu"))
