"""Parity with transformers for every supported architecture (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import ARCHS, make_checkpoint
from fastllm import Model


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, request.param, tokenizer=False)
    hf.generation_config.eos_token_id = None
    return hf, Model.from_pretrained(path, device="cpu"), path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 41), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits
    out = model.forward(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-4


def test_greedy_matches_transformers(pair):
    hf, model, _ = pair
    prompt = [1, 17, 42, 99, 7, 250, 31]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)[0, len(prompt) :].tolist()
    out = model.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    assert out.prompt_token_ids == prompt


def test_batch_of_different_lengths_matches_single(pair):
    _, model, _ = pair
    prompts = [[1, 5, 9], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 77]]
    batch = model.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert isinstance(batch, list) and len(batch) == 3
    for p, out in zip(prompts, batch):
        assert out.token_ids == model.generate(p, max_new_tokens=12, ignore_eos=True).token_ids


def test_bf16_error_within_twice_torch_bf16(pair, tmp_path):
    hf, _, path = pair
    ids = torch.randint(3, 384, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        hf16 = hf.to(torch.bfloat16)
        torch_err = _rel(hf16(ids).logits, ref)
        hf.to(torch.float32)
    model = Model.from_pretrained(path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ours = _rel(model.forward(ids), ref)
    assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)


@pytest.mark.parametrize("window", [5, 16])
def test_mistral_sliding_window(tmp_path, window):
    hf = make_checkpoint(tmp_path, "mistral", tokenizer=False, sliding_window=window)
    hf.generation_config.eos_token_id = None
    model = Model.from_pretrained(tmp_path, device="cpu")
    assert model.config.sliding_window == window
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        greedy = hf.generate(ids[:1, :20], do_sample=False, max_new_tokens=25)[0, 20:].tolist()
    assert _rel(model.forward(ids), ref) < 1e-4
    assert model.generate(ids[0, :20].tolist(), max_new_tokens=25, ignore_eos=True).token_ids == greedy


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_checkpoint(tmp_path / "one", "llama", tokenizer=False)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = Model.from_pretrained(tmp_path / "one", device="cpu")
    b = Model.from_pretrained(tmp_path / "sharded", device="cpu")
    ids = torch.randint(3, 384, (1, 9))
    assert torch.equal(a.forward(ids), b.forward(ids))


def test_context_limit_finishes_with_length(tmp_path):
    make_checkpoint(tmp_path, "llama", tokenizer=False, max_position_embeddings=24)
    model = Model.from_pretrained(tmp_path, device="cpu")
    out = model.generate(list(range(3, 23)), max_new_tokens=50, ignore_eos=True)
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        model.generate(list(range(3, 27)), max_new_tokens=5)
    with pytest.raises(ValueError, match="context"):
        model.forward(torch.randint(3, 384, (1, 25)))
