"""Weight-only quantization: formats, reference matmuls, models, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.ops import reference as ref
from fastllm.model.layers import Linear
from fastllm.quant import (
    Int4Linear,
    Int8Linear,
    QuantizationConfig,
    projection_slots,
    quantizable_linears,
    quantize_int4,
    quantize_int8,
)


def test_int8_roundtrip_error_is_half_a_step():
    w = torch.randn(37, 111, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,)
    err = (ref.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()  # the range is used fully
    zero_row = torch.zeros(1, 8)
    q0, s0 = quantize_int8(zero_row)
    assert torch.equal(ref.dequantize_int8(q0, s0), zero_row)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_roundtrip(group, dtype):
    w = (torch.randn(29, 4 * group, generator=torch.Generator().manual_seed(1)) + 0.3).to(dtype)
    q, s, z = quantize_int4(w, group, dtype)
    assert q.dtype == torch.uint8 and q.shape == (29, 2 * group)
    assert s.shape == z.shape == (29, 4) and s.dtype == dtype and z.dtype == torch.uint8
    values = ref.unpack_int4(q)
    assert values.max() <= 15
    deq = ref.dequantize_int4(q, s, z, group)
    step = s.float().repeat_interleave(group, dim=1)
    err = (deq - w.float()).abs()
    # half a step from rounding; at a group's ends up to a whole step, since the
    # integer zero point shifts the grid by up to half a step and values clamp
    assert (err <= step * 1.01).all()
    assert (err <= step / 2 + step * 1e-2).float().mean() > 0.95
    assert err.mean() <= (step / 4).mean() * 1.2
    if dtype == torch.float32:  # values on the grid survive a second quantization
        q2, s2, z2 = quantize_int4(deq, group, dtype)
        torch.testing.assert_close(ref.dequantize_int4(q2, s2, z2, group), deq, rtol=1e-5, atol=1e-5)


def test_packing_order_low_nibble_first():
    q = torch.tensor([[0x21, 0xF3]], dtype=torch.uint8)
    assert ref.unpack_int4(q).tolist() == [[1, 2, 3, 15]]


def test_quantized_linears_match_dequantized_matmul():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 128, generator=g), torch.randn(33, 128, generator=g), torch.randn(33, generator=g)
    q, s = quantize_int8(w)
    torch.testing.assert_close(ref.int8_linear(x, q, s, b), x @ ref.dequantize_int8(q, s).T + b)
    q4, s4, z4 = quantize_int4(w, 64, torch.float32)
    torch.testing.assert_close(
        ref.int4_linear(x, q4, s4, z4, 64, b), x @ ref.dequantize_int4(q4, s4, z4, 64).T + b
    )


@pytest.mark.parametrize(
    "value, expect",
    [("int8", ("int8", 128)), ("int4", ("int4", 128)), ("int4-g32", ("int4", 32)), ("INT4-G64", ("int4", 64))],
)
def test_parse(value, expect):
    cfg = QuantizationConfig.parse(value)
    assert (cfg.method, cfg.group_size) == expect


@pytest.mark.parametrize("value", ["int3", "int4-g100", "int8-g32", "int4-gx", "fp8", "int8-g", "int4-g", "int4-g064"])
def test_parse_rejects(value):
    with pytest.raises(ValueError):
        QuantizationConfig.parse(value)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(method="int8", group_size=7), ValueError, "int8 is per output channel"),
    (dict(method="int4", group_size=True), TypeError, "group_size must be an int"),
    (dict(method="int4", lm_head="no"), TypeError, "lm_head must be a bool"),
    (dict(method="int4", skip_modules="layers.0.mlp.down_proj"), ValueError, "skip_modules"),
])
def test_config_rejects(kwargs, err, match):
    with pytest.raises(err, match=match):
        QuantizationConfig(**kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("group_size", "abc", "group_size must be an int"),
    ("group_size", None, "group_size must be an int"),
    ("lm_head", "false", "lm_head must be a bool"),
    ("skip_modules", "layers.0.mlp.down_proj", "skip_modules must be a list"),
])
def test_saved_config_fields_are_checked(field, value, match):
    raw = {**QuantizationConfig("int4", 64).to_json(), field: value}
    with pytest.raises(ValueError, match=f"config.json: quantization_config: {match}"):
        QuantizationConfig.from_json(raw)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mixtral", "qwen3_moe", "qwen2_moe"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    extra = {"shared_expert_intermediate_size": 64} if request.param == "qwen2_moe" else {}
    make_checkpoint(path, request.param, intermediate_size=128, **extra)  # K in {64, 128}: groups 32 and 64 fit
    return path


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _dequantized_copy(ckpt, quantized: Model) -> Model:
    """The full-precision model with each quantized projection's weight replaced
    by its dequantized values: what the quantized model must compute."""
    full = Model.from_pretrained(ckpt, device="cpu")
    cfg = quantized.network.quantization
    pairs = zip(quantizable_linears(full.network, cfg), quantizable_linears(quantized.network, cfg))
    with torch.no_grad():
        for (fp, name), (qp, _) in pairs:
            q = getattr(qp, name)
            if cfg.method == "int8":
                w = ref.dequantize_int8(q.qweight, q.scales)
            else:
                w = ref.dequantize_int4(q.qweight, q.scales, q.zeros, q.group_size)
            getattr(fp, name).weight.copy_(w)
    return full


def test_quantized_model_computes_with_dequantized_weights(ckpt):
    ids = torch.randint(3, 384, (2, 17), generator=torch.Generator().manual_seed(3))
    full = Model.from_pretrained(ckpt, device="cpu").forward(ids)
    errs = {}
    for q in ("int8", "int4-g32", "int4-g64"):
        model = Model.from_pretrained(ckpt, device="cpu", quantization=q)
        assert model.network.quantization == QuantizationConfig.parse(q)
        out = model.forward(ids)
        torch.testing.assert_close(out, _dequantized_copy(ckpt, model).forward(ids), rtol=1e-4, atol=1e-4)
        errs[q] = _rel(out, full)
    # fewer bits or coarser groups cost accuracy (random weights, large init: errors compound)
    assert 0 < errs["int8"] < 0.05, errs
    assert errs["int8"] * 3 < errs["int4-g32"] <= errs["int4-g64"] * 1.05, errs


@pytest.mark.parametrize("q", ["int8", "int4-g32"])
def test_qwen2_moe_shared_expert_quantized_like_a_dense_mlp(tmp_path, q):
    """The shared expert's gate/up and down are quantized; its one-logit gate,
    the router and the routed experts stay 16-bit; the dense layer's MLP too is quantized."""
    make_checkpoint(tmp_path, "qwen2_moe", tokenizer=False, intermediate_size=128, shared_expert_intermediate_size=64)
    model = Model.from_pretrained(tmp_path, device="cpu", quantization=q)
    kind = Int8Linear if q == "int8" else Int4Linear
    moe, dense = model.network.layers[0].mlp, model.network.layers[1].mlp
    assert isinstance(moe.shared_expert.gate_up_proj, kind) and isinstance(moe.shared_expert.down_proj, kind)
    assert isinstance(moe.shared_expert_gate, Linear) and isinstance(moe.gate, Linear)
    assert moe.w13.is_floating_point() and isinstance(dense.down_proj, kind)
    paths = {path for path, _, _ in projection_slots(model.network)}
    assert {"layers.0.mlp.shared_expert.gate_up_proj", "layers.0.mlp.shared_expert.down_proj"} <= paths
    assert not any("shared_expert_gate" in p or p.endswith("mlp.gate") for p in paths)


@pytest.mark.parametrize("q", ["int8", "int4-g32"])
def test_save_and_reload_quantized(ckpt, tmp_path, q):
    model = Model.from_pretrained(ckpt, device="cpu", quantization=q)
    model.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["method"] == q[:4]
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    again = Model.from_pretrained(tmp_path / "q", device="cpu")
    assert again.network.quantization == model.network.quantization
    ids = torch.randint(3, 384, (1, 11))
    assert torch.equal(again.forward(ids), model.forward(ids))
    assert again.generate("ROMEO:", max_new_tokens=8).token_ids == model.generate("ROMEO:", max_new_tokens=8).token_ids
    with pytest.raises(ValueError, match="already quantized"):
        Model.from_pretrained(tmp_path / "q", device="cpu", quantization="int4-g64" if q == "int8" else "int8")
    method, group = QuantizationConfig.parse(q).method, QuantizationConfig.parse(q).group_size
    with pytest.raises(ValueError, match="its lm_head is not quantized"):  # not silently ignored
        Model.from_pretrained(tmp_path / "q", device="cpu", quantization=QuantizationConfig(method, group, True))
    with pytest.raises(ValueError, match=r"it keeps no modules in 16-bit"):
        Model.from_pretrained(tmp_path / "q", device="cpu",
                              quantization=QuantizationConfig(method, group, skip_modules=["layers.0.mlp.down_proj"]))
    # loading the saved checkpoint as it is, or with the same config, is fine
    Model.from_pretrained(tmp_path / "q", device="cpu", quantization=q)


def test_int4_zero_points_out_of_range_are_refused(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    Model.from_pretrained(ckpt, device="cpu", quantization="int4-g32").save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    name = next(n for n in tensors if n.endswith(".zeros"))
    tensors[name][0, 0] = 200
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match=r"zero points .* reach 200; at most 127"):
        Model.from_pretrained(tmp_path / "q", device="cpu")


def test_unquantized_save_loads_in_transformers(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model = Model.from_pretrained(ckpt, device="cpu")
    model.save_pretrained(tmp_path / "plain")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    ids = torch.randint(3, 384, (1, 13))
    with torch.no_grad():
        assert _rel(model.forward(ids), hf(ids).logits) < 1e-4
    with pytest.raises(ValueError, match="overwrite"):
        model.save_pretrained(ckpt)


def test_group_size_falls_back_where_it_does_not_divide(tmp_path):
    make_checkpoint(tmp_path, "llama", tokenizer=False)  # hidden 64, intermediate 96
    with pytest.warns(UserWarning, match=r"down_proj \(in_features 96\): using group size 32"):
        model = Model.from_pretrained(tmp_path, device="cpu", quantization="int4-g128")
    layer = model.network.layers[0]
    assert (layer.self_attn.qkv_proj.group_size, layer.mlp.down_proj.group_size) == (64, 32)
    assert model.network.quantization.group_size == 128
    model.save_pretrained(tmp_path / "q")
    again = Model.from_pretrained(tmp_path / "q", device="cpu")
    assert again.network.layers[0].mlp.down_proj.group_size == 32
    ids = torch.randint(3, 384, (1, 9))
    assert torch.equal(again.forward(ids), model.forward(ids))
    torch.testing.assert_close(model.forward(ids), _dequantized_copy(tmp_path, model).forward(ids),
                               rtol=1e-4, atol=1e-4)


def test_bad_quantization_requests(tmp_path):
    make_checkpoint(tmp_path / "odd", "llama", tokenizer=False, intermediate_size=80)  # 80: no group of 32 fits
    with pytest.raises(ValueError, match="cannot quantize layers.0.mlp.down_proj to int4: in_features 80 is not a "
                                         "multiple of any supported group size.*skip_modules"):
        Model.from_pretrained(tmp_path / "odd", device="cpu", quantization="int4-g64")
    skip = [f"layers.{i}.mlp.down_proj" for i in range(2)]  # as the message says: those layers stay 16-bit
    model = Model.from_pretrained(tmp_path / "odd", device="cpu", quantization=QuantizationConfig("int4", 64,
                                                                                              skip_modules=skip))
    assert model.network.layers[0].mlp.down_proj.weight.dtype == torch.float32
    make_checkpoint(tmp_path, "llama", tokenizer=False)
    with pytest.raises(ValueError, match="unknown quantization"):
        Model.from_pretrained(tmp_path, device="cpu", quantization="int2")
    with pytest.raises(TypeError):
        Model.from_pretrained(tmp_path, device="cpu", quantization=8)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTQ"):
        Model.from_pretrained(tmp_path, device="cpu")
