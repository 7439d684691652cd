"""fastllm bench: the latency and throughput measurements and their command."""

from __future__ import annotations

import json
import types

import pytest

from checkpoints import make_checkpoint
from fastllm import Model, benchmark
from fastllm.cli import default_model_path, main, shipped_draft_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench")
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return Model.from_pretrained(ckpt, device="cpu")


def test_synthetic_prompts_are_seeded_and_in_vocabulary():
    a = benchmark.synthetic_prompts(50, 3, 7, seed=1)
    assert a == benchmark.synthetic_prompts(50, 3, 7, seed=1) != benchmark.synthetic_prompts(50, 3, 7, seed=2)
    assert len(a) == 3 and all(len(p) == 7 and all(0 <= t < 50 for t in p) for p in a)


def test_latency_counts_and_derived_rates(model):
    r = benchmark.measure_latency(model, batch_size=2, input_len=9, output_len=5, iters=3, warmup=1, progress=False)
    assert r["mode"] == "latency" and (r["batch_size"], r["input_len"], r["output_len"]) == (2, 9, 5)
    assert [len(v) for v in r["runs"].values()] == [3, 3, 3]
    assert 0 < r["ttft_ms"] and 0 < r["itl_ms"] and r["ttft_ms"] / 1e3 < r["e2e_s"]
    assert r["prefill_tok_s"] == pytest.approx(2 * 9 / (r["ttft_ms"] / 1e3))
    assert r["decode_tok_s"] == pytest.approx(2 * 1e3 / r["itl_ms"])
    assert "acceptance_rate" not in r
    one = benchmark.measure_latency(model, input_len=4, output_len=1, iters=1, warmup=0, progress=False)
    assert one["itl_ms"] is None and one["decode_tok_s"] is None and one["ttft_ms"] > 0


def test_latency_with_a_draft_reports_acceptance():
    target = Model.from_pretrained(default_model_path(), device="cpu")
    draft = Model.from_pretrained(shipped_draft_path(), device="cpu")
    r = benchmark.measure_latency(target, input_len=8, output_len=12, iters=1, warmup=0, draft_model=draft,
                                  num_speculative_tokens=3, progress=False)
    assert r["num_speculative_tokens"] == 3 and 0.0 <= r["acceptance_rate"] <= 1.0
    assert r["itl_ms"] > 0


def test_latency_with_a_draft_counts_the_first_rounds_tokens(model, monkeypatch):
    """With a draft the first tokens come as a round (here the model drafts for
    itself: k + 1 tokens at once), so the inter-token latency divides the
    time after them by the tokens that came later, not by all but one."""
    ticks = iter(range(1000))  # start 0, first tokens 1, end 2 of each run
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    r = benchmark.measure_latency(model, input_len=6, output_len=13, iters=1, warmup=0, draft_model=model,
                                  num_speculative_tokens=3, progress=False)
    assert r["acceptance_rate"] == 1.0 and r["ttft_ms"] == 1e3
    assert r["itl_ms"] == pytest.approx(1e3 / (13 - 4))  # 4 tokens by the first clock
    ticks = iter(range(1000))
    r = benchmark.measure_latency(model, input_len=6, output_len=4, iters=1, warmup=0, draft_model=model,
                                  num_speculative_tokens=3, progress=False)
    assert r["itl_ms"] is None and r["decode_tok_s"] is None  # every token came in the first round


def test_engine_bench_with_the_shipped_draft(capsys):
    args = ["bench", "--device", "cpu", "--input-len", "8", "--output-len", "6", "--engine", "--num-prompts", "3",
            "--draft-model", "shipped", "--num-speculative-tokens", "3"]
    assert main(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["output_tokens"] == 3 * 6 and r["draft_model"] == "shipped"
    assert r["num_speculative_tokens"] == 3 and 0.0 <= r["acceptance_rate"] <= 1.0
    assert main(args) == 0
    assert "draft acceptance" in capsys.readouterr().out


def test_throughput_generates_every_token(model):
    r = benchmark.measure_throughput(model, num_prompts=5, input_len=6, output_len=4, max_num_seqs=2,
                                     progress=False)
    assert r["mode"] == "throughput" and r["output_tokens"] == 5 * 4
    assert r["output_tok_s"] == pytest.approx(20 / r["elapsed_s"])
    assert r["total_tok_s"] == pytest.approx((20 + 5 * 6) / r["elapsed_s"])
    assert r["requests_s"] == pytest.approx(5 / r["elapsed_s"])


@pytest.mark.parametrize("kwargs, match", [
    ({"input_len": 0}, "input_len"),
    ({"output_len": 2.5}, "output_len"),
    ({"batch_size": 0}, "batch_size"),
    ({"iters": 0}, "iters"),
    ({"warmup": -1}, "warmup"),
    ({"output_len": 1, "input_len": "context"}, "context"),  # the whole context, no room to generate
])
def test_latency_rejects_bad_sizes(model, kwargs, match):
    if kwargs.get("input_len") == "context":
        kwargs = {**kwargs, "input_len": model.config.max_position_embeddings}
    with pytest.raises(ValueError, match=match):
        benchmark.measure_latency(model, progress=False, **kwargs)


def test_bench_command(ckpt, capsys):
    base = ["bench", "--model", str(ckpt), "--device", "cpu", "--input-len", "8", "--output-len", "4"]
    assert main(base + ["--iters", "1", "--warmup", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "latency" and r["device"] == "cpu" and r["model"] == str(ckpt) and r["itl_ms"] > 0
    assert main(base + ["--engine", "--num-prompts", "3", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "output tokens" in out and "req/s" in out
    assert main(base + ["--engine", "--draft-model", "shipped"]) == 2  # the shipped draft's vocabulary is not ckpt's
    assert "vocabulary" in capsys.readouterr().err
    assert main(base + ["--input-len", "0"]) == 2
    assert "input_len must be a positive int" in capsys.readouterr().err
    for flags, match in ((["--engine", "--iters", "3"], "--iters applies to latency mode"),
                         (["--engine", "--batch-size", "4"], "--batch-size applies to latency mode"),
                         (["--num-prompts", "3"], "--num-prompts applies to --engine")):
        assert main(base + flags) == 2  # a flag of the other mode is refused, not ignored
        assert match in capsys.readouterr().err
