"""GPTQ (v1, v2) and AWQ checkpoints, built here from the formats' description
(no GPTQ/AWQ library), load as fastllm int4 models: exact integers and scales,
the logits of the dequantized network, save/reload, and clear refusals.

The packers below are written from the format description, independently of
``fastllm.quant_formats``:
- GPTQ ``qweight`` int32 [K/8, N]: nibble i (bits 4i..4i+3) of word [r, n] is q[8r + i, n].
- GPTQ ``qzeros`` int32 [K/g, N/8]: nibble i of word [j, c] is the zero of column 8c + i,
  stored minus one in the v1 format ("gptq"), as is in "gptq_v2".
- AWQ ``qweight`` int32 [K, N/8] and ``qzeros`` [K/g, N/8]: nibble i of word [., c]
  holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i].
- ``scales`` fp16 [K/g, N]; ``w[n, k] = (q[k, n] - zero[k // g, n]) * scales[k // g, n]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from fastllm import Model
from fastllm.model.layers import Linear
from fastllm.model.weights import checkpoint_targets
from fastllm.ops.reference import unpack_int4
from fastllm.quant import Int4Linear

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
IDS = torch.randint(3, 384, (2, 13), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- #
# Independent packers and a checkpoint writer
# --------------------------------------------------------------------------- #
def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(v: torch.Tensor) -> torch.Tensor:
    """int [K, N] -> int32 [K/8, N]: row 8r + i goes to nibble i of row r."""
    out = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for i in range(8):
        out |= v[i::8].long() << (4 * i)
    return _int32(out)


def pack_cols(v: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int [R, N] -> int32 [R, N/8]: column 8c + order[i] goes to nibble i of column c."""
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        out |= v[:, col::8].long() << (4 * i)
    return _int32(out)


def _prefixes(src: Path, experts: bool, lm_head: bool) -> list[str]:
    """The projections of a checkpoint a GPTQ/AWQ export quantizes: every 2-D
    ``.weight`` but the embeddings, MoE routers and Qwen2-MoE's one-row shared
    expert gates (experts only if ``experts``, the LM head only if ``lm_head``)."""
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        names = [n[: -len(".weight")] for n in f.keys() if n.endswith(".weight") and len(f.get_slice(n).get_shape()) == 2]
    skip = ("model.embed_tokens", "lm_head") if not lm_head else ("model.embed_tokens",)
    return sorted(n for n in names if n not in skip and not n.endswith((".gate", ".shared_expert_gate"))
                  and (experts or ".experts." not in n))


def write_quantized(src: Path, out: Path, plain: Path, fmt: str, group: int, *, keep=(), experts=True,
                    lm_head=False, desc_act=False, seed=0) -> dict[str, tuple]:
    """Quantize every projection of the checkpoint ``src`` (except the prefixes in
    ``keep``) with random integers, zeros and fp16 scales; write it in ``fmt``
    ("gptq", "gptq_v2", "awq") to ``out`` and the dequantized weights as a plain
    fp32 checkpoint to ``plain``. Returns {prefix: (q [N, K], zeros [N, K/g],
    scales fp16 [N, K/g], w fp32 [N, K])}."""
    g = torch.Generator().manual_seed(seed)
    sd = load_file(src / "model.safetensors")
    qsd, psd, chosen = dict(sd), dict(sd), {}
    for prefix in _prefixes(src, experts, lm_head):
        if prefix in keep:
            continue
        n, k = sd[prefix + ".weight"].shape
        q = torch.randint(0, 16, (n, k), generator=g)
        lo = 1 if fmt == "gptq" else 0  # v1 stores zero - 1 in a nibble: real zeros 1..16
        z = torch.randint(lo, lo + 16, (n, k // group), generator=g)
        s = (torch.rand(n, k // group, generator=g) * 0.03 + 0.005).half()
        w = (q.float() - z.float().repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)
        chosen[prefix] = (q, z, s, w)
        del qsd[prefix + ".weight"]
        psd[prefix + ".weight"] = w
        if fmt == "awq":
            qsd[prefix + ".qweight"] = pack_cols(q.T, AWQ_PACK_ORDER)
            qsd[prefix + ".qzeros"] = pack_cols(z.T, AWQ_PACK_ORDER)
        else:
            qsd[prefix + ".qweight"] = pack_rows(q.T)
            qsd[prefix + ".qzeros"] = pack_cols(z.T - (1 if fmt == "gptq" else 0))
            qsd[prefix + ".g_idx"] = (torch.arange(k) // group).to(torch.int32)
        qsd[prefix + ".scales"] = s.T.contiguous()
        if prefix + ".bias" in sd:  # stored in fp16, as GPTQ/AWQ do
            qsd[prefix + ".bias"] = sd[prefix + ".bias"].half()
            psd[prefix + ".bias"] = qsd[prefix + ".bias"].float()
    config = json.loads((src / "config.json").read_text())
    if fmt == "awq":
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": [p.split(".")[-1] for p in keep] or None}
    else:
        qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": False,
                "checkpoint_format": fmt, "true_sequential": True, "damp_percent": 0.01}
    for d, tensors, extra in ((out, qsd, {"quantization_config": qcfg}), (plain, psd, {})):
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():  # tokenizer and generation files, as the checkpoint has them
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, d / f.name)
        save_file({k_: v.contiguous() for k_, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**config, **extra}))
    return chosen


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random transformers checkpoints (K in {64, 128}: groups 32 and 64 fit), by arch."""
    made = {}
    for arch in ("llama3", "qwen2", "mixtral", "qwen3_moe", "qwen2_moe"):
        made[arch] = tmp_path_factory.mktemp(arch)
        extra = {"moe_intermediate_size": 64} if arch.endswith("_moe") else {}
        if arch == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = 64
        make_checkpoint(made[arch], arch, intermediate_size=128, tokenizer=arch == "qwen2", **extra)
    return made.__getitem__


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_tensors(model: Model, chosen: dict) -> None:
    """The loaded tensors are exactly the ones chosen: ints and scales in int4
    modules, the dequantized weight where fastllm keeps 16-bit."""
    t = checkpoint_targets(model.network)
    for prefix, (q, z, s, w) in chosen.items():
        if prefix + ".qweight" in t:
            assert torch.equal(unpack_int4(t[prefix + ".qweight"]).long(), q), prefix
            assert torch.equal(t[prefix + ".zeros"].long(), z), prefix
            assert torch.equal(t[prefix + ".scales"], s.float()), prefix
        else:
            assert torch.equal(t[prefix + ".weight"], w), prefix


def _check_save_reload(model: Model, logits: torch.Tensor, tmp_path: Path) -> None:
    """save_pretrained writes fastllm's own format, which loads back to the same tensors and logits."""
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "fastllm" and saved["group_size"] == model.network.quantization.group_size
    again = Model.from_pretrained(tmp_path / "saved", device="cpu")
    assert again.network.quantization == model.network.quantization
    before, after = checkpoint_targets(model.network), checkpoint_targets(again.network)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(again.forward(IDS), logits)


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
@pytest.mark.parametrize("fmt, group, desc_act", [("gptq", 64, False), ("gptq_v2", 32, True), ("awq", 32, False)])
def test_load_matches_dequantized_checkpoint(sources, tmp_path, arch, fmt, group, desc_act):
    src = sources(arch)
    chosen = write_quantized(src, tmp_path / "q", tmp_path / "plain", fmt, group, desc_act=desc_act)
    model = Model.from_pretrained(tmp_path / "q", device="cpu")
    quant = model.network.quantization
    assert (quant.method, quant.group_size, quant.lm_head, quant.skip_modules) == ("int4", group, False, ())
    layer = model.network.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    if arch == "qwen2":
        assert layer.self_attn.qkv_proj.bias is not None
    _check_tensors(model, chosen)
    if fmt == "gptq":  # real zeros 1..16 (stored 0..15): the 16s survive the repacking
        assert max(int(z.max()) for _, z, _, _ in chosen.values()) == 16
    logits = model.forward(IDS)
    assert _rel(logits, Model.from_pretrained(tmp_path / "plain", device="cpu").forward(IDS)) < 1e-5
    _check_save_reload(model, logits, tmp_path)
    if arch == "qwen2":
        assert (tmp_path / "saved" / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_experts_dequantized_and_lm_head_int4(sources, tmp_path, arch):
    """Quantized MoE experts load dequantized into fastllm's 16-bit expert
    tensors; a quantized (untied) LM head loads as int4, and so does
    Qwen2-MoE's quantized shared expert (its gate stays 16-bit)."""
    chosen = write_quantized(sources(arch), tmp_path / "q", tmp_path / "plain", "gptq", 32, lm_head=True)
    assert any(".experts." in p for p in chosen)
    model = Model.from_pretrained(tmp_path / "q", device="cpu")
    assert model.network.quantization.lm_head and isinstance(model.network.lm_head, Int4Linear)
    assert model.network.quantization.skip_modules == ()
    assert isinstance(model.network.layers[1].self_attn.o_proj, Int4Linear)
    if arch == "qwen2_moe":
        moe = model.network.layers[0].mlp
        assert any(".shared_expert." in p for p in chosen)
        assert isinstance(moe.shared_expert.gate_up_proj, Int4Linear) and isinstance(moe.shared_expert_gate, Linear)
    _check_tensors(model, chosen)
    logits = model.forward(IDS)
    assert _rel(logits, Model.from_pretrained(tmp_path / "plain", device="cpu").forward(IDS)) < 1e-5
    _check_save_reload(model, logits, tmp_path)


def test_unconverted_modules_stay_16bit(sources, tmp_path):
    """Projections stored unquantized (modules_to_not_convert) keep fastllm's
    module in 16-bit; a fused module with some parts quantized dequantizes them."""
    keep = ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj")
    chosen = write_quantized(sources("llama3"), tmp_path / "q", tmp_path / "plain", "awq", 64, keep=keep)
    model = Model.from_pretrained(tmp_path / "q", device="cpu")
    skip = ("layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj")
    assert model.network.quantization.skip_modules == skip
    net = model.network
    assert isinstance(net.layers[0].self_attn.qkv_proj, Linear) and isinstance(net.layers[1].mlp.down_proj, Linear)
    assert isinstance(net.layers[1].self_attn.qkv_proj, Int4Linear)
    assert isinstance(net.layers[0].mlp.down_proj, Int4Linear)
    _check_tensors(model, chosen)  # q/v of layer 0 dequantized into the 16-bit qkv_proj
    logits = model.forward(IDS)
    assert _rel(logits, Model.from_pretrained(tmp_path / "plain", device="cpu").forward(IDS)) < 1e-5
    _check_save_reload(model, logits, tmp_path)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["skip_modules"] == list(skip)


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory):
    """Base GPTQ (v2, group 32) and AWQ (group 32) checkpoints to edit."""
    root = tmp_path_factory.mktemp("quantized")
    for fmt in ("gptq_v2", "awq"):
        write_quantized(sources("llama3"), root / fmt, root / f"{fmt}-plain", fmt, 32)
    return root


@pytest.fixture(params=["gptq_v2", "awq"])
def qcopy(request, quantized, tmp_path):
    dst = tmp_path / request.param
    shutil.copytree(quantized / request.param, dst)
    return dst


def _edit_qcfg(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, **changes) -> None:
    sd = load_file(path / "model.safetensors")
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del sd[name]
        else:
            sd[name] = value
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize("changes, match", [
    (dict(bits=8), r"bits=8 is not supported.*4-bit"),
    (dict(bits=3), r"bits=3 is not supported"),
    (dict(group_size=-1), r"per-channel quantization \(group_size -1\).*32, 64 or 128"),
    (dict(group_size=100), r"group_size=100 is not supported"),
    (dict(group_size=64), r"layer model.layers.0.\w+.\w+: qzeros has shape \(\d, \d\), but config.json and the "
                          r"quantization_config imply"),
])
def test_refuses_unsupported_config(qcopy, changes, match):
    _edit_qcfg(qcopy, **changes)
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(qcopy, device="cpu")


def test_refuses_gptq_act_order(quantized, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(quantized / "gptq_v2", path)
    _edit_qcfg(path, desc_act=True)
    Model.from_pretrained(path, device="cpu")  # desc_act with the trivial g_idx: fine
    g_idx = (torch.arange(64) // 32).int()
    _edit_tensors(path, model__layers__1__mlp__up_proj__g_idx=g_idx[torch.randperm(64)])
    with pytest.raises(ValueError, match=r"model.safetensors: GPTQ layer model.layers.1.mlp.up_proj: .*act-order"):
        Model.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("changes, match", [
    (dict(checkpoint_format="marlin"), r"checkpoint_format='marlin' is not supported"),
    (dict(checkpoint_format=None, format="gptq_v3"), r"checkpoint_format='gptq_v3' is not supported"),
    (dict(dynamic={"-:.*down_proj": {}}), r"'dynamic'.*not supported"),
])
def test_refuses_gptq_variants(quantized, tmp_path, changes, match):
    shutil.copytree(quantized / "gptq_v2", tmp_path / "c")
    _edit_qcfg(tmp_path / "c", **changes)
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(tmp_path / "c", device="cpu")


@pytest.mark.parametrize("changes, match", [
    (dict(version="gemv"), r"version='gemv' is not supported.*'gemm'"),
    (dict(version="exllama"), r"version='exllama' is not supported"),
    (dict(zero_point=False), r"zero_point=false is not supported"),
])
def test_refuses_awq_variants(quantized, tmp_path, changes, match):
    shutil.copytree(quantized / "awq", tmp_path / "c")
    _edit_qcfg(tmp_path / "c", **changes)
    with pytest.raises(ValueError, match=match):
        Model.from_pretrained(tmp_path / "c", device="cpu")


def test_refuses_mismatched_layers(qcopy):
    cfg = json.loads((qcopy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (qcopy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape .* but config.json"):
        Model.from_pretrained(qcopy, device="cpu")


def test_refuses_bad_tensors(qcopy):
    qweight = load_file(qcopy / "model.safetensors")["model.layers.0.self_attn.o_proj.qweight"]
    _edit_tensors(qcopy, model__layers__0__self_attn__o_proj__qweight=qweight.float())
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.o_proj: qweight has dtype torch.float32"):
        Model.from_pretrained(qcopy, device="cpu")
    _edit_tensors(qcopy, model__layers__0__self_attn__o_proj__qweight=qweight,
                  model__layers__0__self_attn__o_proj__qzeros=None)
    with pytest.raises(ValueError, match=r"o_proj: has qweight but no qzeros"):
        Model.from_pretrained(qcopy, device="cpu")


def test_other_refusals(qcopy, quantized, tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \((GPTQ|AWQ) int4 \(group size 32\)\)"):
        Model.from_pretrained(qcopy, device="cpu", quantization="int8")
    with pytest.raises(ValueError, match="already quantized"):
        Model.from_pretrained(qcopy, device="cpu", quantization="int4-g64")
    Model.from_pretrained(qcopy, device="cpu", quantization="int4-g32")  # what it is: fine
    _edit_qcfg(qcopy, quant_method="bitsandbytes")
    with pytest.raises(ValueError, match=r"unsupported quantization_config.*GPTQ.*AWQ"):
        Model.from_pretrained(qcopy, device="cpu")
    cfg = json.loads((qcopy / "config.json").read_text())
    del cfg["quantization_config"]
    (qcopy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"look like GPTQ/AWQ packed weights.*no quantization_config"):
        Model.from_pretrained(qcopy, device="cpu")
    plain = quantized / ("awq-plain" if qcopy.name == "awq" else "gptq_v2-plain")
    shutil.copy(plain / "model.safetensors", qcopy / "model.safetensors")
    cfg["quantization_config"] = {"quant_method": qcopy.name[:4].rstrip("_"), "bits": 4, "group_size": 32}
    (qcopy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"(GPTQ|AWQ)-quantized, but it holds no \*.qweight"):
        Model.from_pretrained(qcopy, device="cpu")


def test_loads_in_half_precision(qcopy):
    """fp16 scales load exactly into an fp16 model; the logits stay close to fp32's."""
    half = Model.from_pretrained(qcopy, device="cpu", dtype="float16")
    full = Model.from_pretrained(qcopy, device="cpu")
    qkv = half.network.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.scales.dtype == torch.float16
    assert torch.equal(qkv.scales.float(), full.network.layers[0].self_attn.qkv_proj.scales)
    assert _rel(half.forward(IDS), full.forward(IDS)) < 2e-2


def test_layer_split_across_shards(qcopy):
    """A layer's qweight, qzeros and scales may sit in different shards."""
    want = Model.from_pretrained(qcopy, device="cpu").forward(IDS)
    sd = load_file(qcopy / "model.safetensors")
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    assert any(n.endswith(".qweight") for n in names[0::2]) and any(n.endswith(".scales") for n in names[1::2])
    (qcopy / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(qcopy / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (qcopy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(Model.from_pretrained(qcopy, device="cpu").forward(IDS), want)
