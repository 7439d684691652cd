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
consecutive tokens join into the text's. ``text_offset`` is where each token
begins in the prompt + completion text (OpenAI's rule: the first generated
token's offset is the prompt's length, with or without ``echo``), counting the
characters of the preceding token strings; a special token takes none where
the text leaves it out (the BOS a tokenizer adds to a text prompt; with
``skip_special_tokens``, one in the output).
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

    def is_special(self, token_id: int) -> bool:
        return self.tokenizer is not None and token_id in self.tokenizer.all_special_ids

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


def completion_logprobs(lps: Sequence[TokenLogprob | int], names: TokenNames, offset: int = 0,
                        text: str | None = None, skip_special_tokens: bool = True) -> tuple[CompletionLogprobs, int]:
    """The legacy object for ``lps`` whose first token starts at character
    ``offset``; returns it and the offset after the last token. An int entry
    is a token with no logprob (the prompt's first, under echo): its
    token_logprobs and top_logprobs entries are None. A special token's
    width: with ``text`` (what the tokens spell, from ``offset`` on), its
    string's length where the text has it there, else 0; without, 0 when
    ``skip_special_tokens`` (the text leaves it out)."""
    tokens, values, tops, offsets = [], [], [], []
    start = offset
    for lp in lps:
        token_id = lp if isinstance(lp, int) else lp.token_id
        name = names(token_id)
        if isinstance(lp, int):
            value, top = None, None
        else:
            value, top = _clamp(lp.logprob), {}
            for alt, v in lp.top:
                top.setdefault(names(alt), _clamp(v))
            top.setdefault(name, value)
        tokens.append(name)
        values.append(value)
        tops.append(top)
        offsets.append(offset)
        if not names.is_special(token_id):
            offset += len(name)
        elif text is not None:
            offset += len(name) if text.startswith(name, offset - start) else 0
        elif not skip_special_tokens:
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
