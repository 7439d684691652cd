"""Chat templates rendered in jinja2's sandbox, with transformers' helpers.

Templates ship inside checkpoints and are code from the checkpoint's author:
the ImmutableSandboxedEnvironment refuses attribute access to internals
(``__class__``, ``__subclasses__``...) and mutation of the arguments.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(ValueError):
    """A template called raise_exception(message)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    """Render ``template``; any template problem becomes a ValueError."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateRaised as e:
        raise ValueError(f"chat template refused the conversation: {e}") from e
    except SecurityError as e:
        raise ValueError(f"chat template tried an unsafe operation and was stopped by the sandbox: {e}") from e
    except TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
