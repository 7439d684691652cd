"""OpenAI wire format: request and response models, errors, parameter mapping.

Requests keep unknown fields (``extra="allow"``) so that the OpenAI
parameters fastllm does not implement can be refused by name when they would
change the result (``UNSUPPORTED``) and ignored when they would not (``user``,
``metadata``...). Parameters a request leaves out take the model's defaults
(its ``generation_config.json``), as ``Model.generate`` does.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_serializer, model_validator

from fastllm.config import MAX_LOGPROBS, GenerationConfig
from fastllm.server.logprobs import ChatLogprobs, CompletionLogprobs

MAX_N = 128  # choices per request


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


# ------------------------------------------------------------------ requests
class _Request(BaseModel):
    """A request body. Types are strict (``"stream": "yes"``, ``"n": "2"`` or
    ``"max_tokens": true`` are 400s, as OpenAI answers; an int is a float),
    and ``null`` for a declared field means its default: OpenAI documents
    its optional fields as "type or null" and clients send them so."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None  # None: the served model
    max_tokens: Optional[StrictInt] = None
    min_tokens: Optional[StrictInt] = None  # vLLM's: EOS and stop_token_ids banned until this many tokens
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None  # -1 or 0: off (vLLM's convention)
    min_p: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    presence_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[str, StrictFloat]] = None  # token id (a string in JSON) -> bias in [-100, 100]
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True  # vLLM's
    seed: Optional[StrictInt] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None  # k alternatives per token, legacy format


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn's calls
    tool_call_id: Optional[str] = None  # a tool turn: the call it answers

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as the chat template sees it: content parts of type
        text joined into one string (other parts are refused); tool calls'
        arguments as objects (templates write them with tojson, as
        transformers expects), not OpenAI's JSON text."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{index}].content: only text parts are supported, got a "
                                      f"{part.get('type')!r} part", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [_template_call(c, f"messages[{index}].tool_calls[{j}]")
                                 for j, c in enumerate(self.tool_calls)]
        return out


def _template_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", "messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise bad_request(f"{where}.function.arguments is not JSON: {e}", "messages") from None
    return {**call, "function": {**fn, "arguments": args}}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: extra chat template variables
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None  # needs logprobs=true
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: StrictBool = True


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages`` (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[StrictBool] = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[StrictInt]


def _neutral(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


# OpenAI (and a few vLLM) parameters that would change the result; each is
# accepted only at a value that means "off".
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "top_logprobs": _neutral(0),  # a chat field; completions take logprobs=k
    "functions": _neutral([]),
    "function_call": _neutral("none", "auto"),
    "suffix": _neutral(""),
    "best_of": _neutral(1),
    "prediction": _neutral(),
    "audio": _neutral(),
    "modalities": _neutral(["text"]),
    "use_beam_search": _neutral(False),
    "length_penalty": _neutral(1, 1.0),
    "include_stop_str_in_output": _neutral(False),
    "prompt_logprobs": _neutral(),
    "truncate_prompt_tokens": _neutral(),
    "chat_template": _neutral(),  # vLLM's per-request template: the server renders the checkpoint's own only
}


def check_unsupported(req: BaseModel) -> list[str]:
    """Raise a 400 for an unsupported parameter set to a value that matters;
    return the names of the other unknown fields (ignored)."""
    ignored = []
    for name, value in (req.model_extra or {}).items():
        if name in STRUCTURED_FIELDS:  # read by requested_structure
            continue
        neutral = UNSUPPORTED.get(name)
        if neutral is None:
            ignored.append(name)
        elif not neutral(value):
            raise bad_request(f"{name}={value!r} is not supported by fastllm's server; leave it out", name)
    return ignored


# Engine names -> the OpenAI names a client sent, for error messages (and
# max_new_tokens -> the name its request used).
_OPENAI_NAMES = {"min_new_tokens": "min_tokens"}


def generation_params(req: _SamplingRequest, max_tokens: int | None, vocab_size: int,
                      defaults: GenerationConfig, max_tokens_name: str = "max_tokens") -> dict[str, Any]:
    """The ``LLMEngine.add_request`` keywords for ``req``, validated against
    ``defaults`` (the model's generation config); a bad value is a 400 that
    names the field as the client sent it (``max_tokens_name``: the field
    ``max_tokens`` came from)."""
    params: dict[str, Any] = {}
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    if req.min_tokens is not None:
        params["min_new_tokens"] = req.min_tokens
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "seed"):
        if getattr(req, name) is not None:
            params[name] = getattr(req, name)
    if req.top_k is not None:
        params["top_k"] = 0 if req.top_k == -1 else req.top_k
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        params["stop_token_ids"] = list(req.stop_token_ids)
    if req.ignore_eos:
        params["ignore_eos"] = True
    if not req.skip_special_tokens:
        params["skip_special_tokens"] = False
    if req.logit_bias:
        try:
            params["logit_bias"] = {int(t): b for t, b in req.logit_bias.items()}
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {sorted(req.logit_bias)!r}",
                              "logit_bias") from None
    structure = requested_structure(req)
    if structure is not None:
        params["structured_output"] = structure
    k = requested_logprobs(req)
    if k is not None:
        params["logprobs"] = k
        if getattr(req, "echo", False):  # completions: the echoed prompt's tokens are scored too
            params["prompt_logprobs"] = k
    try:
        defaults.replace(**params).validate(vocab_size)
    except (ValueError, TypeError) as e:
        message = str(e)
        for ours, theirs in {"max_new_tokens": max_tokens_name, **_OPENAI_NAMES}.items():
            message = message.replace(ours, theirs)
        param = re.match(r"[A-Za-z_]\w*", message)  # "logit_bias[5] must be ...": logit_bias
        raise bad_request(message, param[0] if param else None) from e
    return params


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_FIELDS = frozenset({"response_format", "structured_outputs", *_GUIDED})


def requested_structure(req: _SamplingRequest) -> dict[str, Any] | None:
    """The request's structured output as ``StructuredOutput`` fields (None:
    free text): OpenAI's ``response_format`` (``json_object``, or
    ``json_schema`` with its ``schema``), vLLM's ``structured_outputs``
    object or its older ``guided_json`` / ``guided_regex`` / ``guided_choice``
    / ``guided_grammar`` fields; at most one of these."""
    extra = req.model_extra or {}
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = extra.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                                  "response_format")
            found.append(("response_format", {"json": schema}))
        else:
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {fmt!r}",
                              "response_format")
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        found.append(("structured_outputs", {k: v for k, v in so.items() if v is not None and v is not False}))
    for name, field_name in _GUIDED.items():
        if extra.get(name) is not None:
            found.append((name, {field_name: extra[name]}))
    if len(found) > 1:
        raise bad_request(f"give one structured output request, got {[n for n, _ in found]}", found[1][0])
    return found[0][1] if found else None


def requested_logprobs(req: _SamplingRequest) -> int | None:
    """Alternatives per token the request asks for (None: no logprobs).
    Completions: ``logprobs=k`` (with ``echo``, for the prompt's tokens too).
    Chat: ``logprobs=true`` with ``top_logprobs=k`` (default 0)."""
    if isinstance(req, ChatCompletionRequest):
        k = req.top_logprobs
        if k is not None and k != 0 and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {k}", "top_logprobs")
        return (k or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


# ----------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Optional[Literal["stop", "length", "tool_calls"]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class FunctionOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class ToolCallDelta(ToolCallOut):
    index: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # None when the reply is only tool calls
    tool_calls: Optional[list[ToolCallOut]] = None  # left out of the JSON when there are none

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunk(BaseModel):
    """A streamed completion piece: OpenAI streams ``text_completion`` objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
