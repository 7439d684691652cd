"""Generation behaviour: stopping, streaming, seeds, chat and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import make_checkpoint
from fastllm import GenerationConfig, Model

PROMPTS = ["ROMEO: But soft", "JULIET: O", "Café 日本"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    make_checkpoint(path, "llama3")
    return Model.from_pretrained(path, device="cpu")


def test_text_is_decoded_token_ids(model):
    out = model.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    assert len(out.token_ids) == 30 and out.finish_reason == "length"
    assert out.text == model.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == model.tokenizer.encode(PROMPTS[0])


def test_stop_string_cuts_text(model):
    full = model.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
    text = full.text
    stop = text[12:15]
    assert stop and text.find(stop) >= 0
    out = model.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True, stop=[stop, "\x00never"])
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < 40


def test_stop_token_ids_and_eos(model):
    full = model.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True).token_ids
    tok = full[5]
    first = full.index(tok)
    out = model.generate(PROMPTS[1], max_new_tokens=20, stop_token_ids=[tok])
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    assert out.text == model.tokenizer.decode(out.token_ids) and out.text.endswith(model.tokenizer.decode([tok]))
    assert "".join(model.stream(PROMPTS[1], max_new_tokens=20, stop_token_ids=[tok])) == out.text
    saved = model.eos_ids
    try:
        model.eos_ids = frozenset({tok})
        assert model.generate(PROMPTS[1], max_new_tokens=20).token_ids == full[: first + 1]
        assert model.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True).token_ids == full
    finally:
        model.eos_ids = saved


@pytest.mark.parametrize(
    "params",
    [
        dict(max_new_tokens=25, ignore_eos=True),
        dict(max_new_tokens=25, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
        dict(max_new_tokens=25, temperature=1.2, top_k=20, min_p=0.05, seed=4, ignore_eos=True),
    ],
)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_equals_generate(model, prompt, params):
    full = model.generate(prompt, **params)
    pieces = list(model.stream(prompt, **params))
    assert "".join(pieces) == full.text
    assert all(pieces)
    if len(full.text) > 6:  # with a stop string the held-back tail must not leak
        stop = full.text[4:7]
        cut = model.generate(prompt, **params, stop=stop).text
        assert "".join(model.stream(prompt, **params, stop=stop)) == cut
        assert stop not in cut


def test_seeds(model):
    kw = dict(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    a = model.generate(PROMPTS[0], seed=1, **kw).token_ids
    assert model.generate(PROMPTS[0], seed=1, **kw).token_ids == a
    assert model.generate(PROMPTS[0], seed=2, **kw).token_ids != a
    batch = model.generate([PROMPTS[0], PROMPTS[1]], seed=1, **kw)
    assert batch[0].token_ids == a  # a row's draws do not depend on its batch mates
    torch.manual_seed(0)
    b = model.generate(PROMPTS[0], **kw).token_ids
    torch.manual_seed(0)
    assert model.generate(PROMPTS[0], **kw).token_ids == b


def test_top_k_1_is_greedy_and_penalty_changes_output(model):
    greedy = model.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True).token_ids
    assert model.generate(PROMPTS[0], max_new_tokens=20, temperature=1.0, top_k=1, seed=9, ignore_eos=True).token_ids == greedy
    penalised = model.generate(PROMPTS[0], max_new_tokens=20, repetition_penalty=5.0, ignore_eos=True).token_ids
    assert penalised != greedy
    assert len(set(penalised)) >= len(set(greedy))


def test_frequency_and_presence_penalties_act_on_the_output(model):
    """Greedy decoding whose logits get -2 per earlier use of a token repeats
    less; a presence penalty of -2 (a bonus) makes the output reuse its tokens;
    a prompt token not yet generated is not penalised (output counts only)."""
    greedy = model.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True).token_ids
    spread = model.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True, frequency_penalty=2.0).token_ids
    sticky = model.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True, presence_penalty=-2.0).token_ids
    assert len(set(spread)) > len(set(greedy)) > len(set(sticky))
    assert greedy[0] == spread[0] == sticky[0]  # nothing generated yet: the first step is unpenalised
    streamed = "".join(model.stream(PROMPTS[0], max_new_tokens=30, ignore_eos=True, frequency_penalty=2.0))
    assert streamed == model.tokenizer.decode(spread)


def test_min_new_tokens(model):
    """EOS (pushed to the top with a logit bias) and stop ids are banned until
    min_new_tokens tokens exist, then end generation as usual; with ignore_eos
    EOS is not banned (it ends nothing)."""
    (eos,) = sorted(model.eos_ids)[:1]
    forced = dict(logit_bias={eos: 100.0}, max_new_tokens=20)
    assert model.generate(PROMPTS[0], **forced).token_ids == [eos]
    out = model.generate(PROMPTS[0], **forced, min_new_tokens=5)
    assert len(out.token_ids) == 6 and eos not in out.token_ids[:5]
    assert out.token_ids[5] == eos and out.finish_reason == "stop"
    assert model.generate(PROMPTS[0], **forced, min_new_tokens=5, ignore_eos=True).token_ids == [eos] * 20
    greedy = model.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).token_ids
    stop = dict(stop_token_ids=[greedy[2]], ignore_eos=True, max_new_tokens=12)
    assert model.generate(PROMPTS[0], **stop).token_ids == greedy[:3]
    late = model.generate(PROMPTS[0], **stop, min_new_tokens=8).token_ids
    assert len(late) >= 8 and greedy[2] not in late[:8] and late[:2] == greedy[:2]
    draft = Model.from_pretrained(model.path, device="cpu")  # itself as the draft: same greedy output
    assert model.generate(PROMPTS[0], **forced, min_new_tokens=5, draft_model=draft).token_ids == out.token_ids


def test_logit_bias(model):
    """-100 bans a token; +100 on one token makes greedy and sampled decoding
    pick it every step; logprobs stay the model's raw ones."""
    greedy = model.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, logprobs=0)
    banned = model.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, logit_bias={greedy.token_ids[0]: -100})
    assert greedy.token_ids[0] not in banned.token_ids
    forced = model.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, logit_bias={77: 100.0},
                            temperature=1.0, seed=1, logprobs=0)
    assert forced.token_ids == [77] * 12
    assert forced.logprobs[0].logprob < greedy.logprobs[0].logprob  # raw: the bias is not in it


def test_skip_special_tokens(model):
    """Special tokens leave the text by default and stay in it with
    skip_special_tokens=False (the tokens are the same either way)."""
    special = sorted(model.tokenizer.all_special_ids - model.eos_ids)
    assert special, "the test checkpoint needs a non-EOS special token"
    params = dict(max_new_tokens=3, ignore_eos=True, logit_bias={special[0]: 100.0})
    skipped = model.generate(PROMPTS[0], **params)
    kept = model.generate(PROMPTS[0], skip_special_tokens=False, **params)
    assert skipped.token_ids == kept.token_ids == [special[0]] * 3
    name = model.tokenizer.decode([special[0]], skip_special_tokens=False)
    assert skipped.text == "" and kept.text == name * 3 and name
    assert "".join(model.stream(PROMPTS[0], skip_special_tokens=False, **params)) == kept.text


def test_generation_config_object(model):
    cfg = GenerationConfig(max_new_tokens=7, ignore_eos=True)
    assert len(model.generate(PROMPTS[0], cfg).token_ids) == 7
    assert len(model.generate(PROMPTS[0], cfg, max_new_tokens=3).token_ids) == 3


def test_chat(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    ids = model.apply_chat_template(messages)
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|assistant|>") and model.tokenizer.decode(ids, skip_special_tokens=False) == text
    out = model.chat(messages, max_new_tokens=15, ignore_eos=True)
    assert out.token_ids == model.generate(ids, max_new_tokens=15, ignore_eos=True).token_ids
    assert "".join(model.chat(messages, stream=True, max_new_tokens=15, ignore_eos=True)) == out.text
    # chat_template_kwargs are template variables (this template prints bos_token first)
    bare = model.apply_chat_template(messages, bos_token="")
    assert bare == ids[1:] and ids[0] == model.tokenizer.bos_token_id
    out = model.chat(messages, max_new_tokens=15, ignore_eos=True, chat_template_kwargs={"bos_token": ""})
    assert out.prompt_token_ids == bare
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        model.chat(messages, chat_template_kwargs=["bos_token"])


@pytest.mark.parametrize(
    "params, err, match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=-0.5), ValueError, "min_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(frequency_penalty=2.5), ValueError, "frequency_penalty"),
        (dict(presence_penalty=-3), ValueError, "presence_penalty"),
        (dict(presence_penalty="1"), TypeError, "presence_penalty"),
        (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
        (dict(min_new_tokens=1.5), TypeError, "min_new_tokens"),
        (dict(logit_bias={10**6: 1.0}), ValueError, "logit_bias token id"),
        (dict(logit_bias={5: 101}), ValueError, "logit_bias"),
        (dict(logit_bias={"5": 1}), TypeError, "logit_bias token id"),
        (dict(logit_bias=[5]), TypeError, "logit_bias"),
        (dict(stop=[""]), ValueError, "stop"),
        (dict(stop=[3]), ValueError, "stop"),
        (dict(stop_token_ids=[10**6]), ValueError, "stop_token_ids"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**62), ValueError, "seed"),
        (dict(min_new_tokens=9, max_new_tokens=8), ValueError, r"min_new_tokens \(9\) must be <= max_new_tokens"),  # seeds are derived modulo 2**62: no two alike
        (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
        (dict(skip_special_tokens=0), TypeError, "skip_special_tokens"),
        (dict(tempreature=0.5), TypeError, "unknown generation parameter"),
    ],
)
def test_bad_parameters(model, params, err, match):
    with pytest.raises(err, match=match):
        model.generate(PROMPTS[0], **params)
    with pytest.raises(err, match=match):
        model.stream(PROMPTS[0], **params)  # raised before the first piece


@pytest.mark.parametrize(
    "prompt, err, match",
    [
        ("", ValueError, "empty"),
        ([], ValueError, "empty"),
        ([[]], ValueError, "no tokens"),
        ([1, 2, 10**6], ValueError, "outside the vocabulary"),
        ([-1], ValueError, "outside the vocabulary"),
        (3.5, TypeError, "prompt"),
        (["ok", 3], TypeError, "prompt"),
        (torch.zeros(2, 2), ValueError, "integer"),
        (torch.ones(3, dtype=torch.bool), ValueError, "integer"),
        (np.zeros(3), ValueError, "integer"),
        (np.ones((1, 1, 2), dtype=np.int64), ValueError, "1-D or 2-D"),
        ([True, 5], TypeError, r"token ids must be ints, got \[True\]"),
    ],
)
def test_bad_prompts(model, prompt, err, match):
    with pytest.raises(err, match=match):
        model.generate(prompt, max_new_tokens=2)


def test_array_prompts_equal_lists(model):
    ids = model.tokenizer.encode(PROMPTS[0])
    want = model.generate(ids, max_new_tokens=4, temperature=0).token_ids
    for prompt in (np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids)):
        assert model.generate(prompt, max_new_tokens=4, temperature=0).token_ids == want
    batch = model.generate(np.array([ids, ids]), max_new_tokens=4, temperature=0)
    assert [o.token_ids for o in batch] == [want, want]


def test_stream_rejects_batch_and_chat_rejects_bad_messages(model):
    with pytest.raises(ValueError, match="one prompt"):
        model.stream(["a", "b"])
    with pytest.raises(ValueError):
        model.chat([{"role": "user"}])
    with pytest.raises((ValueError, TypeError)):
        model.chat("not a list")
