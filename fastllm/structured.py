"""Structured output: generation constrained to a JSON schema, a regular
expression, a list of choices or a grammar.

Each step, a request with ``GenerationConfig.structured_output`` gets the set
of tokens its grammar allows next (a bitmask over the vocabulary); the others
get -inf after the logit processors and before temperature / top-k / top-p /
min-p, so sampling (and greedy) only ever picks an allowed token. The sampled
token advances the grammar; once the grammar is complete and admits nothing
more, the request finishes with ``"stop"`` (an EOS token is allowed wherever
the grammar could end). Logprobs stay the raw model's (before the mask).
JSON is generated without free whitespace (``", "`` and ``": "`` separators).

The grammars and masks come from llguidance (Microsoft's Rust library behind
guidance, one of vLLM's structured-output backends): it compiles JSON schemas,
regexes and Lark grammars and computes a token mask in tens of microseconds.
It is optional (``pip install 'fastllm[structured]'``); without it a
structured request raises a ``ValueError`` that says how to install it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

INSTALL_HINT = "structured output needs llguidance: pip install 'fastllm[structured]' (or pip install llguidance)"
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()
_BITS = 1 << torch.arange(8, dtype=torch.uint8)  # bit i of a mask byte is token 8 j + i
# JSON as json.dumps writes it: free whitespace would let a model pad forever
# (a schema's "x-guidance" options override these)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its JSON
    text), ``regex`` (the whole output matches it; Rust regex syntax),
    ``choice`` (the output is one of these strings), ``grammar`` (a Lark
    grammar in llguidance's dialect, rule ``start``, or a GBNF grammar as
    llama.cpp and vLLM's xgrammar take it, rule ``root``, converted to Lark)
    or ``json_object=True`` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def validate(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object is not False:
            if self.json_object is not True:
                raise TypeError(f"structured_output.json_object must be a bool, got {self.json_object!r}")
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_output needs exactly one of json, regex, choice, grammar and json_object; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise TypeError(f"structured_output.json must be a JSON schema (dict or str), got {type(self.json).__name__}")
        for key in ("regex", "grammar"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"structured_output.{key} must be a non-empty str, got {value!r}")
        if self.choice is not None and (
            isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(f"structured_output.choice must be a non-empty list of non-empty strings, got {self.choice!r}")

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint."""
        from llguidance import LLMatcher

        if self.json is not None:
            try:
                return LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise ValueError(f"structured_output.json is not a valid JSON schema: {e}") from e
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # Lark string literals take JSON's escapes
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(_as_lark(self.grammar))


def _as_lark(grammar: str) -> str:
    """``grammar`` in Lark: itself if it is Lark (a ``start:`` rule or a
    ``%llguidance`` header), else converted from GBNF (``root ::= ...``)."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar)
    except Exception as e:  # the converter raises GbnfToLarkError, or a bare Exception for an unknown rule
        raise ValueError(f"structured_output.grammar is neither Lark (a 'start:' rule) nor valid GBNF: {e}") from e


def as_structured_output(value: Any) -> StructuredOutput | None:
    """A StructuredOutput from itself or a dict of its fields (None stays None)."""
    if value is None or isinstance(value, StructuredOutput):
        return value
    if isinstance(value, dict):
        try:
            return StructuredOutput(**value)
        except TypeError as e:
            raise TypeError(f"structured_output: {e}") from e
    raise TypeError(f"structured_output must be a StructuredOutput or a dict, got {type(value).__name__}")


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> Any:
    """llguidance's view of ``tokenizer`` (about a second to build; cached per tokenizer)."""
    from llguidance import LLTokenizer

    key = (vocab_size, tuple(sorted(eos_ids)))
    per = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if key not in per:
        eos = list(key[1]) or None
        per[key] = LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size, eos_token=eos)
    return per[key]


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, so: StructuredOutput, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]):
        try:
            from llguidance import LLMatcher
        except ImportError as e:
            raise ValueError(INSTALL_HINT) from e
        if tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        self.vocab_size = vocab_size
        self._m = LLMatcher(_ll_tokenizer(tokenizer, vocab_size, eos_ids), so.grammar_text(), log_level=0)
        if self._m.is_error():
            raise ValueError(f"structured_output: {self._m.get_error()}")

    def allowed(self, device: torch.device) -> Tensor:
        """bool [V]: the tokens the grammar allows next."""
        raw = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.uint8)
        bits = (raw.unsqueeze(-1) & _BITS) != 0  # [bytes, 8]
        mask = bits.reshape(-1)[: self.vocab_size]
        # through pinned memory: a pageable host-to-device copy would wait for the device
        return mask.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mask

    def consume(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"structured output: token {token} broke the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits no more tokens."""
        return self._m.is_stopped()


def matcher_for(config: Any, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> GrammarMatcher | None:
    so = config.structured_output
    return None if so is None else GrammarMatcher(so, tokenizer, vocab_size, eos_ids)
