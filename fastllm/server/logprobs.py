"""Token log-probabilities in OpenAI's two wire formats.

Values are ``GenerationOutput.logprobs`` (the model's raw log_softmax, before
sampling parameters; see ``GenerationConfig.logprobs``), clamped below at
-9999.0 as OpenAI does, because JSON has no -Infinity.

- completions (legacy): ``{tokens, token_logprobs, top_logprobs, text_offset}``;
  ``top_logprobs[i]`` maps the k most likely token strings to their logprob,
  plus the sampled token (up to k + 1 entries, as OpenAI documents); two ids
  with the same text keep the first (higher) value. With ``echo`` the prompt's
  tokens come first (``GenerationOutput.prompt_logprobs``), the first of them
  with ``null`` logprob and top_logprobs, as OpenAI answers.
- chat: ``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.

A token's string is the tokenizer's decoding of that token alone (special
tokens included). ``bytes`` is what the token adds to the text's UTF-8
(``Tokenizer.token_bytes``): the encoding of that string, except for a token
holding part of a multi-byte character, whose string is U+FFFD (as OpenAI's
``token`` field) and whose ``bytes`` are its raw bytes, so that the bytes of
consecutive tokens join into the text's. ``text_offset`` counts the characters
of the preceding token strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from pydantic import BaseModel

from fastllm.config import TokenLogprob

LOGPROB_FLOOR = -9999.0


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]  # None: the prompt's first token (echo)
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class TokenNames:
    """Token id -> its text (``tokenizer.decode([id])``), cached; ``token_id:<id>``
    without a tokenizer (vLLM's spelling). ``bytes(id)``: its bytes, cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        name = self._cache.get(token_id)
        if name is None:
            if self.tokenizer is None:
                name = f"token_id:{token_id}"
            else:
                name = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = name
        return name

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            if self.tokenizer is None:
                raw = list(self(token_id).encode("utf-8"))
            else:
                raw = list(self.tokenizer.token_bytes(token_id))
            self._bytes[token_id] = raw
        return raw


def _clamp(v: float) -> float:
    return max(v, LOGPROB_FLOOR)  # -inf (a token the model rules out) becomes the floor


def prompt_entries(prompt_ids: Sequence[int], prompt_lps: Sequence[TokenLogprob | None]) -> list[TokenLogprob | int]:
    """``completion_logprobs`` entries for a scored prompt: a bare token id
    where nothing scored the token (the first), else its TokenLogprob."""
    return [pid if lp is None else lp for pid, lp in zip(prompt_ids, prompt_lps, strict=True)]


def completion_logprobs(lps: Sequence[TokenLogprob | int], names: TokenNames,
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The legacy object for ``lps`` whose first token starts at character
    ``offset``; returns it and the offset after the last token. An int entry
    is a token with no logprob (the prompt's first, under echo): its
    token_logprobs and top_logprobs entries are None."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        if isinstance(lp, int):
            name, value, top = names(lp), None, None
        else:
            name, value, top = names(lp.token_id), _clamp(lp.logprob), {}
            for token_id, v in lp.top:
                top.setdefault(names(token_id), _clamp(v))
            top.setdefault(name, value)
        tokens.append(name)
        values.append(value)
        tops.append(top)
        offsets.append(offset)
        offset += len(name)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets), offset


def _entry(names: TokenNames, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": names(token_id), "logprob": _clamp(logprob), "bytes": names.bytes(token_id)}


def chat_logprobs(lps: Sequence[TokenLogprob], names: TokenNames) -> ChatLogprobs:
    """The chat object for ``lps`` (one content entry per token)."""
    content = [
        ChatTokenLogprob(**_entry(names, lp.token_id, lp.logprob),
                         top_logprobs=[TopLogprob(**_entry(names, t, v)) for t, v in lp.top])
        for lp in lps
    ]
    return ChatLogprobs(content=content)
