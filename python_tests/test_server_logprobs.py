"""The server's logprobs: completions' legacy object and chat's content list,
streamed and not, hold Model.generate's logprobs under the tokens' texts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fastllm import Model  # noqa: E402
from fastllm.server.app import create_app  # noqa: E402

CHAT = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 5, "max_tokens": 14, "ignore_eos": True}


@pytest.fixture(scope="module")
def model():
    return Model.from_pretrained("shakespeare-15m", device="cpu")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_num_seqs=8)) as c:
        yield c


def post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(client, path: str, body: dict) -> list[dict]:
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    blocks = r.text.split("\n\n")
    assert blocks[-2] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def name(model, token_id: int) -> str:
    return model.tokenizer.decode([token_id], skip_special_tokens=False)


def generate(model, prompt, k: int, **params):
    params["max_new_tokens"] = params.pop("max_tokens")
    return model.generate(prompt, logprobs=k, **params)


def assert_offsets(model, lp: dict, text: str, start: int = 0) -> None:
    """text_offset: each token's string lies at its offset in ``text`` (the
    prompt + completion), the first at ``start``, and the next token follows
    it; a special token the text leaves out takes no characters. Tokens past
    the text's end (reported beyond a stop string) and U+FFFD pieces of a
    character are only counted on."""
    offsets, tokens = lp["text_offset"], lp["tokens"]
    special = {name(model, t) for t in model.tokenizer.all_special_ids}
    assert offsets[0] == start
    for off, token, nxt in zip(offsets, tokens, [*offsets[1:], None]):
        width = len(token) if token not in special or text.startswith(token, off) else 0
        if width and off + width <= len(text) and "\ufffd" not in token:
            assert text.startswith(token, off), (off, token, text)
        if nxt is not None:
            assert nxt - off == width, (off, token, nxt)


def assert_legacy(model, lp: dict, out, k: int, prompt: str = "ROMEO:") -> None:
    """completions' logprobs object against a GenerationOutput."""
    names = [name(model, t) for t in out.token_ids]
    assert lp["tokens"] == names
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in out.logprobs], abs=1e-5)
    assert_offsets(model, lp, prompt + out.text, len(prompt))  # counted from the prompt's start, as OpenAI does
    for top, x in zip(lp["top_logprobs"], out.logprobs):
        want = {name(model, t): v for t, v in reversed(x.top)}  # first of equal names wins
        want.setdefault(name(model, x.token_id), x.logprob)
        assert top == pytest.approx(want, abs=1e-5) and len(top) <= k + 1


def assert_chat(model, content: list[dict], out, k: int) -> None:
    assert [c["token"] for c in content] == [name(model, t) for t in out.token_ids]
    for c, x in zip(content, out.logprobs):
        assert c["logprob"] == pytest.approx(x.logprob, abs=1e-5)
        assert c["bytes"] == list(model.tokenizer.token_bytes(x.token_id))
        assert len(c["top_logprobs"]) == k
        assert [t["token"] for t in c["top_logprobs"]] == [name(model, t) for t, _ in x.top]
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx([v for _, v in x.top], abs=1e-5)
        assert [t["bytes"] for t in c["top_logprobs"]] == [list(model.tokenizer.token_bytes(t)) for t, _ in x.top]


def test_chat_bytes_join_into_the_text(model):
    """A token holding part of a multi-byte character is named U+FFFD (as
    OpenAI does) but its bytes are its own, so the bytes join into the text."""
    from fastllm.config import TokenLogprob
    from fastllm.server.logprobs import TokenNames, chat_logprobs

    text = "Thou art 日本語 🙂 — ay."
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    lps = [TokenLogprob(token_id=i, logprob=-1.0, top=[(i, -1.0)]) for i in ids]
    content = chat_logprobs(lps, TokenNames(model.tokenizer)).model_dump()["content"]
    assert any(c["token"] == "\ufffd" for c in content)  # the shipped vocabulary splits these characters
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode("utf-8")
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)
    assert TokenNames(None).bytes(7) == list(b"token_id:7")


# -------------------------------------------------------------- completions
def test_completion_logprobs_equal_generate(client, model):
    got = post(client, "/v1/completions", {"prompt": "ROMEO:", "logprobs": 3, "n": 2, **SAMPLED})
    outs = generate(model, ["ROMEO:", "ROMEO:"], 3, **SAMPLED)
    for choice, out in zip(got["choices"], outs):
        assert choice["text"] == out.text
        assert_legacy(model, choice["logprobs"], out, 3)
    assert any(len(t) == 4 for t in got["choices"][0]["logprobs"]["top_logprobs"])  # a sampled token outside the top 3
    plain = post(client, "/v1/completions", {"prompt": "ROMEO:", **SAMPLED})
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["text"] == outs[0].text
    zero = post(client, "/v1/completions", {"prompt": "ROMEO:", "logprobs": 0, **SAMPLED})["choices"][0]
    assert [list(t) for t in zero["logprobs"]["top_logprobs"]] == [[n] for n in zero["logprobs"]["tokens"]]


@pytest.mark.parametrize("stop", [None, ["room", "the"]], ids=["length", "stop-string"])
def test_streamed_completion_logprobs_add_up(client, model, stop):
    body = {"prompt": "ROMEO:", "logprobs": 2, "stop": stop, **SAMPLED}
    whole = post(client, "/v1/completions", body)["choices"][0]
    out = generate(model, "ROMEO:", 2, **{**SAMPLED, "stop": stop or []})
    assert_legacy(model, whole["logprobs"], out, 2)
    pieces = [e["choices"][0] for e in events(client, "/v1/completions", body)]
    assert all(p["logprobs"] and p["logprobs"]["tokens"] for p in pieces)  # no chunk without its tokens
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in pieces for v in p["logprobs"][key]] == whole["logprobs"][key]
    if stop:  # the tokens past the cut are reported, as without streaming
        assert whole["finish_reason"] == "stop" and len("".join(whole["logprobs"]["tokens"])) > len(whole["text"])


# -------------------------------------------------------- echo: prompt logprobs
def assert_echoed(model, lp: dict, out, k: int) -> None:
    """completions' logprobs under ``echo``: the prompt's tokens (the first
    unscored: null) then the generated ones, against a GenerationOutput made
    with prompt_logprobs=k and logprobs=k."""
    ids = [*out.prompt_token_ids, *out.token_ids]
    scored = [*out.prompt_logprobs[1:], *out.logprobs]
    names = [name(model, t) for t in ids]
    assert lp["tokens"] == names
    text = model.tokenizer.decode(out.prompt_token_ids) + out.text
    assert_offsets(model, lp, text)
    if out.prompt_token_ids[0] in model.tokenizer.all_special_ids:  # the added BOS is not in the echoed text
        assert lp["text_offset"][:2] == [0, 0] and not text.startswith(names[0])
    assert lp["token_logprobs"][1:] == pytest.approx([x.logprob for x in scored], abs=1e-5)
    for top, x in zip(lp["top_logprobs"][1:], scored, strict=True):
        want = {name(model, t): v for t, v in reversed(x.top)}
        want.setdefault(name(model, x.token_id), x.logprob)
        assert top == pytest.approx(want, abs=1e-5) and len(top) <= k + 1


def test_echo_with_logprobs_scores_the_prompt(client, model):
    body = {"prompt": "ROMEO:", "echo": True, "logprobs": 2, "n": 2, **SAMPLED}
    got = post(client, "/v1/completions", body)
    outs = generate(model, ["ROMEO:", "ROMEO:"], 2, prompt_logprobs=2, **SAMPLED)
    for choice, out in zip(got["choices"], outs, strict=True):
        assert choice["text"] == "ROMEO:" + out.text
        assert_echoed(model, choice["logprobs"], out, 2)
    assert got["usage"]["prompt_tokens"] == len(outs[0].prompt_token_ids)  # n choices share one prompt
    # streamed: each choice's first chunk is the echo with the prompt's entries
    chunks = [c for e in events(client, "/v1/completions", body) for c in e["choices"]]
    for i in range(2):
        mine = [c for c in chunks if c["index"] == i]
        assert mine[0]["text"] == "ROMEO:"
        assert mine[0]["logprobs"]["tokens"] == [name(model, t) for t in outs[i].prompt_token_ids]
        assert "".join(c["text"] for c in mine) == got["choices"][i]["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            streamed = [v for c in mine for v in c["logprobs"][key]]
            if key in ("token_logprobs", "top_logprobs"):
                assert streamed[0] is None
                assert streamed[1:] == [pytest.approx(v, abs=1e-5) for v in got["choices"][i]["logprobs"][key][1:]]
            else:
                assert streamed == got["choices"][i]["logprobs"][key]


def test_echo_without_logprobs_streams_the_prompt_first(client, model):
    body = {"prompt": "ROMEO:", "echo": True, **SAMPLED}
    whole = post(client, "/v1/completions", body)["choices"][0]
    assert whole["logprobs"] is None and whole["text"].startswith("ROMEO:")
    chunks = [e["choices"][0] for e in events(client, "/v1/completions", body)]
    assert chunks[0]["text"] == "ROMEO:" and chunks[0]["logprobs"] is None
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_loglikelihood_as_lm_eval_asks_for_it(client, model):
    """lm-eval's local-completions scores a continuation by sending context
    + continuation as token ids with echo, logprobs=1, max_tokens=1 and
    temperature 0, then sums token_logprobs[ctxlen:-1]: those must be the
    model's log-softmax at the continuation's tokens, and the argmax check
    must agree with the model's own argmax."""
    import torch

    tok = model.tokenizer
    pairs = [("ROMEO: Wherefore art thou", " Romeo?"), ("First Citizen:", " Speak, speak.")]
    prompts = [tok.encode(c) + tok.encode(x, add_special_tokens=False) for c, x in pairs]
    got = post(client, "/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                           "temperature": 0})
    for (ctx, _), ids, choice in zip(pairs, prompts, sorted(got["choices"], key=lambda c: c["index"]), strict=True):
        ctxlen = len(tok.encode(ctx))
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1
        with torch.no_grad():
            logits = model.forward(torch.tensor([ids]))[0].float()
        want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert lp["token_logprobs"][ctxlen:-1] == pytest.approx(want[ctxlen - 1:].tolist(), abs=1e-4)
        greedy = logits[ctxlen - 1:-1].argmax(-1).tolist() == ids[ctxlen:]
        lm_eval_greedy = all(max(top, key=top.get) == t
                             for top, t in zip(lp["top_logprobs"][ctxlen:-1], lp["tokens"][ctxlen:-1]))
        assert lm_eval_greedy == greedy


# --------------------------------------------------------------------- chat
def test_chat_logprobs_equal_model_chat(client, model):
    out = model.chat(CHAT, temperature=0, max_new_tokens=12, logprobs=4)
    got = post(client, "/v1/chat/completions", {"messages": CHAT, "temperature": 0, "max_tokens": 12,
                                                "logprobs": True, "top_logprobs": 4})
    choice = got["choices"][0]
    assert choice["message"]["content"] == out.text and set(choice["logprobs"]) == {"content"}
    assert_chat(model, choice["logprobs"]["content"], out, 4)
    assert all(c["top_logprobs"][0]["token"] == c["token"] for c in choice["logprobs"]["content"])  # greedy
    bare = post(client, "/v1/chat/completions", {"messages": CHAT, "temperature": 0, "max_tokens": 12,
                                                 "logprobs": True})["choices"][0]["logprobs"]["content"]
    assert [c["top_logprobs"] for c in bare] == [[]] * 12
    off = post(client, "/v1/chat/completions", {"messages": CHAT, "temperature": 0, "max_tokens": 12,
                                                "logprobs": False, "top_logprobs": 0})
    assert off["choices"][0]["logprobs"] is None


def test_streamed_chat_logprobs_add_up(client, model):
    body = {"messages": CHAT, "logprobs": True, "top_logprobs": 2, "stop": ["the"], **SAMPLED}
    whole = post(client, "/v1/chat/completions", body)["choices"][0]
    ids = model.apply_chat_template(CHAT)
    assert_chat(model, whole["logprobs"]["content"], generate(model, ids, 2, **{**SAMPLED, "stop": ["the"]}), 2)
    chunks = [e["choices"][0] for e in events(client, "/v1/chat/completions", body)]
    assert chunks[0]["logprobs"] is None  # the role chunk
    for c in chunks[1:-1]:  # every text chunk carries the tokens generated since the previous one
        assert c["delta"].get("content") and c["logprobs"]["content"]
    streamed = [x for c in chunks if c.get("logprobs") for x in c["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]
    assert "".join(c["delta"].get("content", "") for c in chunks) == whole["message"]["content"]


# ------------------------------------------------------------ speculative
def test_server_with_a_draft_model(model):
    """A server speculating with the shipped draft answers what Model.generate
    with that draft answers (seeded sampling: the same draws), streams several
    tokens per chunk with their logprobs, and counts usage as without it."""
    draft = Model.from_pretrained("shakespeare-draft-2m", device="cpu")
    with TestClient(create_app(model, max_num_seqs=8, draft_model=draft, num_speculative_tokens=3)) as client:
        body = {"prompt": "ROMEO:", "logprobs": 2, "n": 2, **SAMPLED}
        got = post(client, "/v1/completions", body)
        outs = generate(model, ["ROMEO:", "ROMEO:"], 2, draft_model=draft, num_speculative_tokens=3, **SAMPLED)
        assert all(o.num_draft_tokens > 0 for o in outs)
        for choice, out in zip(got["choices"], outs):
            assert choice["text"] == out.text
            assert_legacy(model, choice["logprobs"], out, 2)
        assert got["usage"]["completion_tokens"] == 2 * SAMPLED["max_tokens"]
        greedy = {"messages": CHAT, "temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 1}
        whole = post(client, "/v1/chat/completions", greedy)["choices"][0]
        assert whole["message"]["content"] == model.chat(CHAT, temperature=0, max_new_tokens=16).text
        chunks = [e["choices"][0] for e in events(client, "/v1/chat/completions", greedy)]
        streamed = [x for c in chunks if c.get("logprobs") for x in c["logprobs"]["content"]]
        want = whole["logprobs"]["content"]  # the prefix cache changes the sums' order: logprobs to rounding
        assert [x["token"] for x in streamed] == [x["token"] for x in want]
        assert [x["logprob"] for x in streamed] == pytest.approx([x["logprob"] for x in want], abs=1e-4)
        assert "".join(c["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
        assert len(chunks) - 2 < len(want)  # some chunks carried several tokens
