"""Structured output (llguidance): JSON schemas, regexes, choices and Lark
grammars constrain what the shipped model generates, greedy and sampled, in
Model.generate, stream and LLMEngine; bad constraints raise ValueError."""

from __future__ import annotations

import json
import re

import pytest

from fastllm import LLMEngine, Model, StructuredOutput

pytest.importorskip("llguidance")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    return Model.from_pretrained("shakespeare-15m", device="cpu")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_json_schema(model, sampling):
    outs = model.generate(["ROMEO:", "Give me a person:"], max_new_tokens=60,
                          structured_output=StructuredOutput(json=PERSON), **sampling)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 8
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 120


def test_regex_choice_grammar_and_json_object(model):
    out = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, seed=0,
                         structured_output={"regex": r"[0-9]{3}-[A-Z]{2}"})
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", out.text) and out.finish_reason == "stop"
    choices = ["Montague", "Capulet", 'say "nay"']
    for seed in range(4):
        out = model.generate("JULIET:", max_new_tokens=20, temperature=1.0, seed=seed,
                             structured_output=StructuredOutput(choice=choices))
        assert out.text in choices
    out = model.generate("KING:", max_new_tokens=30, temperature=0,
                         structured_output=StructuredOutput(grammar='start: ("ay" | "no") ", my lord"'))
    assert out.text in ("ay, my lord", "no, my lord")
    gbnf = 'root ::= answer ", " title\nanswer ::= "ay" | "no"\ntitle ::= [A-Z] [a-z]+'
    for seed in range(3):
        out = model.generate("KING:", max_new_tokens=30, temperature=1.0, seed=seed,
                             structured_output=StructuredOutput(grammar=gbnf))
        assert re.fullmatch(r"(ay|no), [A-Z][a-z]+", out.text) or (
            out.finish_reason == "length" and re.fullmatch(r"(ay|no), [A-Z][a-z]*", out.text)), out.text
    out = model.generate("KING:", max_new_tokens=80, temperature=0, structured_output={"json_object": True})
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_new_tokens: still a prefix of an object
        assert out.text.lstrip().startswith("{")


def test_unconstrained_model_differs_and_stream_engine_agree(model):
    so = StructuredOutput(json=PERSON)
    free = model.generate("ROMEO:", max_new_tokens=20, temperature=0)
    out = model.generate("ROMEO:", max_new_tokens=60, temperature=0, structured_output=so)
    assert out.text != free.text[: len(out.text)]
    assert "".join(model.stream("ROMEO:", max_new_tokens=60, temperature=0, structured_output=so)) == out.text
    engine = LLMEngine(model, max_num_seqs=4)
    got = engine.generate(["ROMEO:", "JULIET:"], max_new_tokens=60, temperature=0.8, seed=5, structured_output=so)
    want = model.generate(["ROMEO:", "JULIET:"], max_new_tokens=60, temperature=0.8, seed=5, structured_output=so)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("so, err, match", [
    ({"regex": "[0-9"}, ValueError, "regex"),
    ({"json": PERSON, "regex": "a"}, ValueError, "exactly one"),
    ({}, ValueError, "exactly one"),
    ({"choice": []}, ValueError, "choice"),
    ({"json": 3}, TypeError, "JSON schema"),
    ({"bogus": 1}, TypeError, "structured_output"),
    ({"grammar": "start: missing_rule"}, ValueError, "structured_output"),
    ({"grammar": "root ::= missing"}, ValueError, "neither Lark"),
    ({"grammar": 'root ::= "a" ('}, ValueError, "neither Lark"),
])
def test_bad_constraints(model, so, err, match):
    with pytest.raises(err, match=match):
        model.generate("ROMEO:", max_new_tokens=5, structured_output=so)


def test_no_draft_model_with_structured_output(model):
    draft = Model.from_pretrained("shakespeare-draft-2m", device="cpu")
    with pytest.raises(ValueError, match="draft"):
        model.generate("ROMEO:", max_new_tokens=5, draft_model=draft, structured_output={"regex": "a+"})
    with pytest.raises(ValueError, match="draft"):
        LLMEngine(model, draft_model=draft).add_request("ROMEO:", structured_output={"regex": "a+"})


def test_server_structured_output(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from fastllm.server.app import create_app

    chat = [{"role": "user", "content": "Who art thou?"}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with TestClient(create_app(model, max_num_seqs=4)) as c:
        def ask(path, body):
            r = c.post(path, json={"temperature": 0, "max_tokens": 60, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        got = ask("/v1/chat/completions", {"messages": chat, "response_format": schema_format})
        want = model.chat(chat, temperature=0, max_new_tokens=60, structured_output={"json": PERSON})
        assert got["message"]["content"] == want.text and set(json.loads(want.text)) == {"name", "age"}
        assert got["finish_reason"] == "stop"
        obj = ask("/v1/chat/completions", {"messages": chat, "response_format": {"type": "json_object"}})
        assert obj["message"]["content"].startswith("{")
        choice = ask("/v1/completions", {"prompt": "ROMEO:", "guided_choice": ["yea", "nay"]})
        assert choice["text"] in ("yea", "nay")
        regex = ask("/v1/completions", {"prompt": "ROMEO:", "structured_outputs": {"regex": "[a-c]{4}"}})
        assert re.fullmatch("[a-c]{4}", regex["text"])
        bad = c.post("/v1/completions", json={"prompt": "ROMEO:", "guided_regex": "[0-9"})
        assert bad.status_code == 400 and "regex" in bad.json()["error"]["message"]
