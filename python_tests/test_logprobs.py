"""Log-probabilities of generated tokens: equal to transformers' raw
log_softmax whatever the sampling parameters; top-k alternatives sorted, ties
by lower id; aligned 1:1 with token_ids; the same from LLMEngine (mixed
batches, preemption) and speculative decoding; bad values refused. Prompt
logprobs (the prompt's own tokens scored): the same, from Model.generate and
from LLMEngine under chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from fastllm import GenerationConfig, Model
from fastllm.config import TokenLogprob
from fastllm.engine import LLMEngine
from fastllm.logprobs import raw_logprobs, token_logprobs

PROMPTS = ["ROMEO: But soft", "JULIET: O", "Café 日本"]
SAMPLED = dict(temperature=0.7, top_k=30, top_p=0.8, min_p=0.05, repetition_penalty=1.3, seed=11)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("logprobs")
    hf = make_checkpoint(path, "llama3")
    return hf, Model.from_pretrained(path, device="cpu")


def hf_logprobs(hf, out) -> torch.Tensor:
    """transformers' log_softmax at every generated position: [len(token_ids), V]."""
    ids = out.prompt_token_ids + out.token_ids[:-1]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, len(out.prompt_token_ids) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches_reference(out, ref: torch.Tensor, k: int, atol: float = 1e-4) -> None:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == ref.shape[0]
    for lp, tok, row in zip(out.logprobs, out.token_ids, ref):
        assert isinstance(lp, TokenLogprob) and lp.token_id == tok
        assert lp.logprob == pytest.approx(row[tok].item(), abs=atol)
        assert lp.rank == 1 + int((row > row[tok]).sum())  # the checkpoint's logits have no ties
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        want = row.topk(k)
        assert [i for i, _ in lp.top] == want.indices.tolist()  # the checkpoint's logits have no ties
        assert values == pytest.approx(want.values.tolist(), abs=atol)


def test_greedy_logprobs_equal_transformers(pair):
    hf, model = pair
    out = model.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True, logprobs=5)
    ref = hf_logprobs(hf, out)
    assert_matches_reference(out, ref, 5)
    for lp in out.logprobs:  # greedy: the generated token is the most likely one
        assert lp.top[0] == (lp.token_id, lp.logprob)
    assert model.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True).token_ids == out.token_ids


def test_sampled_logprobs_are_raw_and_do_not_change_the_draw(pair):
    hf, model = pair
    out = model.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, logprobs=3, **SAMPLED)
    ref = hf_logprobs(hf, out)
    assert_matches_reference(out, ref, 3)
    # the processed distribution would give other numbers: the test can tell them apart
    tempered = torch.log_softmax(ref / SAMPLED["temperature"], dim=-1)
    assert max(abs(lp.logprob - tempered[i, lp.token_id].item()) for i, lp in enumerate(out.logprobs)) > 0.1
    assert any(lp.top[0][0] != lp.token_id for lp in out.logprobs)  # some draws were not the argmax
    plain = model.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, **SAMPLED)
    assert plain.token_ids == out.token_ids and plain.logprobs is None


def test_k_zero_batch_and_config(pair):
    hf, model = pair
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True, logprobs=0)
    outs = model.generate(PROMPTS, cfg)
    for out in outs:
        assert [lp.top for lp in out.logprobs] == [[]] * 10
        ref = hf_logprobs(hf, out)
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(
            [ref[i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-4)
    assert model.generate(PROMPTS[0], max_new_tokens=3).logprobs is None


def test_chat_carries_logprobs_and_stream_text_is_unchanged(pair):
    _, model = pair
    messages = [{"role": "user", "content": "Who art thou?"}]
    out = model.chat(messages, max_new_tokens=12, ignore_eos=True, logprobs=2)
    assert len(out.logprobs) == len(out.token_ids) == 12
    assert "".join(model.chat(messages, stream=True, max_new_tokens=12, ignore_eos=True, logprobs=2)) == out.text


def test_stop_string_keeps_logprobs_of_every_generated_token(pair):
    _, model = pair
    full = model.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True, logprobs=1)
    stop = full.text[12:15]
    out = model.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True, logprobs=1, stop=[stop])
    assert out.finish_reason == "stop" and len(out.token_ids) < 40
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert out.logprobs == full.logprobs[: len(out.token_ids)]


# --------------------------------------------------------------- top-k rule
def _stable_top(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The reference order: descending, ties by lower id (a stable sort)."""
    vals, ids = torch.sort(row, descending=True, stable=True)
    return list(zip(ids[:k].tolist(), vals[:k].tolist()))


def test_ties_sort_by_lower_token_id():
    logits = torch.tensor([[0.0, 1.0, 2.0, 1.0, 1.0, 2.0],  # ties inside the top-2 and across the k=3 boundary
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
                           [9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    raw = raw_logprobs(logits, [3, 2, None])
    got = token_logprobs(raw, [4, 3, 0])
    assert got[2] is None  # that row did not ask
    lp = torch.log_softmax(logits, dim=-1)
    assert [i for i, _ in got[0].top] == [2, 5, 1] and got[0].logprob == pytest.approx(lp[0, 4].item())
    assert [i for i, _ in got[1].top] == [0, 1]
    g = torch.Generator().manual_seed(0)
    many = torch.randint(0, 4, (7, 50), generator=g).float()  # integer logits: ties everywhere
    ks = [0, 1, 2, 5, 11, 20, 3]
    got = token_logprobs(raw_logprobs(many, ks), [0] * 7)
    lps = torch.log_softmax(many, dim=-1)
    for r, k in enumerate(ks):
        assert got[r].top == [(i, pytest.approx(v)) for i, v in _stable_top(lps[r], k)]


def test_no_row_asks_means_no_work():
    assert raw_logprobs(torch.zeros(3, 8), [None, None, None]) is None
    assert token_logprobs(None, [1, 2, 3]) == [None, None, None]


# --------------------------------------------------------- engine, speculative
def test_engine_mixed_batch_equals_model_generate(pair):
    _, model = pair
    asks = [dict(logprobs=3), dict(), dict(logprobs=0, **SAMPLED), dict(**SAMPLED), dict(logprobs=20, **SAMPLED)]
    prompts = [PROMPTS[i % 3] for i in range(len(asks))]
    engine = LLMEngine(model, num_blocks=14, block_size=4)  # small enough to preempt
    ids = [engine.add_request(p, max_new_tokens=20, ignore_eos=True, **a) for p, a in zip(prompts, asks)]
    steps: dict[int, list] = {i: [] for i in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert len(out.token_ids) == 1  # no draft: one token per step
            steps[out.request_id].extend(out.logprobs)
            if out.finished:
                finals[out.request_id] = out.output
    assert engine.num_preemptions > 0
    for rid, p, a in zip(ids, prompts, asks):
        want = model.generate(p, max_new_tokens=20, ignore_eos=True, **a)
        got = finals[rid]
        assert got.token_ids == want.token_ids
        if "logprobs" not in a:
            assert got.logprobs is None and steps[rid] == []
            continue
        assert steps[rid] == got.logprobs  # each step's entry, in order, is the final list
        for g, w in zip(got.logprobs, want.logprobs):
            assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert [i for i, _ in g.top] == [i for i, _ in w.top]


@pytest.mark.parametrize("params", [dict(), SAMPLED], ids=["greedy", "sampled"])
def test_speculative_logprobs_are_the_targets_raw_ones(tmp_path, pair, params):
    hf, model = pair
    make_checkpoint(tmp_path, "qwen2")
    draft = Model.from_pretrained(tmp_path, device="cpu")
    spec = model.generate(PROMPTS, max_new_tokens=25, ignore_eos=True, logprobs=4, draft_model=draft,
                          num_speculative_tokens=3, **params)
    for out in spec:
        assert out.num_draft_tokens > 0
        assert_matches_reference(out, hf_logprobs(hf, out), 4)
    if not params:  # greedy: the same tokens and logprobs as without a draft
        plain = model.generate(PROMPTS, max_new_tokens=25, ignore_eos=True, logprobs=4)
        for a, b in zip(plain, spec):
            assert a.token_ids == b.token_ids
            assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-4)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("bad", [True, False, -1, 21, 2.0, "3"])
def test_bad_logprobs_rejected(pair, bad, name):
    _, model = pair
    with pytest.raises(ValueError, match=rf"{name} must be None or an int in \[0, 20\]"):
        model.generate(PROMPTS[0], max_new_tokens=2, **{name: bad})
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**{name: bad}).validate()


# ----------------------------------------------------------- prompt logprobs
LONG = "ROMEO: But soft, what light through yonder window breaks? It is the east"


def hf_prompt_logprobs(hf, prompt_ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax at prompt positions 0..n-2: row j scores prompt token j + 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_prompt_matches(out, ref: torch.Tensor, k: int, atol: float = 1e-4) -> None:
    lps, ids = out.prompt_logprobs, out.prompt_token_ids
    assert lps is not None and len(lps) == len(ids) == ref.shape[0] + 1
    assert lps[0] is None  # nothing predicts the first token
    for lp, tok, row in zip(lps[1:], ids[1:], ref):
        assert isinstance(lp, TokenLogprob) and lp.token_id == tok
        assert lp.logprob == pytest.approx(row[tok].item(), abs=atol)
        assert lp.rank == 1 + int((row > row[tok]).sum())
        want = row.topk(k)
        assert [i for i, _ in lp.top] == want.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=atol)


def assert_same_prompt_logprobs(got, want, atol: float = 1e-5) -> None:
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=atol)
        assert [i for i, _ in g.top] == [i for i, _ in w.top]


@pytest.mark.parametrize("params", [dict(), SAMPLED], ids=["greedy", "sampled"])
def test_prompt_logprobs_equal_transformers(pair, params):
    hf, model = pair
    out = model.generate(LONG, max_new_tokens=6, ignore_eos=True, prompt_logprobs=5, logprobs=2, **params)
    assert len(out.prompt_token_ids) > 10
    assert_prompt_matches(out, hf_prompt_logprobs(hf, out.prompt_token_ids), 5)
    assert_matches_reference(out, hf_logprobs(hf, out), 2)  # the generated tokens' logprobs are unchanged
    plain = model.generate(LONG, max_new_tokens=6, ignore_eos=True, **params)
    assert plain.token_ids == out.token_ids and plain.prompt_logprobs is None


def test_prompt_logprobs_batch_ids_and_one_token_prompt(pair):
    hf, model = pair
    ids = model.tokenizer.encode(PROMPTS[1])
    outs = model.generate([PROMPTS[0], ids, PROMPTS[2], ids[:1]], max_new_tokens=3, prompt_logprobs=0)
    for out in outs[:3]:
        assert_prompt_matches(out, hf_prompt_logprobs(hf, out.prompt_token_ids), 0)
        assert all(lp.top == [] for lp in out.prompt_logprobs[1:])
    assert outs[1].prompt_token_ids == ids
    assert outs[3].prompt_logprobs == [None]  # one token: nothing to score
    assert all(o.logprobs is None for o in outs)


def test_prompt_logprobs_are_computed_in_bounded_chunks(pair, monkeypatch):
    import fastllm.logprobs as logprobs_mod

    hf, model = pair
    want = model.generate(LONG, max_new_tokens=2, prompt_logprobs=3)
    monkeypatch.setattr(logprobs_mod, "PROMPT_SCORE_FLOATS", 3 * model.config.vocab_size)  # 3 rows a chunk
    got = model.generate(LONG, max_new_tokens=2, prompt_logprobs=3)
    assert_same_prompt_logprobs(got.prompt_logprobs, want.prompt_logprobs)
    assert got.token_ids == want.token_ids


def test_engine_prompt_logprobs_under_chunking_preemption_and_prefix_caching(pair):
    _, model = pair
    prompts = [LONG, LONG + " and", PROMPTS[0], LONG]
    asks = [dict(prompt_logprobs=3), dict(prompt_logprobs=1, **SAMPLED), dict(), dict(prompt_logprobs=0, logprobs=2)]
    engine = LLMEngine(model, num_blocks=24, block_size=4, max_num_batched_tokens=5)  # chunked, preempts
    ids = [engine.add_request(p, max_new_tokens=16, ignore_eos=True, **a) for p, a in zip(prompts, asks)]
    firsts: dict[int, list] = {}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id not in firsts:
                firsts[out.request_id] = out.prompt_logprobs
            else:
                assert out.prompt_logprobs is None  # only in a request's first output
            if out.finished:
                finals[out.request_id] = out.output
    assert engine.num_preemptions > 0
    for rid, p, a in zip(ids, prompts, asks):
        want = model.generate(p, max_new_tokens=16, ignore_eos=True, **a)
        got = finals[rid]
        assert got.token_ids == want.token_ids
        if "prompt_logprobs" not in a:
            assert got.prompt_logprobs is None and firsts[rid] is None
            continue
        assert firsts[rid] == got.prompt_logprobs
        assert_same_prompt_logprobs(got.prompt_logprobs, want.prompt_logprobs)


def test_engine_scores_a_cached_prompt_and_still_caches_it(pair):
    _, model = pair
    engine = LLMEngine(model, num_blocks=64, block_size=4)

    def run(**params):
        rid = engine.add_request(LONG, max_new_tokens=4, ignore_eos=True, **params)
        hits = engine.blocks.hit_tokens
        outs = {}
        while engine.has_unfinished():
            outs.update((o.request_id, o.output) for o in engine.step() if o.finished)
        return outs[rid], engine.blocks.hit_tokens - hits

    first, hit = run()
    assert hit == 0
    scored, hit = run(prompt_logprobs=2)
    assert hit == 0  # its KV was cached, but the prompt's logits are needed: computed again
    assert_same_prompt_logprobs(scored.prompt_logprobs, model.generate(LONG, max_new_tokens=4,
                                                                       prompt_logprobs=2).prompt_logprobs)
    again, hit = run()
    n = len(first.prompt_token_ids)
    assert hit == (n - 1) // 4 * 4  # a request that does not score its prompt reuses the cache
    assert first.token_ids == scored.token_ids == again.token_ids


def test_block_manager_plan_caps_reuse():
    from fastllm.block_manager import BlockManager, SequenceBlocks

    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(3, 20))  # 17 tokens: 4 full blocks before the last token's
    seq = SequenceBlocks()
    bm.admit(seq, bm.plan(tokens), len(tokens))
    seq.num_cached = len(tokens)
    bm.register(seq, tokens)
    assert len(bm.plan(tokens).reused) == 4
    assert [len(bm.plan(tokens, cap).reused) for cap in (0, 3, 4, 9, 16, 100)] == [0, 0, 1, 2, 4, 4]


@pytest.mark.parametrize("engine", [False, True], ids=["generate", "engine"])
def test_speculative_prompt_logprobs_equal_plain(tmp_path, pair, engine):
    hf, model = pair
    make_checkpoint(tmp_path, "qwen2")
    draft = Model.from_pretrained(tmp_path, device="cpu")
    if engine:
        eng = LLMEngine(model, num_blocks=32, block_size=4, max_num_batched_tokens=6, draft_model=draft,
                        num_speculative_tokens=3)
        rids = [eng.add_request(p, max_new_tokens=12, ignore_eos=True, prompt_logprobs=2) for p in PROMPTS]
        finals = {}
        while eng.has_unfinished():
            finals.update((o.request_id, o.output) for o in eng.step() if o.finished)
        spec = [finals[r] for r in rids]
    else:
        spec = model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True, prompt_logprobs=2, draft_model=draft,
                              num_speculative_tokens=3)
    for out in spec:
        assert out.num_draft_tokens > 0
        assert_prompt_matches(out, hf_prompt_logprobs(hf, out.prompt_token_ids), 2)
