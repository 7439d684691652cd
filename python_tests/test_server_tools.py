"""Tool calling through the server's /v1/chat/completions: the same calls as
Model.chat for the same request, OpenAI's message and streaming shapes
(content deltas, then one tool_calls delta, then the finish chunk), the
finish reasons, tool turns in the conversation, skip_special_tokens, and 400s
for bad tool requests. Forced calls need llguidance."""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fastllm import Model  # noqa: E402
from fastllm.server.app import create_app  # noqa: E402
from tool_templates import CONVERSATION, HERMES, TIME, WEATHER  # noqa: E402

NAME = "shakespeare-15m"
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Verona?"}]
WRITTEN = 'I shall see.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>'
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def model():
    m = Model.from_pretrained(NAME, device="cpu")
    m.tokenizer.chat_template = HERMES  # Qwen2.5-style: the hermes parser is read from it
    return m


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_num_seqs=4)) as c:
        yield c


def chat(client, body: dict, status: int = 200) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, **body})
    assert r.status_code == status, r.text
    return r.json()


def stream(client, body: dict) -> list[dict]:
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "stream": True, **body})
    assert r.status_code == 200, r.text
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def _calls(calls: list[dict]) -> list[tuple[str, dict]]:
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and isinstance(c["function"]["arguments"], str)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _model_calls(out) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def _assembled(chunks: list[dict]) -> tuple[str, list[dict], str]:
    """A stream's content, its tool calls and its finish reason; checks that
    the calls come in one delta after the content and before the finish."""
    content, calls, reasons, after_calls = "", [], [], False
    for ch in chunks:
        (choice,) = ch["choices"]
        delta = choice["delta"]
        if delta.get("tool_calls"):
            assert not calls, "the calls come in one delta"
            assert [c["index"] for c in delta["tool_calls"]] == list(range(len(delta["tool_calls"])))
            calls, after_calls = delta["tool_calls"], True
        elif delta.get("content"):
            assert not after_calls, "no content after the calls"
            content += delta["content"]
        if choice["finish_reason"] is not None:
            reasons.append(choice["finish_reason"])
    assert len(reasons) == 1 and chunks[-1]["choices"][0]["finish_reason"] == reasons[0]
    return content, calls, reasons[0]


def test_required_call_equals_model_chat(client, model):
    """tool_choice required: the calls Model.chat makes for the same seed, as
    OpenAI's message (content null, tool_calls) with finish_reason tool_calls;
    streamed, the same calls in one delta."""
    pytest.importorskip("llguidance")
    params = dict(temperature=1.0, seed=3, parallel_tool_calls=False)
    body = chat(client, {"tool_choice": "required", "max_tokens": 60, **params})
    want = model.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=60, **params)
    (choice,) = body["choices"]
    assert want.finish_reason == "stop" and len(want.tool_calls) == 1
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert _calls(choice["message"]["tool_calls"]) == _model_calls(want)
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    content, calls, reason = _assembled(stream(client, {"tool_choice": "required", "max_tokens": 60, **params}))
    assert content == "" and reason == "tool_calls" and _calls(calls) == _model_calls(want)


def test_named_function_call(client, model):
    """A named function: its arguments (fitting its schema) with finish_reason
    stop, as OpenAI answers a forced function."""
    pytest.importorskip("llguidance")
    body = chat(client, {"tool_choice": WEATHER_CHOICE, "max_tokens": 40, "temperature": 0})
    want = model.chat(ASK, tools=TOOLS, tool_choice=WEATHER_CHOICE, max_new_tokens=40, temperature=0)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    ((name, args),) = _calls(choice["message"]["tool_calls"])
    assert [(name, args)] == _model_calls(want)
    assert name == "get_weather" and set(args) == {"city"} and len(args["city"]) <= 12


def test_auto_parses_the_models_own_calls(client):
    """tool_choice auto: the model's <tool_call> output (written here under a
    choice constraint) is parsed; the text before it is the content, streamed
    as it comes, and the call follows in one delta."""
    pytest.importorskip("llguidance")
    body = {"max_tokens": 80, "structured_outputs": {"choice": [WRITTEN]}}
    (choice,) = chat(client, body)["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "I shall see.\n"
    assert _calls(choice["message"]["tool_calls"]) == [("get_weather", {"city": "Verona"})]
    chunks = stream(client, body)
    content, calls, reason = _assembled(chunks)
    assert content == "I shall see.\n" and reason == "tool_calls"
    assert _calls(calls) == [("get_weather", {"city": "Verona"})]
    assert sum(1 for ch in chunks if ch["choices"][0]["delta"].get("content")) >= 2  # content came before the end


def test_auto_without_calls_and_none(client, model):
    """Free text with tools is content, finish_reason as without tools, and no
    tool_calls key; tool_choice none answers as Model.chat does."""
    greedy = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    (free,) = chat(client, greedy)["choices"]
    (none,) = chat(client, {"tool_choice": "none", **greedy})["choices"]
    want = model.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert "tool_calls" not in free["message"] and "tool_calls" not in none["message"]
    assert free["finish_reason"] == none["finish_reason"] == "length"
    assert free["message"]["content"] == none["message"]["content"] == want.text
    content, calls, reason = _assembled(stream(client, greedy))
    assert (content, calls, reason) == (want.text, [], "length")


def test_tool_turns_render_like_model_chat(client, model):
    """A conversation with an assistant's calls (arguments as OpenAI's JSON
    text) and the tool's reply renders as Model.chat renders it (arguments as
    objects): same prompt length, same greedy answer (one short tool, to fit
    the 512-token context)."""
    openai_style = copy.deepcopy(CONVERSATION)
    call = openai_style[1]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps(call["arguments"])
    greedy = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body = chat(client, {"messages": openai_style, "tools": [TIME], "tool_choice": "none", **greedy})
    want = model.chat(CONVERSATION, tools=[TIME], tool_choice="none", max_new_tokens=8, temperature=0,
                      ignore_eos=True)
    prompt = model.render_chat(CONVERSATION, tools=[TIME])
    assert '<tool_response>\nsunny, 24 C\n</tool_response>' in prompt and '"arguments": {"city": "Verona"}' in prompt
    assert body["usage"]["prompt_tokens"] == len(model.tokenizer.encode(prompt, add_special_tokens=False))
    assert body["choices"][0]["message"]["content"] == want.text


def test_skip_special_tokens_passes_through(client, model):
    special = sorted(model.tokenizer.all_special_ids - model.eos_ids)[0]
    body = {"messages": ASK, "max_tokens": 2, "ignore_eos": True, "logit_bias": {str(special): 100}}
    name = model.tokenizer.decode([special], skip_special_tokens=False)
    r = client.post("/v1/chat/completions", json=body)
    kept = client.post("/v1/chat/completions", json={**body, "skip_special_tokens": False})
    assert r.status_code == kept.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == ""
    assert kept.json()["choices"][0]["message"]["content"] == name * 2 and name


@pytest.mark.parametrize("body, param, match", [
    ({"tool_choice": "always"}, "tool_choice", "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_tide"}}}, "tool_choice", "get_tide"),
    ({"tools": [{"type": "function"}]}, "tools", "function"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "structured output"),
    ({"chat_template_kwargs": {"tools": TOOLS}}, "chat_template_kwargs", "tools"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]},
     "messages", "not JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]}, "messages", "function"),
])
def test_bad_tool_requests(client, body, param, match):
    err = chat(client, body, status=400)["error"]
    assert err["type"] == "invalid_request_error" and match in err["message"]
    assert err["param"] == param


def test_tool_call_parser_of_the_app():
    """A template that shows no tool format needs the app's tool_call_parser
    for tool_choice auto; an unknown parser is refused when the app is built."""
    shipped = Model.from_pretrained(NAME, device="cpu")
    with TestClient(create_app(shipped, max_num_seqs=2)) as c:
        err = chat(c, {"max_tokens": 2}, status=400)["error"]
        assert err["param"] == "tool_choice" and "tool-call format" in err["message"]
        assert "--tool-call-parser" in err["message"]  # the server's own option, not the Python keyword
    with TestClient(create_app(shipped, max_num_seqs=2, tool_call_parser="hermes")) as c:
        (choice,) = chat(c, {"max_tokens": 2, "ignore_eos": True})["choices"]
        assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    with pytest.raises(ValueError, match="tool_call_parser"):
        create_app(shipped, tool_call_parser="xml")
