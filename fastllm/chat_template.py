"""Chat templates rendered in jinja2's sandbox, with transformers' helpers.

Templates ship inside checkpoints and are code from the checkpoint's author:
the ImmutableSandboxedEnvironment refuses attribute access to internals
(``__class__``, ``__subclasses__``...) and mutation of the arguments; ranges
are bounded (jinja's 100,000), and so are string / list repetition and
``format`` widths (MAX_SIZE). What a template sees is what transformers (5.x)
gives it: message keys whose value is None left out, ``reasoning`` /
``thinking`` also as ``reasoning_content``, ``tools`` and ``documents``
defined (None when absent), and its ``{% generation %}`` tag. Not bounded:
the time a template spends looping (nested ranges) and a string doubled in a
loop, as in transformers; the server renders only the checkpoint's own
template, never one a request sends.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SIZE = 1 << 22  # characters of a string (items of a list) a template may make by `*` or a format width
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")


class TemplateRaised(ValueError):
    """A template called raise_exception(message)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_widths(fmt: str) -> None:
    for width, precision in _WIDTHS.findall(fmt):
        if max(int(width or 0), int(precision or 0)) > MAX_SIZE:
            raise SecurityError(f"a format width above {MAX_SIZE} characters")


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    """jinja's ``format`` filter (``"%s" % args``), with bounded widths."""
    if args and kwargs:
        raise jinja2.exceptions.FilterArgumentError("can't handle positional and keyword arguments at the same time")
    fmt = str(value)
    _check_widths(fmt)
    return fmt % (kwargs or args)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "%"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                raise SecurityError(f"a repetition of more than {MAX_SIZE} items")
        elif operator == "%" and isinstance(left, str):
            _check_widths(left)
        return super().call_binop(context, operator, left, right)


class _Generation(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: marks the
    assistant's tokens for training masks; rendering, it is its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["format"] = _format
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: keys whose value
    is None left out (an OpenAI client's ``tool_calls: None``), and a message's
    reasoning under every name templates read it by."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    """Render ``template``; any template problem becomes a ValueError."""
    variables = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(messages=template_messages(messages),
                                         add_generation_prompt=add_generation_prompt, **variables)
    except TemplateRaised as e:
        raise ValueError(f"chat template refused the conversation: {e}") from e
    except SecurityError as e:
        raise ValueError(f"chat template tried an unsafe operation and was stopped by the sandbox: {e}") from e
    except TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e
