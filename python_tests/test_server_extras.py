"""The server's routes beside the OpenAI API: the API key, vLLM's /tokenize
and /detokenize, Prometheus /metrics, /version."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fastllm import Model, __version__  # noqa: E402
from fastllm.server.app import create_app  # noqa: E402

NAME = "shakespeare-15m"
KEY = "sk-test-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def model():
    return Model.from_pretrained(NAME, device="cpu")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_num_seqs=4)) as c:
        yield c


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_api_key_guards_every_route_but_health_metrics_version(model):
    body = {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(model, api_key=KEY, max_num_seqs=2)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        got = _ok(c.post("/v1/completions", json=body, headers=AUTH))
        assert got["choices"][0]["text"] == model.generate("ROMEO:", max_new_tokens=4, temperature=0).text
        assert _ok(c.post("/v1/completions", json=body, headers={"Authorization": f"bearer {KEY}"})) \
            ["choices"] == got["choices"]  # the scheme's case does not matter (RFC 9110)
        streamed = c.post("/v1/completions", json={**body, "stream": True}, headers=AUTH)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        for path in ("/health", "/version"):
            assert c.get(path).status_code == 200
    with pytest.raises(ValueError, match="api_key"):
        create_app(model, api_key="")


def test_tokenize_prompt_and_messages(client, model):
    tok = model.tokenizer
    got = _ok(client.post("/tokenize", json={"model": NAME, "prompt": "ROMEO: soft!"}))
    assert got["tokens"] == tok.encode("ROMEO: soft!") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == model.config.max_position_embeddings
    bare = _ok(client.post("/tokenize", json={"prompt": "ROMEO: soft!", "add_special_tokens": False,
                                              "return_token_strs": True}))
    assert bare["tokens"] == tok.encode("ROMEO: soft!", add_special_tokens=False) != got["tokens"]
    assert bare["token_strs"] == [tok.id_to_token(i) for i in bare["tokens"]]
    chat = _ok(client.post("/tokenize", json={"messages": CHAT}))
    assert chat["tokens"] == model.apply_chat_template(CHAT)
    no_gen = _ok(client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}))
    assert no_gen["tokens"] == model.apply_chat_template(CHAT, add_generation_prompt=False) != chat["tokens"]
    for bad in ({}, {"prompt": "x", "messages": CHAT}):
        assert client.post("/tokenize", json=bad).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
    assert client.post("/tokenize", json={"prompt": "x", "bogus": 1}).status_code == 400


def test_detokenize(client, model):
    ids = model.apply_chat_template(CHAT)
    got = _ok(client.post("/detokenize", json={"tokens": ids}))
    assert got["prompt"] == model.tokenizer.decode(ids, skip_special_tokens=False)
    assert _ok(client.post("/tokenize", json={"prompt": got["prompt"], "add_special_tokens": False}))["tokens"] == ids
    for bad in ([model.config.vocab_size], [-1], ["a"]):
        assert client.post("/detokenize", json={"tokens": bad}).status_code == 400


def _samples(text: str) -> dict[str, float]:
    """'name{labels} value' lines of a Prometheus exposition, by name+labels."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([^\s{]+(?:\{[^}]*\})?) (\S+)", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_count_what_was_served(model):
    pytest.importorskip("prometheus_client")
    with TestClient(create_app(model, max_num_seqs=4)) as c:
        prompts = ["ROMEO:", "JULIET: O Romeo"]
        outs = [_ok(c.post("/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0,
                                                    "ignore_eos": True})) for p in prompts]
        outs.append(_ok(c.post("/v1/completions", json={"prompt": "KING:", "max_tokens": 20, "temperature": 0,
                                                        "stop": ["\n"]})))
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = _samples(r.text)
    label = f'model_name="{NAME}"'
    assert outs[2]["choices"][0]["finish_reason"] == "stop"
    assert m[f"fastllm:generation_tokens_total{{{label}}}"] == sum(o["usage"]["completion_tokens"] for o in outs)
    assert m[f"fastllm:prompt_tokens_total{{{label}}}"] == sum(o["usage"]["prompt_tokens"] for o in outs)
    assert m[f'fastllm:request_success_total{{finished_reason="length",{label}}}'] == 2
    assert m[f'fastllm:request_success_total{{finished_reason="stop",{label}}}'] == 1
    assert m[f"fastllm:time_to_first_token_seconds_count{{{label}}}"] == 3
    assert m[f"fastllm:e2e_request_latency_seconds_count{{{label}}}"] == 3
    assert m[f"fastllm:request_time_per_output_token_seconds_count{{{label}}}"] >= 2
    assert m[f"fastllm:num_requests_running{{{label}}}"] == 0
    assert 0 <= m[f"fastllm:kv_cache_usage_perc{{{label}}}"] <= 1
    assert m[f"fastllm:engine_step_failures_total{{{label}}}"] == 0


def test_version(client):
    assert _ok(client.get("/version")) == {"version": __version__}
