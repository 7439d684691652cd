"""Whole-loop generation speed: fastllm beside transformers' generate.

Random-weight checkpoints in the shapes of real models (Llama-3.2-1B, and a
small one that also runs on CPU; Llama-3-8B with FASTLLM_BENCH_8B=1, ~16 GB
of GPU memory and disk), greedy decoding of a fixed number of tokens at batch
1, EOS ignored, fastllm in bf16 and with int8 / int4 weights (GPU only).
Reports decode tokens per second in extra_info.

    pytest bench/bench_generate.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

from fastllm import Model

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "small-15M": (384, 1024, 8, 6, 2, 8192),
    "llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256),
}
if os.environ.get("FASTLLM_BENCH_8B") == "1":
    SHAPES["llama-3-8B"] = (4096, 14336, 32, 32, 8, 128256)
PROMPT_LEN, NEW_TOKENS = 32, 128


def _device_for(shape: str) -> str:
    if torch.cuda.is_available():
        return "cuda"
    if shape != "small-15M":
        pytest.skip("large shapes need a GPU")
    return "cpu"


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    import transformers as tf

    hidden, inter, layers, heads, kv, vocab = SHAPES[request.param]
    device = _device_for(request.param)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        hf = tf.LlamaForCausalLM(cfg)
    hf = hf.to_empty(device=device).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(path))
    hf.generation_config.eos_token_id = None
    return request.param, path, hf.eval(), device, dtype


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("quant", [None, "int8", "int4"], ids=["bf16", "int8", "int4"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_generate_fastllm(benchmark, checkpoint, graphs, quant):
    name, path, _, device, dtype = checkpoint
    if graphs and device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if quant and device != "cuda":
        pytest.skip("quantized generation is benchmarked on a GPU (on CPU it is the dequantising reference)")
    model = Model.from_pretrained(path, device=device, dtype=dtype, cuda_graphs=graphs, quantization=quant)
    _time_generate(benchmark, model, device)
    benchmark.extra_info.update(shape=name, cuda_graphs=graphs, quantization=quant)


def _time_generate(benchmark, model: Model, device: str) -> None:
    """Time greedy generation of NEW_TOKENS after a PROMPT_LEN prompt (3 rounds,
    after a warm-up at the timed length: graphed decoding sizes its cache and
    captures its graphs for it); tok/s into extra_info."""
    prompt = list(range(10, 10 + PROMPT_LEN))
    model.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def run():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(out.token_ids) == NEW_TOKENS
    benchmark.extra_info.update(device=device, tokens=NEW_TOKENS, tok_per_s=NEW_TOKENS / benchmark.stats.stats.mean)


@pytest.mark.parametrize("ahead", [True, False], ids=["steps-ahead", "host-synced"])
def test_generate_steps_ahead(benchmark, monkeypatch, checkpoint, ahead):
    """Graphed bf16 decoding with the steps one ahead of the host (the default,
    ``generate._overlapped``) and with every step waiting for the host
    (``can_step_ahead`` forced False): what overlapping the host's work buys."""
    from fastllm import generate

    name, path, _, device, dtype = checkpoint
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if not ahead:
        monkeypatch.setattr(generate, "can_step_ahead", lambda r: False)
    model = Model.from_pretrained(path, device=device, dtype=dtype, cuda_graphs=True)
    _time_generate(benchmark, model, device)
    benchmark.extra_info.update(shape=name, steps_ahead=ahead)


def test_generate_transformers(benchmark, checkpoint):
    name, _, hf, device, _ = checkpoint
    prompt = torch.arange(10, 10 + PROMPT_LEN, device=device)[None]
    with torch.inference_mode():
        hf.generate(prompt, do_sample=False, max_new_tokens=4)

    def run():
        with torch.inference_mode():
            out = hf.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    benchmark.extra_info.update(
        shape=name, device=device, tokens=NEW_TOKENS, tok_per_s=NEW_TOKENS / benchmark.stats.stats.mean
    )


@pytest.mark.parametrize("graphs", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("k", [0, 4], ids=["plain", "draft-k4"])
def test_generate_shipped_speculative(benchmark, k, graphs):
    """The shipped target alone and with the shipped draft (k proposals per
    round), batch 1, greedy, from the same prompt: tokens/s and acceptance;
    eagerly and as loaded by default (CUDA graphs on a GPU: the target's plain
    steps and the draft's steps replay)."""
    from fastllm.cli import default_model_path, shipped_draft_path

    target_dir, draft_dir = default_model_path(), shipped_draft_path()
    if target_dir is None or draft_dir is None:
        pytest.skip("no shipped target/draft pair")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if graphs is None and device != "cuda":
        pytest.skip("the default is eager without a GPU")
    model = Model.from_pretrained(target_dir, device=device, cuda_graphs=graphs)
    spec = {}
    if k:
        spec = dict(draft_model=Model.from_pretrained(draft_dir, device=device, dtype=model.dtype, cuda_graphs=graphs),
                    num_speculative_tokens=k)
    # warm-up at the timed length (graphed decoding sizes its cache and captures its graphs for it)
    model.generate("ROMEO:\n", max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.0, **spec)

    def run():
        out = model.generate("ROMEO:\n", max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.0, **spec)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(out.token_ids) == NEW_TOKENS
    benchmark.extra_info.update(
        device=device, tokens=NEW_TOKENS, tok_per_s=NEW_TOKENS / benchmark.stats.stats.mean,
        acceptance=out.num_accepted_draft_tokens / out.num_draft_tokens if k else None, cuda_graphs=model.cuda_graphs,
    )


@pytest.mark.parametrize("engine", [False, True], ids=["model-generate", "llm-engine"])
def test_batch_throughput(benchmark, checkpoint, engine):
    """32 prompts x 64 greedy tokens: one Model.generate batch, or the
    continuous-batching engine, as loaded by default (CUDA graphs on a GPU);
    output tokens per second."""
    from fastllm import LLMEngine

    name, path, _, device, dtype = checkpoint
    model = Model.from_pretrained(path, device=device, dtype=dtype)
    prompts = [list(range(10 + i, 10 + i + PROMPT_LEN)) for i in range(32)]
    params = dict(max_new_tokens=64, ignore_eos=True)
    runner = LLMEngine(model, max_num_seqs=32) if engine else model
    runner.generate(prompts, **params)  # warm-up at the timed sizes (graph capture)

    def run():
        outs = runner.generate(prompts, **params)
        _sync(device)
        return outs

    outs = benchmark.pedantic(run, rounds=2, iterations=1)
    assert all(len(o.token_ids) == 64 for o in outs)
    benchmark.extra_info.update(shape=name, device=device, tok_per_s=32 * 64 / benchmark.stats.stats.mean,
                                cuda_graphs=model.cuda_graphs)
