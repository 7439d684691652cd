"""Tool (function) calling: OpenAI's ``tools`` and ``tool_choice``, and the
parsers that find tool calls in what a model writes.

A chat request with tools renders them into the prompt through the chat
template (its ``tools`` variable, as transformers passes it). What happens
next depends on ``tool_choice``:

- ``"auto"`` (the default with tools): the model writes freely; a parser for
  the model's own tool-call format finds the calls in its output. The text
  before the first call is the reply's content.
- ``"required"``: the output is constrained (structured output) to a JSON
  array of ``{"name": ..., "parameters": {...}}`` objects, one of the tools
  each (vLLM's format), which become the calls.
- ``{"type": "function", "function": {"name": NAME}}``: the output is
  constrained to that function's parameters schema and becomes its arguments.
- ``"none"``: the tools are in the prompt, but the output is plain text.

Parsers (``tool_parser``; "auto" picks one from the chat template):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (Hermes 2 Pro / 3, Qwen2.5, Qwen3);
- ``llama3_json``: an output that is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several joined by ``;`` (Llama 3.1-3.3);
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of calls, or
  ``name[ARGS]{...}`` / ``name{...}`` per call (Mistral v0.3 and later).

Output that does not parse as the format's calls stays content, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from fastllm.structured import StructuredOutput

TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text (OpenAI's
    ``tool_calls[i].function``), with an id for the tool's reply message."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + _random_id(24))

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _random_id(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate OpenAI ``tools``: ``[{"type": "function", "function": {"name",
    "description"?, "parameters"?}}]`` with distinct names; a bad one is a
    ValueError/TypeError naming it."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError(f"tools must be a non-empty list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        if name in names:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"tools[{i}].function.parameters must be a JSON schema object, got {params!r}")
        if not isinstance(fn.get("description", ""), str):
            raise TypeError(f"tools[{i}].function.description must be a str")
    return list(tools)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema; one without parameters takes none."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def _arguments_text(value: Any) -> str | None:
    """A call's arguments as JSON text (an object, or JSON text of one); None if neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call(obj: Any, args_key: str, make_id=None) -> ToolCall | None:
    """A ToolCall from ``{"name": ..., args_key: {...}}`` (None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    text = _arguments_text(args)
    if text is None:
        return None
    return ToolCall(obj["name"], text) if make_id is None else ToolCall(obj["name"], text, make_id())


def _json_values(text: str) -> list[Any] | None:
    """The JSON values of ``text``, one after another, separated by
    whitespace or ``;`` (None if any part is not JSON)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _array_head(text: str) -> list[Any]:
    """The complete elements at the start of a JSON array that ``text``
    opens but does not close (an output cut short), in order."""
    decoder, items = json.JSONDecoder(), []
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return items
    pos += 1
    while True:
        try:
            value, pos = decoder.raw_decode(text, len(text) - len(text[pos:].lstrip()))
        except json.JSONDecodeError:
            return items
        items.append(value)
        rest = text[pos:].lstrip()
        if not rest.startswith(","):
            return items
        pos = len(text) - len(rest) + 1


# ------------------------------------------------------------------ parsers
class ToolParser:
    """Finds tool calls in a model's output.

    ``parse(text)`` returns ``(content, calls)``: the text before the first
    call (None if empty) and the calls; ``(text, [])`` when there are none or
    they do not parse. ``content_end(text)`` is, for streaming, how much of a
    partial output is surely content (no call starts in it, and its end cannot
    grow into a call's start)."""

    name = ""
    skip_special_tokens = True  # decode with special tokens left out (the markers are plain text)
    start = ""  # the text that opens the calls

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = text.find(self.start)
        if pos < 0:
            return text, []
        calls = self._calls(text[pos:])
        if not calls:
            return text, []
        return text[:pos] or None, calls

    def _calls(self, text: str) -> list[ToolCall] | None:
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        return self.stream_end(text)[0]

    def stream_end(self, text: str) -> tuple[int, str | None]:
        """``(content_end(text), settled)``: settled is "held" once nothing
        after the end can be content (a call has begun), "content" once all
        that follows will be, None while it depends on what comes. A marker
        parser's end only grows and any later marker begins at or after it, so
        a streamer can pass just the text not yet sent."""
        pos = text.find(self.start)
        if pos >= 0:
            return pos, "held"
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):  # a tail that may begin the marker
            if self.start.startswith(text[-k:]):
                return len(text) - k, None
        return len(text), None


class HermesParser(ToolParser):
    name, start = "hermes", "<tool_call>"
    _BODY = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall] | None:
        calls = []
        for body in self._BODY.findall(text):
            values = _json_values(body.strip())
            if values is None or len(values) != 1 or (call := _call(values[0], "arguments")) is None:
                return None
            calls.append(call)
        return calls


class Llama3JsonParser(ToolParser):
    """The whole output is the calls (vLLM's rule): ``<|python_tag|>`` (a
    special token) and/or JSON objects."""

    name, start, skip_special_tokens = "llama3_json", "<|python_tag|>", False

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.lstrip()
        body = body[len(self.start):] if body.startswith(self.start) else body
        if not body.lstrip().startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v, "parameters") for v in values or []]
        if not calls or None in calls:
            return text, []
        return None, calls

    def stream_end(self, text: str) -> tuple[int, str | None]:
        head = text.lstrip()
        if head.startswith((self.start, "{")):
            return 0, "held"  # a call: hold it all
        if not head or self.start.startswith(head):
            return 0, None  # may still become one
        return len(text), "content"


class MistralParser(ToolParser):
    name, start, skip_special_tokens = "mistral", "[TOOL_CALLS]", False
    _ARGS = "[ARGS]"

    def _calls(self, text: str) -> list[ToolCall] | None:
        make_id = lambda: _random_id(9)  # noqa: E731  Mistral's templates want 9-character ids
        parts = [p.strip() for p in text.split(self.start)[1:]]
        if len(parts) == 1 and parts[0].startswith("["):  # v0.3: [TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]
            values = _json_values(parts[0])
            if values is None or len(values) != 1 or not isinstance(values[0], list):
                return None
            calls = [_call(v, "arguments", make_id) for v in values[0]]
            return None if not calls or None in calls else calls
        calls = []
        for part in parts:  # v11+: [TOOL_CALLS]name[ARGS]{...} (or name{...})
            name, sep, args = part.partition(self._ARGS)
            if not sep:
                brace = part.find("{")
                name, args = (part[:brace], part[brace:]) if brace > 0 else ("", "")
            values = _json_values(args)
            call = _call({"name": name.strip(), "arguments": values[0]}, "arguments", make_id) \
                if values and len(values) == 1 and name.strip() else None
            if call is None:
                return None
            calls.append(call)
        return calls or None


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def detect_parser(template: str | None) -> str | None:
    """The parser a chat template's tool-call format needs (None: unknown)."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|eot_id|>" in template and '"parameters"' in template):
        return "llama3_json"
    return None


# ------------------------------------------------------------------ a request
@dataclass
class ToolPlan:
    """How one chat request uses its tools (see the module docstring)."""

    tools: list[dict[str, Any]]
    mode: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # mode "function": the forced function's name
    parser: ToolParser | None = None  # mode "auto"
    parallel: bool = True  # False: at most one call (OpenAI's parallel_tool_calls)

    def params(self) -> dict[str, Any]:
        """Generation parameters the plan adds: the constraint of a forced
        call; special tokens kept where the parser's markers are special."""
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "parameters": _parameters(t)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}, **({} if self.parallel else {"maxItems": 1})}
            return {"structured_output": StructuredOutput(json=schema)}
        if self.mode == "function":
            tool = next(t for t in self.tools if t["function"]["name"] == self.function)
            return {"structured_output": StructuredOutput(json=_parameters(tool))}
        if self.mode == "auto" and not self.parser.skip_special_tokens:
            return {"skip_special_tokens": False}
        return {}

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)`` of a finished output."""
        content, calls = self._extract(text)
        return content, calls if self.parallel else calls[:1]

    def apply(self, out: Any) -> Any:
        """A GenerationOutput with its tool calls parsed out: ``tool_calls``
        set, and ``text`` the content before them ("" if none)."""
        content, calls = self.extract(out.text)
        return dataclasses.replace(out, text=(content or "") if calls else out.text, tool_calls=calls)

    def _extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "auto":
            return self.parser.parse(text)
        if self.mode == "function":
            return (None, [ToolCall(self.function, text)]) if _arguments_text(text) is not None else (text, [])
        if self.mode == "required":
            values = _json_values(text)
            if values is None:  # cut short (max_tokens): the calls written in full before the cut
                values = [_array_head(text)]
            calls = [_call(v, "parameters") for v in values[0]] if values and isinstance(values[0], list) else []
            return (None, calls) if calls and None not in calls and len(values) == 1 else (text, [])
        return text, []

    def content_end(self, text: str) -> int:
        """How much of a partial output is surely content."""
        return self.stream_end(text)[0]

    def stream_end(self, text: str) -> tuple[int, str | None]:
        """``ToolParser.stream_end`` under this plan's tool_choice."""
        if self.mode == "auto":
            return self.parser.stream_end(text)
        return (0, "held") if self.mode in ("required", "function") else (len(text), "content")

    def streamer(self) -> "ToolStreamer":
        return ToolStreamer(self)


def plan_tools(tools: Any, tool_choice: Any = None, template: str | None = None, tool_parser: str = "auto",
               has_structured_output: bool = False, parallel_tool_calls: bool = True,
               parser_option: str = "tool_parser") -> ToolPlan | None:
    """The ToolPlan of a request (None without tools); bad values are ValueErrors.
    template: the chat template the tools render with ("auto" reads the
    parser from it). parser_option: how the caller names ``tool_parser`` in
    the error that asks for one (the server: its command-line flag)."""
    if tools is None or (isinstance(tools, (list, tuple)) and not tools):
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return None
    tools = check_tools(tools)
    mode, function = _choice(tool_choice, tools)
    if mode in ("required", "function") and has_structured_output:
        raise ValueError(f"tool_choice={tool_choice!r} constrains the output itself; "
                         "it cannot be combined with structured output")
    parser = None
    if mode == "auto":
        if tool_parser not in ("auto", *PARSERS):
            raise ValueError(f"tool_parser must be 'auto' or one of {sorted(PARSERS)}, got {tool_parser!r}")
        name = detect_parser(template) if tool_parser == "auto" else tool_parser
        if name is None:
            raise ValueError("tool_choice 'auto' needs to know the model's tool-call format, and the chat template "
                             f"shows none fastllm knows; name one with {parser_option} "
                             f"({', '.join(sorted(PARSERS))}), "
                             "or use tool_choice 'required' or a named function (constrained output)")
        parser = PARSERS[name]()
    if not isinstance(parallel_tool_calls, bool):
        raise TypeError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}")
    return ToolPlan(tools, mode, function, parser, parallel_tool_calls)


def _choice(tool_choice: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {TOOL_CHOICES} or a named function, got {tool_choice!r}")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}, "
                         f"got {tool_choice!r}")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {known}")
    return "function", name


class ToolStreamer:
    """Splits a streamed output into content to send as it comes and tool
    calls at the end. ``feed(piece)`` returns the content that is final now;
    ``finish()`` returns ``(the rest of the content, calls)``. The pieces of
    content together equal ``ToolPlan.extract``'s content. Each piece costs
    time in its own length and the unsent tail's, not the whole output's
    (``ToolParser.stream_end``)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.sent = plan, 0
        self._pieces: list[str] = []
        self._unsent = ""  # the text after the sent content, while it is not settled
        self._settled: str | None = None  # "content" / "held": the rest needs no more looking at

    @property
    def text(self) -> str:
        """The output so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def feed(self, piece: str) -> str:
        self._pieces.append(piece)
        if self._settled == "held":
            return ""
        if self._settled == "content":
            self.sent += len(piece)
            return piece
        self._unsent += piece
        end, self._settled = self.plan.stream_end(self._unsent)
        out, self._unsent = self._unsent[:end], self._unsent[end:]
        self.sent += end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        text = self.text
        content, calls = self.plan.extract(text)
        content = content or ""
        if not content.startswith(text[: self.sent]):
            raise RuntimeError("tool streaming sent content that the final parse does not keep")
        return content[self.sent :], calls
