"""Tokenizer of a Hugging Face checkpoint: encode, decode, stream, chat templates.

Built on the ``tokenizers`` library (``tokenizer.json``); special tokens and the
chat template come from ``tokenizer_config.json`` / ``chat_template.jinja`` /
``chat_template.json`` as transformers writes them. Chat templates render in
jinja2's ImmutableSandboxedEnvironment, with the helpers transformers provides.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders

from fastllm.config import read_json_object

# Tokens of prompt context an incremental decoder starts from (as vLLM does):
# enough for a sentencepiece leading space or a multi-byte character.
_CONTEXT_TOKENS = 5


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """Printable character -> the byte it stands for in a byte-level BPE piece
    (GPT-2's map: printable Latin-1 bytes stand for themselves, the other 68
    bytes for U+0100 onwards, in order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


_BYTE_OF = _byte_level_alphabet()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config stores it: a str or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, tok: _HFTokenizer, config: dict[str, Any], chat_template: str | None,
                 named_chat_templates: dict[str, str] | None = None):
        self._tok = tok
        self.chat_template = chat_template
        self.named_chat_templates = dict(named_chat_templates or {})  # e.g. Hermes 2 Pro's "tool_use"
        # transformers (5.x) applies this WordPiece-era cleanup only to non-BPE models (for BPE it
        # would strip real spaces before punctuation), unless told to anyway
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(tok.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_or_none(self.bos_token)
        self.eos_token_id = self._id_or_none(self.eos_token)
        self.pad_token_id = self._id_or_none(self.special_tokens.get("pad_token"))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.all_special_ids = {i for i, t in added.items() if t.special}

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: fastllm needs a fast tokenizer. If the checkpoint has only "
                "a sentencepiece tokenizer.model, convert it once with transformers: "
                "AutoTokenizer.from_pretrained(path).save_pretrained(path)"
            )
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValueError(f"{file} is not a valid tokenizer file: {e}") from e
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                config.update(read_json_object(path / name))
        named = _find_chat_templates(path, config)
        default = named.pop("default", None) or next(iter(named.values()), None)
        return cls(tok, config, default, named)

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS etc. as the tokenizer's post-processor adds them)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of str")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (as transformers' ``decode``)."""
        ids = self._check_ids(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """Ids must be non-negative ints. Ids past the tokenizer's vocabulary (a
        model's padded embedding rows) decode to nothing, as in transformers."""
        if isinstance(ids, (str, bytes)):
            raise TypeError("decode takes a sequence of int token ids")
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"token ids must be non-negative ints, got {bad[:5]}")
        return ids

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included (built once)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` contributes to decoded text: the UTF-8 of its
        text when it decodes to whole characters; else (part of a multi-byte
        character, which decodes to U+FFFD) its raw bytes, read from a
        byte-level BPE piece or a ``<0xNN>`` byte-fallback token."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            piece = self._tok.id_to_token(token_id) or ""
            byte = _BYTE_TOKEN.fullmatch(piece)
            if byte:
                return bytes([int(byte.group(1), 16)])
            if isinstance(self._tok.decoder, decoders.ByteLevel) and piece and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
        return text.encode("utf-8")

    def backend_json(self) -> str:
        """The underlying ``tokenizers`` tokenizer serialised as tokenizer.json
        text (added tokens included)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def incremental_decoder(
        self, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens, prompt_ids)

    # ----------------------------------------------------------- chat template
    def template_for(self, tools: Any = None) -> str | None:
        """The chat template to render with: the "tool_use" one, when the
        checkpoint names one and there are tools (as transformers picks), else
        the default."""
        if tools and "tool_use" in self.named_chat_templates:
            return self.named_chat_templates["tool_use"]
        return self.chat_template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template (sandboxed).

        messages: ``[{"role": "user", "content": "..."}, ...]``; content is a str
        or a list of ``{"type": "text", "text": ...}`` parts. Extra keyword
        arguments are passed to the template (e.g. ``tools``).
        """
        from fastllm.chat_template import render

        template = chat_template or self.template_for(kwargs.get("tools"))
        if template is None:
            raise ValueError("this checkpoint has no chat template; pass chat_template= to apply_chat_template")
        _check_messages(messages)
        return render(template, messages, add_generation_prompt, {**self.special_tokens, **kwargs})


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces of whole characters.

    The pieces concatenate to ``decode(prompt + generated)[len(decode(prompt)):]``
    (decoded over a short window of prompt context, so a sentencepiece leading
    space is kept); ``feed`` holds text back while it ends in an incomplete UTF-8
    character. Each step decodes only the tokens since the last emitted piece.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, prompt_ids: Sequence[int]):
        self._tok = tokenizer._tok
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids)[-_CONTEXT_TOKENS:]
        self._prefix = 0
        self._read = len(self._ids)

    def _delta(self) -> tuple[str, str]:
        prefix = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        full = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        return prefix, full

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        prefix, full = self._delta()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            # drop ids no window will look at again
            if self._prefix > 64:
                del self._ids[: self._prefix]
                self._read -= self._prefix
                self._prefix = 0
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        prefix, full = self._delta()
        self._prefix = self._read = len(self._ids)
        return full[len(prefix) :]


def _find_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """The checkpoint's chat templates by name ("default" for an unnamed one)."""
    if (path / "chat_template.jinja").is_file():
        return {"default": (path / "chat_template.jinja").read_text(encoding="utf-8")}
    template = config.get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = read_json_object(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates, e.g. "default" and "tool_use"
        return {t["name"]: t["template"] for t in template
                if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    return {"default": template} if isinstance(template, str) else {}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a str 'role', got {m!r}")
        content = m.get("content")
        if content is None and m.get("tool_calls"):  # an assistant turn that only calls tools
            continue
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        )
        if not (isinstance(content, str) or parts_ok):
            raise ValueError(f"message {i} must have str 'content' (or a list of typed parts), got {content!r}")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (space before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
