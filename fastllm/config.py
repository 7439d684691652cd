"""Generation parameters and results."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LOGPROBS = 20  # most alternatives per generated token (OpenAI's top_logprobs limit)
MAX_SEED = 2**62 - 1  # sampling.derive_seed works modulo 2**62


@dataclass
class GenerationConfig:
    """How to generate. ``temperature == 0`` is greedy decoding.

    max_new_tokens: at most this many tokens are generated (>= 1).
    min_new_tokens: EOS (unless ignore_eos) and stop_token_ids get no
    probability until this many tokens are generated (0 = off; stop strings
    still end the text; transformers' min_new_tokens, vLLM's min_tokens).
    temperature: >= 0; logits are divided by it before sampling.
    top_k: keep the k most probable tokens (0 = off). top_p: keep the smallest
    set of most probable tokens whose mass reaches top_p (1 = off). min_p: keep
    tokens with probability >= min_p * max probability (0 = off). Ties at a
    boundary are all kept.
    repetition_penalty: > 0; logits of tokens already in the prompt or output
    are divided by it when positive and multiplied when negative (1 = off).
    frequency_penalty, presence_penalty: in [-2, 2] (OpenAI's parameters, 0 =
    off); after the repetition penalty, each token's logit is lowered by
    ``frequency_penalty * c + presence_penalty * (c > 0)``, c its count in the
    output so far (not the prompt, as OpenAI and vLLM).
    logit_bias: {token id: bias in [-100, 100]} added to those logits after the
    penalties (OpenAI's parameter; -100 in effect bans a token).
    stop: strings that end generation; the returned text stops before them.
    stop_token_ids: token ids that end generation (besides the model's EOS).
    ignore_eos: keep generating past EOS tokens.
    seed: makes sampling reproducible, an int in [0, 2**62) (the range a
    row's seed is derived in, so that no two seeds draw alike); None draws
    one from torch's global RNG.
    logprobs: None (off) or k in [0, MAX_LOGPROBS]: return each generated
    token's log-probability and the k most likely alternatives
    (``GenerationOutput.logprobs``). They are the model's raw next-token
    log-probabilities, ``log_softmax(logits)`` in fp32 over the whole
    vocabulary, taken before the penalties, temperature, top-k, top-p and
    min-p (vLLM's default), so they do not depend on the sampling parameters.
    Alternatives are sorted by descending logprob, ties by lower token id.
    prompt_logprobs: None (off) or k in [0, MAX_LOGPROBS]: also score the
    prompt, as OpenAI's ``echo`` with ``logprobs`` (and vLLM's
    ``prompt_logprobs``): ``GenerationOutput.prompt_logprobs`` holds, for each
    prompt token after the first, its raw log-probability given the tokens
    before it and the k most likely alternatives there. It costs one LM-head
    pass over the prompt, and the engine computes such a prompt instead of
    taking it from the prefix cache.
    structured_output: None, or a ``fastllm.StructuredOutput`` (a dict of its
    fields works too): the output follows a JSON schema, regex, choice list or
    grammar (see fastllm.structured; needs llguidance). Not with a draft model.
    skip_special_tokens: leave special tokens (``<|im_end|>``, ``[TOOL_CALLS]``...)
    out of the decoded text (True, the default) or keep them (vLLM's parameter).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_output: Any = None  # a fastllm.StructuredOutput (or a dict of its fields)
    skip_special_tokens: bool = True

    @property
    def penalizes_history(self) -> bool:
        """Whether drawing the next token reads the tokens so far (repetition,
        frequency or presence penalty), not only how many there are."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    def replace(self, **params: Any) -> "GenerationConfig":
        """A copy with ``params`` changed; unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise TypeError(f"unknown generation parameter(s) {unknown}; valid: {sorted(names)}")
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        for key in ("stop", "stop_token_ids"):
            if params.get(key) is None and key in params:
                params[key] = []
        if "logit_bias" in params and params["logit_bias"] is None:
            params["logit_bias"] = {}
        return dataclasses.replace(self, **params)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError/TypeError naming the first parameter out of range."""
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        _check_int("min_new_tokens", self.min_new_tokens, lo=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        _check_float("temperature", self.temperature, lo=0.0)
        _check_int("top_k", self.top_k, lo=0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t, lo=0, hi=None if vocab_size is None else vocab_size - 1)
        if not isinstance(self.logit_bias, dict):
            raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for t, bias in self.logit_bias.items():
            _check_int("logit_bias token id", t, lo=0, hi=None if vocab_size is None else vocab_size - 1)
            _check_float(f"logit_bias[{t}]", bias, lo=-100.0, hi=100.0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        if self.structured_output is not None:
            from fastllm.structured import as_structured_output

            as_structured_output(self.structured_output).validate()
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {lp!r}")

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "GenerationConfig":
        """Defaults from ``generation_config.json`` (sampling only if do_sample;
        ``max_length``, a total length, is not read: generation stops at the
        context's end anyway). A value out of range is an error naming the
        file, at load time."""
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls()
        raw = read_json_object(file)
        try:
            cfg = cls._from_hf(raw)
            cfg.validate()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: {e}") from e
        return cfg

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> "GenerationConfig":
        cfg = cls()
        if raw.get("max_new_tokens"):
            cfg.max_new_tokens = int(raw["max_new_tokens"])
        if raw.get("min_new_tokens"):
            cfg.min_new_tokens = int(raw["min_new_tokens"])
        if raw.get("do_sample"):
            cfg.temperature = float(raw.get("temperature") or 1.0)
            cfg.top_k = int(raw.get("top_k") or 0)
            cfg.top_p = float(raw.get("top_p") or 1.0)
            cfg.min_p = float(raw.get("min_p") or 0.0)
        if raw.get("repetition_penalty"):
            cfg.repetition_penalty = float(raw["repetition_penalty"])
        return cfg


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; a ValueError naming it otherwise."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return raw


def eos_id_list(eos: Any, where: str) -> list[int]:
    """``eos_token_id`` as a list of ids (an int, a list of ints or None)."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{where}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return list(ids)


def eos_ids_from_model_dir(path: str | Path) -> list[int] | None:
    """EOS ids from generation_config.json (None when it names none: then
    config.json's, ``ModelConfig.eos_token_ids``, apply)."""
    file = Path(path) / "generation_config.json"
    eos = read_json_object(file).get("eos_token_id") if file.is_file() else None
    return None if eos is None else eos_id_list(eos, str(file))


@dataclass
class TokenLogprob:
    """One token's raw log-probability (see GenerationConfig.logprobs and
    prompt_logprobs).

    token_id: the generated (or prompt) token; logprob: ``log_softmax(logits)[token_id]``;
    top: the k most likely ``(token_id, logprob)`` pairs, descending, ties by
    lower id (empty for k = 0; may or may not contain token_id); rank: 1 + the
    number of tokens with a larger logprob (vLLM's; 1 for the argmax).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass
class GenerationOutput:
    """One generated completion.

    text: the decoded completion (special tokens skipped unless
    skip_special_tokens=False; cut before a stop
    string), or None for a model loaded without a tokenizer.
    token_ids: the generated ids, including the one that ended generation.
    finish_reason: "stop" (EOS, stop token or stop string) or "length"
    (max_new_tokens or the model's context reached).
    num_draft_tokens, num_accepted_draft_tokens: with a draft model, how many
    tokens it proposed and how many of them the target accepted (0 without).
    logprobs: with ``GenerationConfig.logprobs`` set, one TokenLogprob per
    entry of token_ids (tokens a stop string cut from the text included);
    None otherwise.
    prompt_logprobs: with ``GenerationConfig.prompt_logprobs`` set, one entry
    per entry of prompt_token_ids: None for the first (nothing predicts it),
    then the TokenLogprob of each prompt token given the ones before it; None
    otherwise.
    tool_calls: for ``Model.chat(..., tools=...)``, the ``fastllm.ToolCall``s
    found in (or forced on) the output, and ``text`` is then the reply
    without them; None for a request without tools.
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    tool_calls: list[Any] | None = None  # fastllm.ToolCall


def _check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {v}")


def _check_float(name: str, v: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    bad = not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi)
    if bad:
        lo_b = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {lo_b}{lo}, {'inf)' if hi is None else str(hi) + ']'}, got {v}")
