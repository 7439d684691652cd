"""An OpenAI-compatible HTTP server over ``LLMEngine`` (FastAPI + uvicorn).

Needs the ``server`` extra: ``pip install 'fastllm[server]'``. Run it with
``fastllm serve``, or build the app yourself::

    from fastllm import Model
    from fastllm.server import create_app
    app = create_app(Model.from_pretrained("shakespeare-15m"))

Modules: ``protocol`` (request/response models, errors), ``async_engine``
(the engine on its own thread), ``serving`` (the handlers), ``app`` (routes).
``import fastllm`` does not import this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "AsyncEngine":
        from fastllm.server.async_engine import AsyncEngine

        return AsyncEngine
    if name in ("create_app", "serve"):
        from fastllm.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'fastllm.server' has no attribute {name!r}")
