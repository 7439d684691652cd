"""Tool calling: the parsers (and their streaming split), tool_choice
planning, templates with tools against transformers, and Model.chat with
tools on the shipped model (forced calls need llguidance)."""

from __future__ import annotations

import json
import random

import pytest

from fastllm import Model, ToolCall
from fastllm.tools import PARSERS, check_tools, detect_parser, plan_tools
from tool_templates import CONVERSATION, HERMES, TIME, WEATHER

TOOLS = [WEATHER, TIME]
CALL = {"name": "get_weather", "arguments": {"city": "Verona"}}


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _plan(parser: str, **kw):
    return plan_tools(TOOLS, None, None, parser, **kw)


@pytest.mark.parametrize("parser, text, content, calls", [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>',
     "Let me look.\n", [("get_weather", {"city": "Verona"})]),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Mantua"}}', None,  # the second call cut before its end tag
     [("get_time", {}), ("get_weather", {"city": "Mantua"})]),
    ("hermes", "Thou art <tool_call> not JSON </tool_call>", "Thou art <tool_call> not JSON </tool_call>", []),
    ("hermes", "No calls here, <tool_", "No calls here, <tool_", []),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Verona"}}; '
     '{"name": "get_time", "parameters": {}}', None, [("get_weather", {"city": "Verona"}), ("get_time", {})]),
    ("llama3_json", ' {"name": "get_weather", "arguments": "{\\"city\\": \\"Verona\\"}"}', None,
     [("get_weather", {"city": "Verona"})]),  # arguments as JSON text are accepted too
    ("llama3_json", 'It is {"name": "get_time", "parameters": {}}', 'It is {"name": "get_time", "parameters": {}}', []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ',
     []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Verona"}}, '
     '{"name": "get_time", "arguments": {}}]', None, [("get_weather", {"city": "Verona"}), ("get_time", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Verona"}[TOOL_CALLS]get_time{}', "Sure.",
     [("get_weather", {"city": "Verona"}), ("get_time", {})]),
    ("mistral", "[TOOL_CALLS] [broken", "[TOOL_CALLS] [broken", []),
])
def test_parsers(parser, text, content, calls):
    """Each format's calls are found, the text before them is the content, and
    output that does not parse stays content; streamed in any pieces, the
    content sent before the end plus the rest at the end is the same content."""
    plan = _plan(parser)
    got_content, got_calls = plan.extract(text)
    assert got_content == content and _calls(got_calls) == calls
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        st = plan.streamer()
        sent = "".join(st.feed(p) for p in pieces)
        rest, streamed_calls = st.finish()
        assert sent + rest == (content or "") and _calls(streamed_calls) == calls
        if calls:  # nothing of a call is ever sent as content
            assert len(sent) <= len(content or "")


def test_streaming_sends_content_before_a_call_as_it_comes():
    st = _plan("hermes").streamer()
    assert st.feed("Let me ") == "Let me "
    assert st.feed("look <to") == "look "  # "<to" may begin "<tool_call>": held
    assert st.feed("ol_call>{") == ""
    assert st.feed('"name": "get_time", "arguments": {}}</tool_call>') == ""
    assert st.finish()[0] == "" and _calls(st.finish()[1]) == [("get_time", {})]
    st = _plan("llama3_json").streamer()
    assert st.feed("  ") == "" and st.feed("Hi") == "  Hi" and st.feed(" {") == " {"  # not a call: all content


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_streamer_sends_what_the_whole_text_allows(parser):
    """The streamer looks only at the text it has not sent (so a long output
    costs linear time); after every piece it has still sent exactly the
    content that ``content_end`` of the whole output so far allows."""
    plan = _plan(parser)
    start = plan.parser.start
    bits = ["a", " ", "\n", "{", "}", '"', start, start[:3], start[:-1], start[1:], "<", "[", "x y"]
    rng = random.Random(1)
    for _ in range(200):
        pieces = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 12))]
        st, text, sent = plan.streamer(), "", 0
        for piece in pieces:
            out = st.feed(piece)
            text += piece
            end = max(sent, plan.content_end(text))
            assert out == text[sent:end] and st.sent == end and st.text == text
            sent = end
        rest, _ = st.finish()
        assert text[:sent] + rest == (plan.extract(text)[0] or "")


def test_required_calls_cut_short_keep_the_whole_ones():
    """tool_choice "required" constrains the output to an array of calls; one
    cut by max_tokens keeps the calls written in full (streamed too)."""
    plan = plan_tools(TOOLS, "required")
    whole = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Verona"}}'
    for text, want in [(whole + ', {"name": "get_wea', [("get_time", {}), ("get_weather", {"city": "Verona"})]),
                       (whole + "]", [("get_time", {}), ("get_weather", {"city": "Verona"})]),
                       ('[{"name": "get_time", "parameters": {}} , ', [("get_time", {})])]:
        content, calls = plan.extract(text)
        assert content is None and _calls(calls) == want
        st = plan.streamer()
        assert st.feed(text[:9]) == "" and st.feed(text[9:]) == ""
        assert st.finish()[0] == "" and _calls(st.finish()[1]) == want
    cut = '[{"name": "get_weather", "parameters": {"ci'
    assert plan.extract(cut) == (cut, [])  # no whole call: the text stays content


def test_mistral_ids_and_single_call():
    _, calls = _plan("mistral").extract('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]')
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()  # Mistral's templates want 9-character ids
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>' + json.dumps(CALL) + "</tool_call>"
    _, calls = _plan("hermes", parallel_tool_calls=False).extract(text)
    assert _calls(calls) == [("get_time", {})]
    _, calls = _plan("hermes").extract(text)
    assert len(calls) == 2 and calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert calls[0].to_openai(0) == {"index": 0, "id": calls[0].id, "type": "function",
                                     "function": {"name": "get_time", "arguments": "{}"}}


def test_detect_parser():
    assert detect_parser(HERMES) == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}


@pytest.mark.parametrize("tools, choice, kw, err, match", [
    ([{"type": "function", "function": {"name": "bad name"}}], None, {}, ValueError, "name"),
    ([WEATHER, WEATHER], None, {}, ValueError, "two tools"),
    ([{"type": "retrieval"}], None, {}, ValueError, r"tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, {}, TypeError, "parameters"),
    ("get_weather", None, {}, ValueError, "non-empty list"),
    (TOOLS, "sometimes", {}, ValueError, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "get_tides"}}, {}, ValueError, "not among the tools"),
    (TOOLS, {"function": "get_time"}, {}, ValueError, "named tool_choice"),
    (None, "required", {}, ValueError, "needs tools"),
    (TOOLS, "required", {"has_structured_output": True}, ValueError, "structured output"),
    (TOOLS, None, {"tool_parser": "xml"}, ValueError, "tool_parser"),
    (TOOLS, None, {"tool_parser": "auto"}, ValueError, "tool-call format"),  # a template with no known format
    (TOOLS, None, {"tool_parser": "hermes", "parallel_tool_calls": "yes"}, TypeError, "parallel_tool_calls"),
])
def test_bad_tool_requests(tools, choice, kw, err, match):
    with pytest.raises(err, match=match):
        plan_tools(tools, choice, "{{ messages }}", **kw)


def test_check_tools_keeps_valid_ones():
    assert check_tools(TOOLS) == TOOLS


# ------------------------------------------------------------- templates
def test_template_with_tools_matches_transformers(tmp_path):
    """Tools, assistant tool_calls and tool results render as transformers
    renders them; a checkpoint's named "tool_use" template is picked when
    there are tools (as transformers does)."""
    from transformers import AutoTokenizer

    from fastllm.tokenizer import Tokenizer
    from test_tokenizer import _chatml_tokenizer

    _chatml_tokenizer(tmp_path, HERMES)
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for tools in (None, TOOLS):
        for messages in (CONVERSATION, CONVERSATION[:1]):
            want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            assert ours.apply_chat_template(messages, tools=tools) == want
    assert '{"name": "get_weather", "arguments": {"city": "Verona"}}' in ours.apply_chat_template(CONVERSATION)

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ 'plain' }}"}, {"name": "tool_use", "template": HERMES}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    named = Tokenizer.from_pretrained(tmp_path)
    assert named.apply_chat_template(CONVERSATION) == "plain"
    assert named.apply_chat_template(CONVERSATION, tools=TOOLS) == ours.apply_chat_template(CONVERSATION, tools=TOOLS)


# ------------------------------------------------------------ Model.chat
@pytest.fixture(scope="module")
def model():
    m = Model.from_pretrained("shakespeare-15m", device="cpu")
    m.tokenizer.chat_template = HERMES
    return m


ASK = [{"role": "user", "content": "What is the weather in Verona?"}]


def _fits(calls: list[ToolCall]) -> bool:
    for name, args in _calls(calls):
        if name == "get_weather":
            assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 12
        else:
            assert name == "get_time" and args == {}
    return True


def test_chat_required_and_named_calls_fit_the_tools(model):
    pytest.importorskip("llguidance")
    salvaged = False
    for seed in range(3):
        out = model.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_new_tokens=60,
                         temperature=1.0, seed=seed)
        assert out.finish_reason == "stop" and len(out.tool_calls) == 1 and out.text == "" and _fits(out.tool_calls)
        many = model.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60, temperature=1.0, seed=seed)
        if many.finish_reason == "stop":
            assert many.tool_calls and many.text == "" and _fits(many.tool_calls)
        elif many.tool_calls:  # cut before the array closed: the calls written in full before the cut
            assert many.finish_reason == "length" and many.text == "" and _fits(many.tool_calls)
        else:  # cut inside the first call: the raw text is the content
            assert many.text.startswith('[{"name": "get_')
        cut = many.finish_reason != "stop" and many.tool_calls
        salvaged = salvaged or cut
    assert salvaged  # a seed above ran out of tokens after a whole call (60 tokens, the model keeps adding calls)
    out = model.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     max_new_tokens=40, temperature=0)
    assert [c.name for c in out.tool_calls] == ["get_weather"] and _fits(out.tool_calls)


def test_chat_auto_parses_the_models_calls(model):
    """With tool_choice auto the model's own <tool_call> output is parsed (here
    the model is made to write one with a choice constraint)."""
    pytest.importorskip("llguidance")
    written = "I shall see.\n<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
    out = model.chat(ASK, tools=TOOLS, max_new_tokens=80, structured_output={"choice": [written]})
    assert out.text == "I shall see.\n" and _calls(out.tool_calls) == [("get_weather", {"city": "Verona"})]
    free = model.chat(ASK, tools=TOOLS, max_new_tokens=12, temperature=0)
    plain = model.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=12, temperature=0)
    assert free.tool_calls == [] and plain.tool_calls == [] and free.text == plain.text
    prompt = model.render_chat(ASK, tools=TOOLS)
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    assert model.chat(ASK, max_new_tokens=4).tool_calls is None


def test_chat_tool_errors(model):
    with pytest.raises(ValueError, match="stream"):
        model.chat(ASK, tools=TOOLS, stream=True)
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        model.chat(ASK, tools=TOOLS, chat_template_kwargs={"tools": TOOLS})
    with pytest.raises(ValueError, match="tool_choice"):
        model.chat(ASK, tools=TOOLS, tool_choice="always")
    with pytest.raises(ValueError, match="structured output"):
        model.chat(ASK, tools=TOOLS, tool_choice="required", structured_output={"regex": "a"})
    shipped = Model.from_pretrained("shakespeare-15m", device="cpu")  # its template knows no tool format
    with pytest.raises(ValueError, match="tool-call format"):
        shipped.chat(ASK, tools=TOOLS)
    assert shipped.chat(ASK, tools=TOOLS, tool_parser="hermes", max_new_tokens=3).tool_calls == []
