"""Loading Hugging Face safetensors checkpoints into a ``Transformer``.

Every checkpoint tensor name maps to a view of one of our parameters (q/k/v go
to slices of the fused ``qkv_proj``, gate/up to ``gate_up_proj``, Mixtral's
per-expert w1/w3/w2 to the stacked ``w13``/``w2``). Loading copies each tensor
into its view, converting dtype and device on the way, and fails loudly on a
missing, unexpected or wrongly shaped tensor. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastllm.model.transformer import Transformer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some exporters write that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
PROGRESS_MIN_BYTES = 64 << 20


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} lists shards that are not in {path}: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); fastllm loads safetensors "
            "only, because unpickling can run arbitrary code. Convert once, where you trust the file:\n"
            "  python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
        )
    raise FileNotFoundError(f"no model weights (*.safetensors) in {path}")


def _rows(module: nn.Module, parts: list[tuple[str, int, int]], targets: dict[str, Tensor]) -> None:
    """Targets for a (possibly fused, possibly quantized) linear module: each of
    its tensors (weight/bias, or qweight/scales/zeros/bias) split by output rows
    into the checkpoint's per-projection names ``parts = [(hf_name, start, end)]``."""
    for tname in module.tensor_names:
        tensor = getattr(module, tname, None)
        if tensor is not None:
            for hf_name, start, end in parts:
                targets[f"{hf_name}.{tname}"] = tensor[start:end]


def checkpoint_targets(model: Transformer) -> dict[str, Tensor]:
    """Map every expected Hugging Face tensor name to the view it fills."""
    cfg = model.config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    t: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        _rows(model.lm_head, [("lm_head", 0, cfg.vocab_size)], t)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        t[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        attn = layer.self_attn
        qkv = [(p + "self_attn.q_proj", 0, q), (p + "self_attn.k_proj", q, q + kv), (p + "self_attn.v_proj", q + kv, q + 2 * kv)]
        _rows(attn.qkv_proj, qkv, t)
        _rows(attn.o_proj, [(p + "self_attn.o_proj", 0, cfg.hidden_size)], t)
        if cfg.is_moe:
            moe = layer.mlp
            t[p + "block_sparse_moe.gate.weight"] = moe.gate.weight
            for e in range(cfg.num_experts):
                ep = p + f"block_sparse_moe.experts.{e}."
                t[ep + "w1.weight"] = moe.w13[e, :inter]
                t[ep + "w3.weight"] = moe.w13[e, inter:]
                t[ep + "w2.weight"] = moe.w2[e]
        else:
            mlp = layer.mlp
            _rows(mlp.gate_up_proj, [(p + "mlp.gate_proj", 0, inter), (p + "mlp.up_proj", inter, 2 * inter)], t)
            _rows(mlp.down_proj, [(p + "mlp.down_proj", 0, cfg.hidden_size)], t)
    return t


def load_weights(model: Transformer, path: Path, progress: bool | None = None) -> None:
    """Fill ``model``'s parameters from the safetensors files in ``path``."""
    files = checkpoint_files(path)
    targets = checkpoint_targets(model)
    total = sum(f.stat().st_size for f in files)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    loaded: set[str] = set()
    unexpected: list[str] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        target = targets.get(name)
                        if target is None:
                            if not (_IGNORED.match(name) or (name == "lm_head.weight" and model.lm_head is None)):
                                unexpected.append(name)
                            continue
                        tensor = f.get_tensor(name)
                        if tuple(tensor.shape) != tuple(target.shape):
                            raise ValueError(
                                f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                                f"but config.json implies {tuple(target.shape)}"
                            )
                        if tensor.is_floating_point() != target.is_floating_point() or (
                            not target.is_floating_point() and tensor.dtype != target.dtype
                        ):
                            raise ValueError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected {target.dtype}")
                        target.copy_(tensor)
                        loaded.add(name)
                        bar.update(tensor.numel() * tensor.element_size())
            except SafetensorError as e:
                raise ValueError(f"{file} is not a valid safetensors file: {e}") from e
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensors that {model.config.architecture} does not use, "
            f"e.g. {unexpected[:5]}; is config.json right for these weights?"
        )
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def save_weights(model: Transformer, path: Path) -> None:
    """Write the network's tensors under their Hugging Face names to
    ``path/model.safetensors`` (fused projections split back by rows)."""
    tensors = {name: view.detach().contiguous().cpu() for name, view in checkpoint_targets(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
