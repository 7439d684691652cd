"""Bad checkpoints and bad arguments get clear Python exceptions."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from fastllm import Model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_checkpoint(path, "llama", tokenizer=False)
    return path


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model.from_pretrained(tmp_path / "nope")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Model.from_pretrained(copy)


def test_corrupt_config(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Model.from_pretrained(copy)


def test_unknown_architecture(copy):
    ids = torch.tensor([[3, 4, 5]])
    want = Model.from_pretrained(copy, device="cpu").forward(ids)
    _edit_config(copy, architectures=None)  # the class comes from model_type, as transformers' auto classes do
    assert torch.equal(Model.from_pretrained(copy, device="cpu").forward(ids), want)
    _edit_config(copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        Model.from_pretrained(copy)
    _edit_config(copy, architectures=None)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2' .config.json names no architectures"):
        Model.from_pretrained(copy)


def test_unsupported_rope_and_activation(copy):
    _edit_config(copy, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        Model.from_pretrained(copy)
    _edit_config(copy, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        Model.from_pretrained(copy)


def test_missing_config_field(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["hidden_size"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        Model.from_pretrained(copy)


def test_no_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Model.from_pretrained(copy)


@pytest.mark.parametrize("name, how", [("pytorch_model.bin", "save_pretrained"), ("model.pt", "save_file")])
def test_pickle_checkpoint_refused_with_a_command_that_converts_it(copy, name, how):
    sd = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    torch.save(sd, copy / name)
    with pytest.raises(ValueError, match=f"(?s)pickle.*{how}") as info:
        Model.from_pretrained(copy)
    command = str(info.value).split("\n")[1].strip()
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, "-c", shlex.split(command)[2]], check=True, capture_output=True)
    ids = torch.tensor([[3, 4, 5]])
    converted = Model.from_pretrained(copy, device="cpu").forward(ids)
    (copy / name).unlink()
    save_file(sd, copy / "model.safetensors")
    assert torch.equal(converted, Model.from_pretrained(copy, device="cpu").forward(ids))


def test_corrupt_safetensors(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        Model.from_pretrained(copy)


def test_shape_mismatch(copy):
    _edit_config(copy, intermediate_size=80)
    with pytest.raises(ValueError, match="shape"):
        Model.from_pretrained(copy)


def test_missing_and_unexpected_tensors(copy):
    sd = load_file(copy / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, copy / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*up_proj"):
        Model.from_pretrained(copy)
    sd = load_file(copy / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(16)
    save_file(sd, copy / "model.safetensors")
    with pytest.raises(ValueError, match="does not use.*q_norm"):
        Model.from_pretrained(copy)


def test_missing_shard(copy):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(copy).save_pretrained(copy / "sharded", max_shard_size="40KB")
    shards = sorted((copy / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shards"):
        Model.from_pretrained(copy / "sharded")


@pytest.mark.parametrize("content, match", [
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"do_sample": True, "temperature": "hot"}, "could not convert|temperature"),
    ([1, 2], "JSON object"),
])
def test_bad_generation_config_is_refused_at_load(copy, content, match):
    """The file's defaults are checked when the model loads, and the error
    names the file (not the first generate call, as if the caller erred)."""
    (copy / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match) as info:
        Model.from_pretrained(copy, device="cpu")
    assert "generation_config.json" in str(info.value)


def test_non_finite_quantization_scales_are_refused(copy, tmp_path):
    Model.from_pretrained(copy, device="cpu", quantization="int8").save_pretrained(tmp_path / "q")
    sd = load_file(tmp_path / "q" / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.scales"][3] = float("inf")
    save_file(sd, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="scales .*q_proj.* hold NaN or infinite values"):
        Model.from_pretrained(tmp_path / "q", device="cpu")


@pytest.mark.parametrize("q", ["int8", "int4-g32"])
def test_own_quantized_weights_without_their_config_get_the_right_hint(copy, tmp_path, q):
    Model.from_pretrained(copy, device="cpu", quantization=q).save_pretrained(tmp_path / "q")
    _edit_config(tmp_path / "q", quantization_config=None)  # e.g. the base model's config.json copied over
    with pytest.raises(ValueError, match="look like fastllm's own quantized weights.*fastllm-v1"):
        Model.from_pretrained(tmp_path / "q", device="cpu")


def test_a_nan_weight_shows_in_the_logits(good):
    """The reference attention zeroes only rows with no keys: a NaN reaching it
    (a corrupt weight) stays NaN rather than turning into finite, wrong logits."""
    model = Model.from_pretrained(good, device="cpu")
    with torch.no_grad():
        model.network.layers[0].self_attn.qkv_proj.weight[0, 0] = float("nan")
    assert torch.isnan(model.forward(torch.tensor([[3, 4, 5]]))).any()


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_bad_eos_token_id_is_refused_naming_its_file(copy, file):
    path = copy / file
    raw = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**raw, "eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match=f"{file}: eos_token_id must be an int or a list of ints"):
        Model.from_pretrained(copy, device="cpu")


def test_text_without_a_tokenizer_says_what_to_copy(good):
    model = Model.from_pretrained(good, device="cpu")  # token ids work without one
    assert len(model.generate([3, 4, 5], max_new_tokens=2, ignore_eos=True).token_ids) == 2
    for call in (lambda: model.generate("x"), lambda: list(model.stream([3, 4])),
                 lambda: model.generate([3, 4], stop=["a"])):
        with pytest.raises(ValueError, match=f"{good} has no tokenizer.json: copy tokenizer.json"):
            call()


def test_save_over_a_sharded_checkpoint_replaces_it(copy, tmp_path):
    """save_pretrained into a directory holding a sharded checkpoint removes
    its index and shards (the loader prefers the index: the old weights
    would come back)."""
    from transformers import AutoModelForCausalLM

    target = tmp_path / "target"
    AutoModelForCausalLM.from_pretrained(copy).save_pretrained(target, max_shard_size="40KB")
    assert (target / "model.safetensors.index.json").is_file()
    model = Model.from_pretrained(copy, device="cpu")
    with torch.no_grad():
        model.network.lm_head.weight.mul_(2)  # differs from the checkpoint
    model.save_pretrained(target)
    assert not (target / "model.safetensors.index.json").exists() and not list(target.glob("model-*.safetensors"))
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(Model.from_pretrained(target, device="cpu").forward(ids), model.forward(ids))


@pytest.mark.parametrize("kwargs, err", [
    (dict(dtype="int8"), ValueError),
    (dict(dtype="float64"), ValueError),
    (dict(device="mps"), ValueError),
    (dict(device="tpu:0"), ValueError),
])
def test_bad_load_arguments(good, kwargs, err):
    with pytest.raises(err):
        Model.from_pretrained(good, **kwargs)


def test_cuda_requested_without_gpu(good):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA"):
        Model.from_pretrained(good, device="cuda")
