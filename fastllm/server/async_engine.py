"""``AsyncEngine``: one LLMEngine on a background thread, for asyncio callers.

LLMEngine is not thread-safe, so one thread owns it and is the only one that
touches it. Callers hand it work through a list guarded by a condition
variable: ``submit`` appends jobs (one per engine request) and ``abort``
appends cancellations; at the top of each loop iteration the thread takes
both, adds the new jobs (``add_request``'s answer, a request id or the
ValueError, goes back through a ``concurrent.futures.Future`` the caller awaits
with ``asyncio.wrap_future``), drops the cancelled ones, and runs one
``step()``. Outputs go to the caller's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. With nothing to do the thread waits on the
condition (no polling).

When ``step()`` raises, every request in flight gets an ``EngineError`` and is
dropped from the engine; the engine is kept when its books balance afterwards
(no request left, every KV block free) and rebuilt otherwise. Either way the
thread goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastllm.engine import LLMEngine, StepOutput

log = logging.getLogger("fastllm.server")


class EngineError(RuntimeError):
    """The engine failed while running this request (``step()`` raised)."""


class EngineStopped(RuntimeError):
    """The engine is shut down (or its thread died) and takes no requests."""


class _Sink:
    """Where one caller's outputs go: an asyncio.Queue on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, items: list[Any]) -> None:
        """Called from the engine thread; one loop callback for all ``items``."""
        try:
            self.loop.call_soon_threadsafe(_put_all, self.queue, items)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass


def _put_all(queue: asyncio.Queue, items: list[Any]) -> None:
    for item in items:
        queue.put_nowait(item)


@dataclass(eq=False)
class _Job:
    """One engine request: prompt i of a caller's group."""

    prompt: Any
    params: dict[str, Any]
    index: int
    sink: _Sink
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    request_id: int | None = None  # set by the engine thread
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)  # when submitted
    first_token: float | None = None  # when its first token came (engine thread)


class GenerationStream:
    """The outputs of one ``submit``: ``(index, StepOutput)`` pairs in the order
    the engine produced them, until every request finished. Raises
    ``EngineError``/``EngineStopped`` if the engine fails or stops meanwhile.
    Call ``abort()`` (idempotent) when giving up early."""

    def __init__(self, engine: "AsyncEngine", jobs: list[_Job], sink: _Sink):
        self._engine, self._jobs, self._sink = engine, jobs, sink
        self._finished: set[int] = set()
        self._aborted = False

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> tuple[int, StepOutput]:
        if len(self._finished) == len(self._jobs):
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self.abort()
            raise item
        index, out = item
        if out.finished:
            self._finished.add(index)
        return index, out

    def abort(self) -> None:
        """Drop this stream's unfinished requests from the engine."""
        if self._aborted:
            return
        self._aborted = True
        self._engine._abort([j for j in self._jobs if j.index not in self._finished])


class AsyncEngine:
    """Serve an LLMEngine to asyncio code from a thread that owns it.

    >>> engine = AsyncEngine(model, max_num_seqs=32); engine.start()
    >>> stream = await engine.submit(["ROMEO:"], {"max_new_tokens": 8})
    >>> async for index, out in stream: print(out.text, end="")
    >>> engine.stop()
    """

    def __init__(self, model: Any, metrics: Any = None, **engine_kwargs: Any):
        self.model = model
        self.metrics = metrics  # a fastllm.server.metrics.EngineMetrics, or None
        self._engine_kwargs = engine_kwargs
        self.engine = LLMEngine(model, **engine_kwargs)  # bad kwargs raise here, in the caller
        self._cond = threading.Condition()
        self._new: list[_Job] = []
        self._aborts: list[_Job] = []
        self._stopping = False
        self._live: dict[int, _Job] = {}  # engine request id -> job; engine thread only
        self._thread: threading.Thread | None = None
        self.num_failures = 0  # steps that raised

    # ------------------------------------------------------------- caller side
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="fastllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is in flight with EngineStopped and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._live) + len(self._new)

    async def submit(self, prompts: list[Any], params: dict[str, Any]) -> GenerationStream:
        """Add one engine request per prompt (prompt i seeded as row i of a
        ``Model.generate`` batch). Raises what ``add_request`` raised for the
        first prompt it refused (the others are dropped), or EngineStopped."""
        sink = _Sink(asyncio.get_running_loop())
        jobs = [_Job(p, params, i, sink) for i, p in enumerate(prompts)]
        with self._cond:
            if self._stopping or not self.is_alive:
                raise EngineStopped("the engine is not running")
            self._new.extend(jobs)
            self._cond.notify()
        stream = GenerationStream(self, jobs, sink)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs), return_exceptions=True)
        except BaseException:  # cancelled while waiting
            stream.abort()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            stream.abort()
            raise errors[0]
        return stream

    def _abort(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        with self._cond:
            for j in jobs:
                j.cancelled = True
            self._aborts.extend(jobs)
            self._cond.notify()

    # ------------------------------------------------------------- engine side
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._new or self._aborts or self._stopping or self.engine.has_unfinished()):
                    self._cond.wait()
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            if stopping:
                self._shut_down(new)
                return
            try:
                self._admit(new)
                self._drop(aborts)
                outs = self.engine.step() if self.engine.has_unfinished() else []
                if self.metrics is not None:  # before delivering: a caller woken by its last token
                    self.metrics.observe_state(self.engine)  # must find the gauges already updated
                self._deliver(outs)
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                log.exception("engine step failed; failing %d request(s)", len(self._live))
                self.num_failures += 1
                if self.metrics is not None:
                    self.metrics.step_failures.inc()
                if not self._recover(e):
                    self._shut_down([])
                    return

    def _admit(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up before we got here
            if job.cancelled:
                job.future.set_exception(EngineStopped("request was cancelled"))
                continue
            try:
                rid = self.engine.add_request(job.prompt, seed_index=job.index, **job.params)
            except Exception as e:  # noqa: BLE001 - ValueError/TypeError are the caller's 400
                job.future.set_exception(e)
                continue
            job.request_id = rid
            self._live[rid] = job
            job.future.set_result(rid)

    def _drop(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.request_id is not None and self._live.pop(job.request_id, None) is not None:
                self.engine.abort(job.request_id)

    def _deliver(self, outs: list[StepOutput]) -> None:
        by_sink: dict[_Sink, list[Any]] = defaultdict(list)
        now = time.monotonic()
        for out in outs:
            job = self._live.get(out.request_id)
            if job is None:
                continue
            if job.first_token is None and out.token_ids:
                job.first_token = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - job.arrival)
            if out.finished:
                del self._live[out.request_id]
                if self.metrics is not None and out.output is not None:
                    self.metrics.observe_finished(out.output, job.arrival, job.first_token or now, now)
            by_sink[job.sink].append((job.index, out))
        for sink, items in by_sink.items():
            sink.put(items)

    def _fail_live(self, error: Exception) -> list[int]:
        """Send ``error`` to every live request's caller; forget them."""
        for sink in {job.sink for job in self._live.values()}:
            sink.put([error])
        ids = list(self._live)
        self._live.clear()
        return ids

    def _recover(self, cause: Exception) -> bool:
        """After a failed step: fail and drop the requests in flight; keep the
        engine if it is clean, else build a new one. False if that failed too."""
        ids = self._fail_live(EngineError(f"the engine failed: {type(cause).__name__}: {cause}"))
        try:
            for rid in ids:
                self.engine.abort(rid)
            blocks = self.engine.blocks
            if not self.engine.has_unfinished() and blocks.num_free == blocks.num_blocks:
                return True
        except Exception:  # noqa: BLE001
            log.exception("engine state is inconsistent after the failure")
        log.warning("rebuilding the engine (the prefix cache is lost)")
        self.engine = None  # type: ignore[assignment]  # free the old KV cache first
        try:
            self._release_gpu_cache()
            self.engine = LLMEngine(self.model, **self._engine_kwargs)
            return True
        except Exception:  # noqa: BLE001
            log.exception("could not rebuild the engine; the server stops taking requests")
            return False

    def _release_gpu_cache(self) -> None:
        import torch

        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _shut_down(self, new: list[_Job]) -> None:
        with self._cond:
            self._stopping = True
            new = new + self._new
            self._new = []
        error = EngineStopped("the server is shutting down")
        for job in new:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
        self._fail_live(error)
