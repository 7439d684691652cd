"""Tokenizer: parity with transformers, incremental decoding, chat template sandbox."""

from __future__ import annotations

import json
import random

import pytest

from checkpoints import CORPUS, make_tokenizer
from fastllm.tokenizer import Tokenizer

TEXTS = [
    "",
    "ROMEO: But soft!",
    "  leading and   inner   spaces\n\nnew lines\t tabs",
    "Café naïve 日本語 🙂✓ — done.",
    "special <s> inside </s> text <|end|>",
    "x" * 300,
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's template features: a namespace set in a reversed loop, string
# methods, reasoning split from earlier assistant turns, enable_thinking.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' and ns.last_user == messages|length - 1 %}"
    "{%- set ns.last_user = messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and '</think>' in m.content %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set thought = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- else %}{%- set content = m.content %}{%- set thought = '' %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if thought and loop.index0 > ns.last_user %}{{- '<think>\\n' + thought + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _metaspace_tokenizer(out):
    """A Llama-2-style sentencepiece-like BPE (Metaspace, byte fallback, <s>)."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = T(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        [CORPUS], trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.normalizer = normalizers.Sequence([])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=MISTRAL_TEMPLATE
    ).save_pretrained(str(out))


def _chatml_tokenizer(out, template=CHATML_TEMPLATE):
    """A Qwen2-style byte-level BPE with no BOS and ChatML special tokens."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    ).save_pretrained(str(out))


def _llama3_tokenizer(out):
    make_tokenizer(out)
    (out / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)


def _qwen3_tokenizer(out):
    _chatml_tokenizer(out, QWEN3_STYLE_TEMPLATE)


BUILDERS = {"bytelevel-bos": _llama3_tokenizer, "metaspace": _metaspace_tokenizer, "chatml": _chatml_tokenizer,
            "qwen3": _qwen3_tokenizer}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path)
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(str(path)), path


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, hf, _ = pair
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch([text, "a"]) == [ours.encode(text), ours.encode("a")]


def test_token_bytes_hold_partial_characters(pair):
    """A token holding part of a multi-byte character decodes to U+FFFD alone;
    token_bytes gives its raw bytes, so the tokens' bytes rebuild the text
    (a sentencepiece token decoded alone loses its leading space)."""
    ours, _, path = pair
    text = "Café naïve 日本語 🙂✓ 한국어 ŝ₯"  # the last ones are not in the training corpus: byte fallback
    ids = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i], skip_special_tokens=False) for i in ids)
    got = b"".join(ours.token_bytes(i) for i in ids)
    if path.name.startswith("metaspace"):
        got, text = got.replace(b" ", b""), text.replace(" ", "")
    assert got == text.encode("utf-8")
    assert ours.token_bytes(ours.eos_token_id) == ours.eos_token.encode()


def test_special_tokens(pair):
    ours, hf, _ = pair
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.vocab_size == len(hf)


def test_chat_template_matches_transformers(pair):
    ours, hf, _ = pair
    conversations = [
        [{"role": "user", "content": "Who art thou?"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Well met."},
            {"role": "user", "content": "  Café 日本  "},
        ],
        [
            {"role": "user", "content": "Sum 2 and 2"},
            {"role": "assistant", "content": "<think>\nsmall numbers\n</think>\n\nFour."},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            expect = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expect
            for thinking in (True, False):  # a template variable, as transformers passes its extra kwargs
                expect = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                                enable_thinking=thinking)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen, enable_thinking=thinking) == expect


def test_qwen3_style_template_thinking_switch(tmp_path):
    _qwen3_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    off = tok.apply_chat_template(msgs, enable_thinking=False)
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _check_stream(tok: Tokenizer, prompt: list[int], gen: list[int]) -> None:
    dec = tok.incremental_decoder(prompt_ids=prompt)
    pieces = [dec.feed(t) for t in gen]
    tail = dec.flush()
    target = tok.decode(prompt + gen)[len(tok.decode(prompt)) :]
    assert "".join(pieces) + tail == target
    if "\ufffd" not in target:
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoding_of_text(pair):
    ours, _, _ = pair
    for text in TEXTS[1:]:
        ids = ours.encode(text, add_special_tokens=False)
        for cut in (0, 1, len(ids) // 2):
            _check_stream(ours, ids[:cut], ids[cut:])


def test_incremental_decoding_of_random_ids(pair):
    ours, _, _ = pair
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        cut = rng.randrange(len(ids))
        _check_stream(ours, ids[:cut], ids[cut:])


def test_multibyte_characters_are_never_split(tmp_path):
    make_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    text = "🙂日本語✓" * 3
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the characters really are split across tokens
    dec = tok.incremental_decoder()
    pieces = [dec.feed(t) for t in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_inputs(pair, tmp_path):
    ours, _, path = pair
    with pytest.raises(TypeError):
        ours.encode(b"bytes")
    with pytest.raises(TypeError):
        ours.encode_batch("not a list")
    with pytest.raises(ValueError, match="non-negative"):
        ours.decode([-1])
    assert ours.decode([ours.vocab_size + 10]) == ""  # padded embedding rows decode to nothing
    with pytest.raises(ValueError, match="role"):
        ours.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="content"):
        ours.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    bare = Tokenizer.from_pretrained(tmp_path)
    if bare.chat_template is None:
        with pytest.raises(ValueError, match="no chat template"):
            bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sandbox_and_errors(pair):
    ours, _, _ = pair
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="unsafe"):
        ours.apply_chat_template(msgs, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="unsafe"):
        ours.apply_chat_template(msgs, chat_template="{{ messages.append(1) }}")
    with pytest.raises(ValueError, match="template error"):
        ours.apply_chat_template(msgs, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template(
            [{"role": "assistant", "content": "x"}], chat_template=MISTRAL_TEMPLATE
        )
    rendered = ours.apply_chat_template(msgs, chat_template="{{ messages | tojson }}|{{ strftime_now('%Y') }}")
    assert rendered.startswith('[{"role": "user", "content": "hi"}]|20')


@pytest.mark.parametrize("template, messages, kwargs", [
    # keys whose value is None are left out, as transformers does (OpenAI clients send tool_calls: None)
    ("{% for m in messages %}{% if 'tool_calls' in m %}{{ m.tool_calls[0].function.name }}{% else %}"
     "{{ m.content }}{% endif %}{% endfor %}", [{"role": "assistant", "content": "Hello", "tool_calls": None}], {}),
    # tools and documents are defined, None when absent
    ("{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}DOCS{% endif %}|{{ tools }}",
     [{"role": "user", "content": "hi"}], {}),
    ("{% if tools is not none %}{{ tools | length }}{% endif %}", [{"role": "user", "content": "hi"}],
     {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    # a message's reasoning under every name templates read
    ("{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }}{% endfor %}",
     [{"role": "assistant", "content": "x", "reasoning": "R"}], {}),
    # transformers' generation tag renders its body
    ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}], {}),
])
def test_template_inputs_as_transformers_gives_them(pair, template, messages, kwargs):
    ours, hf, _ = pair
    expect = hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, chat_template=template, **kwargs) == expect


@pytest.mark.parametrize("template, match", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ messages[0].content + none }}", "TypeError"),
    ("{{ range(10**9) | length }}", "range"),
    ("{{ ('ab' * 10**9) | length }}", "repetition"),
    ("{{ [0] * 10**9 }}", "repetition"),
    ("{{ '%0999999999d' | format(1) }}", "format width"),
    ("{{ '%.999999999f' % 1.0 }}", "format width"),
])
def test_template_failures_are_value_errors(pair, template, match):
    """Whatever a template does wrong is a ValueError (the server answers 400),
    and sizes it could blow up are bounded (the sandbox stops them at once)."""
    ours, _, _ = pair
    with pytest.raises(ValueError, match=match):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)


def test_cleanup_of_spaces_is_not_applied_to_bpe(tmp_path):
    """clean_up_tokenization_spaces is for WordPiece: transformers ignores it for
    BPE models (it would eat real spaces before punctuation), and so does
    decode, which then agrees with generated text."""
    from transformers import AutoTokenizer

    _llama3_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "clean_up_tokenization_spaces": True}))
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    ids = ours.encode("Romeo , is it ?", add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids) == "Romeo , is it ?"
