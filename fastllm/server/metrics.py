"""Prometheus metrics of the server (``GET /metrics``), named as vLLM's are
with a ``fastllm:`` prefix, so dashboards built for one read the other:

- gauges, as of the engine's last step: ``num_requests_running``,
  ``num_requests_waiting``, ``kv_cache_usage_perc`` (0..1, blocks in use),
  ``prefix_cache_hit_rate`` (0..1, prompt tokens served from the cache);
- counters: ``prompt_tokens_total``, ``generation_tokens_total``,
  ``request_success_total{finished_reason}``, ``num_preemptions_total``,
  ``spec_decode_num_draft_tokens_total`` and
  ``spec_decode_num_accepted_tokens_total``; ``engine_step_failures_total``;
- histograms (seconds): ``time_to_first_token_seconds`` (from the request
  reaching the engine thread's queue to its first token),
  ``e2e_request_latency_seconds``, ``request_time_per_output_token_seconds``
  (after the first token).

Every value is written by the engine thread (``AsyncEngine``) and read by the
scrape; prometheus_client's metrics are thread-safe. Each app has its own
registry. Needs ``prometheus_client`` (in the ``server`` extras); without it
``create_metrics`` returns None and ``/metrics`` answers 404.
"""

from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineMetrics:
    """The server's metrics in one registry, for ``model_name``."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"fastllm:{name}", doc, **label).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"fastllm:{name}", doc, **label).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(f"fastllm:{name}", doc, buckets=buckets, **label).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated for finished requests.")
        self._success = Counter("fastllm:request_success", "Finished requests, by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.step_failures = counter("engine_step_failures", "Engine steps that raised.")
        self.preemptions = counter("num_preemptions", "Requests preempted (to be recomputed) for KV cache space.")
        self._seen_preemptions: tuple[int, int] = (0, 0)  # (id of the engine, its count) last observed
        self.ttft = histogram("time_to_first_token_seconds", "Time to the first token.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Time per output token after the first.", _TPOT_BUCKETS)
        self.model_name = model_name

    def observe_state(self, engine: Any) -> None:
        """The gauges from the engine's state (engine thread, after a step)."""
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        blocks = engine.blocks
        self.kv_usage.set(1.0 - blocks.num_free / blocks.num_blocks if blocks.num_blocks else 0.0)
        self.prefix_hit_rate.set(engine.prefix_cache_hit_rate)
        engine_id, seen = self._seen_preemptions
        if engine_id != id(engine):  # a rebuilt engine counts from zero
            seen = 0
        self.preemptions.inc(max(engine.num_preemptions - seen, 0))
        self._seen_preemptions = (id(engine), engine.num_preemptions)

    def observe_finished(self, output: Any, arrival: float, first_token: float, now: float) -> None:
        """A finished request's counters and latencies (times from time.monotonic)."""
        n = len(output.token_ids)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(n)
        self._success.labels(self.model_name, output.finish_reason).inc()
        self.draft_tokens.inc(output.num_draft_tokens)
        self.accepted_tokens.inc(output.num_accepted_draft_tokens)
        self.e2e.observe(now - arrival)
        if n > 1:
            self.tpot.observe((now - first_token) / (n - 1))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_metrics(model_name: str) -> EngineMetrics | None:
    """The metrics, or None where prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return None
    return EngineMetrics(model_name)
