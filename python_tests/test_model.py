"""Parity with transformers for every supported architecture (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import ARCHS, make_checkpoint
from fastllm import Model
from fastllm.model.config import ModelConfig


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


def _save(tmp_path, hf_config, model_cls):
    torch.manual_seed(4321)
    hf = model_cls(hf_config).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(str(tmp_path))
    return hf


def _common(**kw):
    return dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.15, **kw)


def _matches_transformers(hf, model, seq=41, prompt=20, new=20):
    ids = torch.randint(3, 384, (2, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        greedy = hf.generate(ids[:1, :prompt], do_sample=False, max_new_tokens=new)[0, prompt:].tolist()
    assert _rel(model.forward(ids), ref) < 1e-4
    assert model.generate(ids[0, :prompt].tolist(), max_new_tokens=new, ignore_eos=True).token_ids == greedy


@pytest.mark.parametrize("arch", ["Qwen2", "Qwen3"])
def test_qwen_sliding_window_only_on_its_layers(tmp_path, arch):
    """With use_sliding_window, Qwen2/Qwen3 window only the layers from
    max_window_layers on (transformers' layer_types); the others see everything."""
    import transformers as tf

    cfg = getattr(tf, arch + "Config")(**_common(num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
                                                 max_window_layers=1))
    hf = _save(tmp_path, cfg, getattr(tf, arch + "ForCausalLM"))
    model = Model.from_pretrained(tmp_path, device="cpu")
    assert [model.config.layer_window(i) for i in range(3)] == [None, 6, 6]
    _matches_transformers(hf, model)


def test_qwen3_moe_renormalized_and_sparse_step(tmp_path):
    """norm_topk_prob renormalises the top-k routing weights; with
    decoder_sparse_step 2 only every second layer routes (the rest are dense)."""
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(**_common(num_hidden_layers=4, head_dim=16, num_experts=6, num_experts_per_tok=3,
                                      moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2))
    hf = _save(tmp_path, cfg, tf.Qwen3MoeForCausalLM)
    model = Model.from_pretrained(tmp_path, device="cpu")
    c = model.config
    assert (c.dense_layers, c.moe_renormalize, c.num_experts, c.moe_intermediate_size) == ((0, 2), True, 6, 32)
    _matches_transformers(hf, model)


def _qwen2_moe_config(**kw):
    import transformers as tf

    return tf.Qwen2MoeConfig(**_common(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=40, **kw))


def test_qwen2_moe_renormalized_sparse_step_no_qkv_bias(tmp_path):
    """Qwen2-MoE with norm_topk_prob (renormalised top-k), decoder_sparse_step 2
    (layers 0 and 2 dense, with intermediate_size) and qkv_bias false."""
    import transformers as tf

    hf = _save(tmp_path, _qwen2_moe_config(num_hidden_layers=4, norm_topk_prob=True, decoder_sparse_step=2,
                                           qkv_bias=False), tf.Qwen2MoeForCausalLM)
    model = Model.from_pretrained(tmp_path, device="cpu")
    c = model.config
    assert (c.dense_layers, c.moe_renormalize, c.num_experts, c.num_experts_per_tok) == ((0, 2), True, 6, 3)
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size, c.qkv_bias, c.o_bias) == (32, 40, False, False)
    assert model.network.layers[1].mlp.shared_expert.down_proj.in_features == 40
    _matches_transformers(hf, model)


def test_qwen2_moe_sliding_window_layers(tmp_path):
    """Qwen2-MoE windows the layers its layer_types mark; without layer_types
    transformers' default is the even layers below max_window_layers."""
    import transformers as tf

    cfg = _qwen2_moe_config(num_hidden_layers=4, use_sliding_window=True, sliding_window=6, max_window_layers=3)
    hf = _save(tmp_path, cfg, tf.Qwen2MoeForCausalLM)
    model = Model.from_pretrained(tmp_path, device="cpu")
    assert [model.config.layer_window(i) for i in range(4)] == [6, None, 6, None]
    _matches_transformers(hf, model)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["layer_types"]
    again = ModelConfig.from_dict(raw)
    assert [again.layer_window(i) for i in range(4)] == [6, None, 6, None]


@pytest.mark.parametrize("value, match", [
    (None, "missing the required field 'shared_expert_intermediate_size'"),
    (0, "shared_expert_intermediate_size must be a positive int, got 0"),
    (-8, "shared_expert_intermediate_size must be a positive int"),
    ("48", "shared_expert_intermediate_size must be a positive int, got '48'"),
])
def test_qwen2_moe_bad_shared_expert_is_refused(tmp_path, value, match):
    make_checkpoint(tmp_path, "qwen2_moe", tokenizer=False)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    if value is None:
        del raw["shared_expert_intermediate_size"]
    else:
        raw["shared_expert_intermediate_size"] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("field, value, match", [
    ("moe_intermediate_size", 0, "moe_intermediate_size must be a positive int"),
    ("qkv_bias", "yes", "qkv_bias must be true or false"),
    ("num_experts_per_tok", 7, r"num_experts_per_tok must be in \[1, 6\]"),
])
def test_qwen2_moe_bad_fields_are_refused(field, value, match):
    raw = {**_qwen2_moe_config(num_hidden_layers=2).to_dict(), "architectures": ["Qwen2MoeForCausalLM"], field: value}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("field, value, match", [
    ("layer_types", ["full_attention", "chunked_attention"], "layer_types"),
    ("sliding_window", -3, "sliding_window"),
])
def test_bad_sliding_config_is_refused(tmp_path, field, value, match):
    make_checkpoint(tmp_path, "qwen3", tokenizer=False)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw.update({"use_sliding_window": True, "sliding_window": 8, field: value})
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 24, "attention_factor": 1.3,
     "truncate": False},
    {"rope_type": "linear", "factor": 2.5},
])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    """YaRN (Qwen's long-context configs) and linear scaling, past the original context."""
    import transformers as tf

    cfg = tf.Qwen2Config(**_common(num_hidden_layers=2, rope_parameters={"rope_theta": 10000.0, **rope}))
    hf = _save(tmp_path, cfg, tf.Qwen2ForCausalLM)
    model = Model.from_pretrained(tmp_path, device="cpu")
    assert model.config.rope.type == rope["rope_type"]
    _matches_transformers(hf, model, seq=90, prompt=50, new=20)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 2.0}])
def test_rope_scaling_beside_rope_parameters_wins(tmp_path, scaling):
    """A config holding both takes rope_scaling whole, as transformers does
    (its theta from the top level, else 10000)."""
    import transformers as tf

    hf = _save(tmp_path, tf.LlamaConfig(**_common(num_hidden_layers=2)), tf.LlamaForCausalLM)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw.update(rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}, rope_scaling=scaling)
    path.write_text(json.dumps(raw))
    hf = tf.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    model = Model.from_pretrained(tmp_path, device="cpu")
    assert (model.config.rope.type, model.config.rope.factor) == ("linear", scaling["factor"])
    _matches_transformers(hf, model)
    raw["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}  # refused, not hidden behind rope_parameters
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported rope type"):
        Model.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope type"),
    ({"rope_type": "yarn", "factor": -1.0, "original_max_position_embeddings": 32}, "factor"),
])
def test_bad_rope_is_refused(tmp_path, rope, match):
    make_checkpoint(tmp_path, "llama", tokenizer=False)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(tmp_path, device="cpu")
