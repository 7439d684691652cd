"""Speculative decoding: greedy output identical to the target alone; sampled
output distributed exactly as the target's (chi-square against the exact
distribution over the first tokens); seeds, streaming and bad drafts."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from checkpoints import make_checkpoint
from conftest import assert_greedy_equal_up_to_ties, logprob_error
from fastllm import GenerationConfig, Model
from fastllm.ops.reference import sampling_mask
from fastllm.sampling import LogitContext, apply_logit_processors

PROMPTS = ["ROMEO: But soft", "JULIET: O", "Café 日本"]
SMALL_VOCAB = 12


@pytest.fixture(scope="module")
def models(spec_models):
    return spec_models


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 12-token target and draft: small enough to enumerate every continuation."""
    root = tmp_path_factory.mktemp("spec_small")
    make_checkpoint(root / "target", "llama3", tokenizer=False, vocab_size=SMALL_VOCAB)
    make_checkpoint(root / "draft", "llama", tokenizer=False, vocab_size=SMALL_VOCAB)
    return Model.from_pretrained(root / "target", device="cpu"), Model.from_pretrained(root / "draft", device="cpu")


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("draft_is_target", [False, True], ids=["other-draft", "self-draft"])
def test_greedy_output_equals_target_alone(models, k, draft_is_target):
    target, draft = models
    draft = target if draft_is_target else draft
    plain = target.generate(PROMPTS, max_new_tokens=37, ignore_eos=True)
    spec = target.generate(PROMPTS, max_new_tokens=37, ignore_eos=True, draft_model=draft, num_speculative_tokens=k)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == "length"
        assert 0 <= b.num_accepted_draft_tokens <= b.num_draft_tokens > 0
        if draft_is_target:  # the target agrees with itself: every proposal is accepted
            assert b.num_accepted_draft_tokens == b.num_draft_tokens
            assert b.num_draft_tokens == 37 - -(-37 // (k + 1))  # one bonus token per round


def test_greedy_with_penalty_and_stops_equals_target_alone(models):
    target, draft = models
    params = dict(max_new_tokens=40, repetition_penalty=1.3, stop=["e"], stop_token_ids=[7])
    plain = target.generate(PROMPTS, **params)
    spec = target.generate(PROMPTS, **params, draft_model=draft, num_speculative_tokens=4)
    assert [(o.token_ids, o.text, o.finish_reason) for o in spec] == [
        (o.token_ids, o.text, o.finish_reason) for o in plain
    ]


def test_draft_with_a_shorter_context(models, tmp_path):
    """Past the draft's context the rounds carry no proposals; output unchanged."""
    target = models[0]
    make_checkpoint(tmp_path, "qwen2", max_position_embeddings=24)
    short = Model.from_pretrained(tmp_path, device="cpu")
    prompt = target.tokenizer.encode(PROMPTS[0])  # 30 new tokens run well past 24 positions
    plain = target.generate(prompt, max_new_tokens=30, ignore_eos=True)
    spec = target.generate(prompt, max_new_tokens=30, ignore_eos=True, draft_model=short, num_speculative_tokens=4)
    assert spec.token_ids == plain.token_ids
    assert 0 < spec.num_draft_tokens <= 4 * (24 + 1 - len(prompt))


def test_seeded_sampling_repeats_and_stream_matches(models):
    target, draft = models
    params = dict(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=11, draft_model=draft)
    a, b = target.generate(PROMPTS, **params), target.generate(PROMPTS, **params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert "".join(target.stream(PROMPTS[0], **params)) == a[0].text
    c = target.generate(PROMPTS, **{**params, "seed": 12})
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_chat_takes_a_draft(models):
    target, draft = models
    messages = [{"role": "user", "content": "Who is there?"}]
    plain = target.chat(messages, max_new_tokens=12)
    assert target.chat(messages, max_new_tokens=12, draft_model=draft).token_ids == plain.token_ids


def _exact_joint(model: Model, prompt: list[int], depth: int, params: dict) -> torch.Tensor:
    """P(t_1..t_depth) under the model with the sampling transforms: [V] * depth."""
    V = model.config.vocab_size
    joint = torch.ones(())
    n = params.get("temperature", 1.0)
    for level in range(depth):
        prefixes = list(itertools.product(range(V), repeat=level))
        rows = [prompt + list(p) for p in prefixes]
        logits = model.forward(torch.tensor(rows))[:, -1].clone()  # [V**level, V]; clone: out of inference mode
        cfg = GenerationConfig(**{k: v for k, v in params.items() if k.endswith("_penalty") or k == "logit_bias"})
        apply_logit_processors(logits, [LogitContext(r, list(p)) for r, p in zip(rows, prefixes)], [cfg] * len(rows))
        full = lambda v: torch.full((len(rows),), float(v))  # noqa: E731
        _, probs = sampling_mask(logits, full(n), torch.full((len(rows),), params.get("top_k", 0)),
                                 full(params.get("top_p", 1.0)), full(params.get("min_p", 0.0)))
        joint = joint.reshape(-1, 1) * probs.double()
        joint = joint.reshape([V] * (level + 1))
    return joint


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test with cells of expected count < 5 pooled into one."""
    n = counts.sum().item()
    expected = probs.flatten() * n
    counts = counts.flatten().double()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)]).numpy()
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)]).numpy()
    if exp[-1] == 0:
        assert obs[-1] == 0, "tokens drawn outside the support"
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.5),
        dict(temperature=1.0, top_k=4),
        dict(temperature=1.2, top_p=0.7, min_p=0.05),
        dict(temperature=1.3, repetition_penalty=1.5),
        dict(temperature=1.2, frequency_penalty=0.8, presence_penalty=-0.4, logit_bias={2: 1.5, 5: -2.0}),
    ],
    ids=["temperature", "top_k", "top_p-min_p", "penalty", "frequency-presence-bias"],
)
def test_sampled_tokens_follow_the_target_distribution(small_vocab, params):
    target, draft = small_vocab
    prompt, depth, n = [3, 5, 7], 4, 3000
    outs = target.generate([prompt] * n, max_new_tokens=depth, ignore_eos=True, seed=0, draft_model=draft,
                           num_speculative_tokens=3, **params)
    proposed = sum(o.num_draft_tokens for o in outs)
    accepted = sum(o.num_accepted_draft_tokens for o in outs)
    assert 0 < accepted < proposed  # both the accept and the residual paths ran
    drawn = torch.tensor([o.token_ids for o in outs])  # [n, depth]
    joint = _exact_joint(target, prompt, depth, params)
    V = SMALL_VOCAB
    assert bool((joint.flatten()[drawn @ torch.tensor([V**3, V**2, V, 1])] > 0).all()), "a sequence outside the support"
    first_two = torch.bincount(drawn[:, 0] * V + drawn[:, 1], minlength=V * V)
    assert _chi2_pvalue(first_two, joint.sum(dim=(2, 3))) > 1e-3
    for pos in (2, 3):
        marginal = joint.sum(dim=tuple(d for d in range(depth) if d != pos))
        assert _chi2_pvalue(torch.bincount(drawn[:, pos], minlength=V), marginal) > 1e-3


def test_the_test_detects_a_wrong_distribution(small_vocab):
    """The chi-square above rejects the draft's own distribution."""
    target, draft = small_vocab
    prompt, params = [3, 5, 7], dict(temperature=1.5)
    outs = draft.generate([prompt] * 3000, max_new_tokens=1, ignore_eos=True, seed=0, **params)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=SMALL_VOCAB)
    assert _chi2_pvalue(counts, _exact_joint(target, prompt, 1, params)) < 1e-6


def test_bad_drafts(models, small_vocab):
    target, draft = models
    with pytest.raises(TypeError, match="draft_model must be a fastllm.Model"):
        target.generate("ROMEO:", draft_model="path/to/draft")
    for k in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            target.generate("ROMEO:", draft_model=draft, num_speculative_tokens=k)
    with pytest.raises(ValueError, match="share the model's tokenizer"):
        target.generate("ROMEO:", draft_model=small_vocab[1])
    with pytest.raises(ValueError, match="share the model's tokenizer"):
        next(target.stream("ROMEO:", draft_model=small_vocab[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_gpu(models, dtype):
    """On a GPU: greedy output equals the target's own (fp32 exactly; bf16 up to
    near-ties: the verify pass attends with the prefill kernel, plain decoding
    with the decode kernel, and the random-weight models are tie-prone), sampling
    runs and repeats with a seed."""
    target = Model.from_pretrained(models[0].path, device="cuda", dtype=dtype)
    draft = Model.from_pretrained(models[1].path, device="cuda", dtype=dtype)
    greedy = dict(max_new_tokens=24, ignore_eos=True, temperature=0.0, logprobs=5)
    plain = target.generate(PROMPTS, **greedy)
    spec = target.generate(PROMPTS, **greedy, draft_model=draft, num_speculative_tokens=4)
    if dtype == "float32":
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    else:
        margin = 3 * logprob_error(models[0].path, dtype, plain[0].token_ids)
        assert_greedy_equal_up_to_ties(plain, spec, margin)
    params = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, draft_model=draft)
    a, b = target.generate(PROMPTS, **params), target.generate(PROMPTS, **params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(0 <= t < target.config.vocab_size for o in a for t in o.token_ids)
