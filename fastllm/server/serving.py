"""The completion and chat-completion handlers: OpenAI request -> engine
requests -> OpenAI response (one JSON body, or server-sent events).

A request with ``n`` choices over ``P`` prompts becomes ``P * n`` engine
requests; choice ``i`` is prompt ``i // n`` and, when seeded, samples as row
``i`` of a ``Model.generate`` batch with the same seed.

Streamed logprobs: a token's entries ride on the first chunk sent at or after
the step that generated it (a step whose text is all held back, as a possible
stop string or an incomplete character, sends no chunk, so its token waits
for the next one or the final chunk). Chunks therefore carry their tokens'
entries, but where text was held back a chunk's text and its tokens can be
offset by a few characters. All chunks together hold one entry per generated
token, equal to the non-streamed answer's. With ``echo``, a choice's echoed
prompt is its first chunk; with ``logprobs`` too, that chunk carries the
prompt tokens' entries and is sent once the choice's first step is done (the
step that scored the prompt), else before anything is generated.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from fastllm.server.async_engine import AsyncEngine, EngineError, EngineStopped, GenerationStream
from fastllm.server.logprobs import (
    CompletionLogprobs, TokenNames, chat_logprobs, completion_logprobs, prompt_entries,
)
from fastllm.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatMessage, ChatMessageOut, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, DeltaMessage,
    OpenAIError, ToolCallDelta, ToolCallOut, Usage, bad_request, check_unsupported, generation_params, new_id, now,
)
from fastllm.tools import ToolPlan, plan_tools

log = logging.getLogger("fastllm.server")

T = TypeVar("T")


def engine_error(e: Exception, prompt_param: str = "prompt") -> OpenAIError:
    """The OpenAI error for an exception out of the engine (``prompt_param``:
    the request field that holds the prompt). A prompt that does not fit the
    context gets OpenAI's code ``context_length_exceeded``."""
    if isinstance(e, (ValueError, TypeError)):  # add_request refused it: the prompt or a parameter
        message = str(e)
        if not message.startswith(("prompt", "token ids", "each prompt")):
            return bad_request(message)
        code = "context_length_exceeded" if "context" in message else None
        return OpenAIError(400, message, param=prompt_param, code=code)
    if isinstance(e, EngineStopped):
        return OpenAIError(503, str(e), "server_error", code="engine_stopped")
    if isinstance(e, EngineError):
        return OpenAIError(500, str(e), "server_error", code="engine_error")
    return OpenAIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_unset=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Run ``work``; if the client goes away first, cancel it (which aborts its
    engine requests) and answer nothing useful (nobody reads it)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, task):
            if not t.done():
                t.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)
    return task.result()


class OpenAIServing:
    """State shared by the handlers: the model, its engine and its name."""

    def __init__(self, model: Any, engine: AsyncEngine, served_model_name: str, tool_parser: str = "auto"):
        self.model, self.engine, self.name, self.tool_parser = model, engine, served_model_name, tool_parser
        self.names = TokenNames(model.tokenizer)

    # ---------------------------------------------------------------- common
    def check_model(self, model: str | None) -> None:
        """A request naming another model gets OpenAI's 404."""
        if model is not None and model != self.name:
            raise OpenAIError(404, f"The model `{model}` does not exist. This server serves `{self.name}`.",
                              param="model", code="model_not_found")

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None, add_special_tokens: bool = False,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The token ids of a conversation rendered with the chat template (as
        Model.apply_chat_template), ``template_kwargs`` as template variables
        (and ``tools`` as the template's ``tools``). OpenAI's ``developer``
        messages are ``system`` ones for a template that knows no developer role."""
        extra = template_kwargs or {}
        reserved = sorted({"chat_template", "messages", "add_generation_prompt", "tools"} & set(extra))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {reserved} (the template, its messages and "
                              "tools are the server's and the request's own fields)", "chat_template_kwargs")
        flat = [m.for_template(i) for i, m in enumerate(messages)]
        template = self.model.tokenizer.template_for(tools) if self.model.tokenizer is not None else None
        if template is not None and "developer" not in template:  # OpenAI's newer name for the system role
            flat = [{**m, "role": "system"} if m["role"] == "developer" else m for m in flat]
        try:
            text = self.model.render_chat(flat, add_generation_prompt, **extra, **({"tools": tools} if tools else {}))
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "messages") from e
        return self.model.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
               max_tokens_name: str = "max_tokens") -> dict[str, Any]:
        self.check_model(req.model)
        ignored = check_unsupported(req)
        if ignored:
            log.info("ignoring request fields fastllm does not use: %s", ", ".join(sorted(ignored)))
        return generation_params(req, max_tokens, self.model.config.vocab_size, self.model.generation_config,
                                 max_tokens_name)

    async def _submit(self, prompts: list[Any], params: dict[str, Any], prompt_param: str = "prompt"
                      ) -> GenerationStream:
        try:
            return await self.engine.submit(prompts, params)
        except Exception as e:  # noqa: BLE001
            raise engine_error(e, prompt_param) from e

    @staticmethod
    async def _collect(stream: GenerationStream) -> dict[int, Any]:
        """Every request's final GenerationOutput, by index."""
        finals = {}
        try:
            async for index, out in stream:
                if out.finished:
                    finals[index] = out.output
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from e
        finally:
            stream.abort()
        return finals

    def _chunker(self, cls: type[BaseModel], rid: str, created: int, include_usage: bool):
        """``chunk(choices, usage=None)``: one SSE event of a ``cls`` chunk; its
        usage field is present only when the request asked for usage."""
        obj = cls.model_fields["object"].default  # set explicitly: sse() drops fields left unset

        def chunk(choices: list[Any], usage: Usage | None = None) -> str:
            extra = {"usage": usage} if include_usage else {}
            return sse(cls(id=rid, object=obj, created=created, model=self.name, choices=choices, **extra))

        return chunk

    async def _events(self, stream: GenerationStream, head: list[str], chunks, usage_chunk, n: int
                      ) -> AsyncIterator[str]:
        """SSE body: ``head``, then ``chunks(index, out)`` for each output, the
        usage chunk if asked (``usage_chunk([], usage)``, None when not asked;
        each of the ``n`` choices of a prompt counts its tokens once), ``[DONE]``.
        An engine failure mid-stream is sent as an error event."""
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        try:
            for event in head:
                yield event
            async for index, out in stream:
                for event in chunks(index, out):
                    yield event
                if out.finished:
                    prompt_tokens[index] = len(out.output.prompt_token_ids)
                    completion_tokens += len(out.output.token_ids)
            if usage_chunk is not None:
                yield usage_chunk([], self._usage(prompt_tokens, completion_tokens, n))
        except (EngineError, EngineStopped) as e:
            yield sse(engine_error(e).body())
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"

    def _usage(self, prompt_tokens: dict[int, int], completion_tokens: int, n: int) -> Usage:
        """Usage counting each prompt once (choice i is prompt i // n)."""
        per_prompt = {i // n: t for i, t in prompt_tokens.items()}
        return Usage.of(sum(per_prompt.values()), completion_tokens)

    # ----------------------------------------------------------- completions
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        params = self._check(req, req.max_tokens)
        prompts = _prompt_list(req.prompt)
        n = req.n
        want_lp = params.get("logprobs") is not None
        scored = want_lp and req.echo  # the echoed prompt comes with its tokens' logprobs
        # each choice's prompt text: echoed, and where logprobs' text_offset of the output begins
        texts = [self._prompt_text(p, req.echo) if req.echo or want_lp else "" for p in prompts for _ in range(n)]
        echo = texts if req.echo else [""] * len(texts)
        stream = await self._submit([p for p in prompts for _ in range(n)], params)
        rid, created = new_id("cmpl"), now()
        chunk = self._chunker(CompletionChunk, rid, created, req.include_usage)
        skip = req.skip_special_tokens

        if req.stream:
            head = [] if scored else [chunk([CompletionChoice(index=i, text=t, logprobs=None, finish_reason=None)])
                                      for i, t in enumerate(echo) if t]
            pending, offsets = _Pending(), {i: len(t) for i, t in enumerate(texts)}

            def chunks(index: int, out: Any) -> list[str]:
                events = []
                if scored and out.prompt_logprobs is not None:  # the choice's first output: echo its prompt
                    lp, _ = completion_logprobs(prompt_entries(out.prompt_token_ids, out.prompt_logprobs),
                                                self.names, text=echo[index])
                    events.append(chunk([CompletionChoice(index=index, text=echo[index], logprobs=lp,
                                                          finish_reason=None)]))
                pending.add(index, out)
                reason = out.output.finish_reason if out.finished else None
                if not out.text and reason is None:
                    return events
                lp = None
                if want_lp:
                    lp, offsets[index] = completion_logprobs(pending.take(index), self.names, offsets[index],
                                                             skip_special_tokens=skip)
                events.append(chunk([CompletionChoice(index=index, text=out.text, logprobs=lp, finish_reason=reason)]))
                return events

            events = self._events(stream, head, chunks, chunk if req.include_usage else None, n)
            return StreamingResponse(events, media_type="text/event-stream")

        finals = await cancel_on_disconnect(raw, self._collect(stream))
        if isinstance(finals, Response):
            return finals
        choices = [CompletionChoice(index=i, text=echo[i] + (o.text or ""), finish_reason=o.finish_reason,
                                    logprobs=self._completion_logprobs(o, texts[i], scored, skip) if want_lp else None)
                   for i, o in sorted(finals.items())]
        usage = self._usage({i: len(o.prompt_token_ids) for i, o in finals.items()},
                            sum(len(o.token_ids) for o in finals.values()), n)
        body = CompletionResponse(id=rid, created=created, model=self.name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump())

    def _completion_logprobs(self, out: Any, prompt_text: str, scored: bool, skip_special_tokens: bool) -> Any:
        """A finished choice's legacy logprobs: its echoed prompt's tokens
        first when ``scored``, then the generated ones, from the prompt's end."""
        generated, _ = completion_logprobs(out.logprobs, self.names, len(prompt_text),
                                           skip_special_tokens=skip_special_tokens)
        if not scored:
            return generated
        echoed, _ = completion_logprobs(prompt_entries(out.prompt_token_ids, out.prompt_logprobs), self.names,
                                        text=prompt_text)
        return CompletionLogprobs(**{k: getattr(echoed, k) + getattr(generated, k)
                                     for k in CompletionLogprobs.model_fields})

    def _prompt_text(self, prompt: str | list[int], required: bool) -> str:
        """A prompt as text (token ids decoded); "" for token ids without a
        tokenizer unless ``required`` (echo)."""
        if isinstance(prompt, str):
            return prompt
        if self.model.tokenizer is None:
            if required:
                raise bad_request("echo of a token-id prompt needs a tokenizer", "echo")
            return ""
        return self.model.tokenizer.decode(prompt)

    # ------------------------------------------------------------------ chat
    def tool_plan(self, req: ChatCompletionRequest, params: dict[str, Any]) -> ToolPlan | None:
        """The request's use of its tools (None without); adds the plan's
        generation parameters to ``params``."""
        try:
            plan = plan_tools(req.tools, req.tool_choice, self.model.tokenizer.template_for(req.tools),
                              self.tool_parser, "structured_output" in params, req.parallel_tool_calls,
                              "the server's --tool-call-parser")
        except (ValueError, TypeError) as e:
            message = str(e)
            raise bad_request(message, "tool_choice" if "tool_choice" in message else "tools") from e
        if plan is not None:
            params.update(plan.params())
        return plan

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        by_new_name = req.max_completion_tokens is not None
        max_tokens = req.max_completion_tokens if by_new_name else req.max_tokens
        params = self._check(req, max_tokens, "max_completion_tokens" if by_new_name else "max_tokens")
        plan = self.tool_plan(req, params)
        ids = self.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                               tools=plan.tools if plan is not None else None)
        n, want_lp = req.n, params.get("logprobs") is not None
        stream = await self._submit([ids] * n, params, "messages")
        rid, created = new_id("chatcmpl"), now()
        chunk = self._chunker(ChatCompletionChunk, rid, created, req.include_usage)

        if req.stream:
            head = [chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""),
                                           logprobs=None, finish_reason=None)]) for i in range(n)]
            pending = _Pending()
            splitters = {i: plan.streamer() for i in range(n)} if plan is not None else {}

            def choice_chunk(index: int, delta: DeltaMessage, reason: str | None) -> str:
                lp = chat_logprobs(pending.take(index), self.names) if want_lp and pending.has(index) else None
                return chunk([ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)])

            def chunks(index: int, out: Any) -> list[str]:
                pending.add(index, out)
                splitter = splitters.get(index)
                text = splitter.feed(out.text) if splitter is not None else out.text
                calls = []
                if out.finished and splitter is not None:
                    rest, calls = splitter.finish()
                    text += rest
                events = []
                if text:
                    events.append(choice_chunk(index, DeltaMessage(content=text), None))
                if calls:
                    deltas = [ToolCallDelta(**c.to_openai(j)) for j, c in enumerate(calls)]
                    events.append(choice_chunk(index, DeltaMessage(tool_calls=deltas), None))
                if out.finished:
                    events.append(choice_chunk(index, DeltaMessage(), _finish_reason(plan, calls, out.output)))
                return events

            events = self._events(stream, head, chunks, chunk if req.include_usage else None, n)
            return StreamingResponse(events, media_type="text/event-stream")

        finals = await cancel_on_disconnect(raw, self._collect(stream))
        if isinstance(finals, Response):
            return finals
        choices = []
        for i, o in sorted(finals.items()):
            content, calls = plan.extract(o.text or "") if plan is not None else (o.text or "", [])
            message = ChatMessageOut(content=content if content or not calls else None,
                                     tool_calls=[ToolCallOut(**c.to_openai()) for c in calls] or None)
            choices.append(ChatChoice(index=i, message=message, finish_reason=_finish_reason(plan, calls, o),
                                      logprobs=chat_logprobs(o.logprobs, self.names) if want_lp else None))
        usage = Usage.of(len(ids), sum(len(o.token_ids) for o in finals.values()))
        body = ChatCompletionResponse(id=rid, created=created, model=self.name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump())


def _finish_reason(plan: ToolPlan | None, calls: list[Any], out: Any) -> str:
    """OpenAI's: "tool_calls" when the model chose to call (tool_choice auto or
    required), else the output's ("stop" for a named function's call)."""
    if calls and plan.mode in ("auto", "required") and out.finish_reason == "stop":
        return "tool_calls"
    return out.finish_reason


class _Pending:
    """Per choice, the TokenLogprobs of steps whose text has not been sent yet."""

    def __init__(self) -> None:
        self._by_index: dict[int, list[Any]] = {}

    def add(self, index: int, out: Any) -> None:
        if out.logprobs:
            self._by_index.setdefault(index, []).extend(out.logprobs)

    def has(self, index: int) -> bool:
        return bool(self._by_index.get(index))

    def take(self, index: int) -> list[Any]:
        return self._by_index.pop(index, [])


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completions ``prompt`` as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)
