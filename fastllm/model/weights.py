"""Loading Hugging Face safetensors checkpoints into a ``Transformer``.

Every checkpoint tensor name maps to a view of one of our parameters (q/k/v go
to slices of the fused ``qkv_proj``, gate/up to ``gate_up_proj`` (Qwen2-MoE's
shared expert's too), the MoE experts' gate/up/down (Mixtral's w1/w3/w2) to the
stacked ``w13``/``w2``). Loading copies each tensor into its view, converting
dtype and device on the way, and fails loudly on a missing, unexpected or
wrongly shaped tensor. Pickle checkpoints are refused.
GPTQ/AWQ checkpoints go through a converter (``fastllm.quant_formats``) that
rewrites their packed tensors into fastllm's own before they are copied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastllm.model.config import ModelConfig
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
        raise ValueError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); fastllm loads safetensors "
                         "only, because unpickling can run arbitrary code. Convert once, where you trust the file:\n"
                         + _conversion_hint(path, pickles))
    raise FileNotFoundError(f"no model weights (*.safetensors) in {path}")


def _conversion_hint(path: Path, pickles: list[str]) -> str:
    """The command that writes model.safetensors beside the pickles, in the
    same directory (the tokenizer and generation files stay with it)."""
    if any(name.startswith("pytorch_model") for name in pickles):  # transformers' own format
        return ("  python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{path}').save_pretrained('{path}')\"")
    return ("  python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path / pickles[0]}', weights_only=True), '{path / 'model.safetensors'}')\"\n"
            "(for a file holding a plain state dict under Hugging Face tensor names)")


class CheckpointReader:
    """The tensors of a checkpoint's safetensors files by name, read on demand
    (so that tensors that belong together can be read together, whichever shard
    holds them). A context manager; the files stay memory-mapped while open."""

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, object]] = {}
        try:
            for file in files:
                try:
                    handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                    names = list(handle.keys())
                except SafetensorError as e:
                    raise ValueError(f"{file} is not a valid safetensors file: {e}") from e
                for name in names:
                    self._where.setdefault(name, (file, handle))
        except BaseException:
            self._stack.close()
            raise

    @property
    def names(self) -> list[str]:
        """Every tensor name, shard by shard in file order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file(self, name: str) -> str:
        """The name of the file that holds ``name`` (for error messages)."""
        return self._where[name][0].name

    def read(self, name: str) -> Tensor:
        file, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a valid safetensors file: {e}") from e

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A converter turns the checkpoint's tensors into (target name, tensor, bytes
# read) for ``load_weights``; tensor is None for a name it did not read because
# nothing loads it (``load_weights`` then reports it as unexpected).
Converter = Callable[[CheckpointReader, dict[str, Tensor]], Iterator[tuple[str, "Tensor | None", int]]]


def identity_converter(
    reader: CheckpointReader, targets: dict[str, Tensor]
) -> Iterator[tuple[str, Tensor | None, int]]:
    """Every checkpoint tensor under its own name (what a 16-bit or fastllm checkpoint needs)."""
    for name in reader.names:
        if name not in targets:
            yield name, None, 0
            continue
        tensor = reader.read(name)
        yield name, tensor, tensor.numel() * tensor.element_size()


def linear_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Every linear module of the network, by its path in ``Transformer``, with the
    checkpoint projections it fuses: ``[(hf_prefix, first_row, end_row)]``."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    parts: dict[str, list[tuple[str, int, int]]] = {}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        parts[m + "self_attn.qkv_proj"] = [
            (p + "self_attn.q_proj", 0, q),
            (p + "self_attn.k_proj", q, q + kv),
            (p + "self_attn.v_proj", q + kv, q + 2 * kv),
        ]
        parts[m + "self_attn.o_proj"] = [(p + "self_attn.o_proj", 0, cfg.hidden_size)]
        if cfg.is_moe_layer(i):
            parts[m + "mlp.gate"] = [(p + moe_names(cfg)[0] + ".gate", 0, cfg.num_experts)]
            shared = cfg.shared_expert_intermediate_size
            if shared:  # Qwen2-MoE: a dense SwiGLU expert under a one-logit sigmoid gate
                parts.update(_mlp_parts(m + "mlp.shared_expert.", p + "mlp.shared_expert.", shared, cfg.hidden_size))
                parts[m + "mlp.shared_expert_gate"] = [(p + "mlp.shared_expert_gate", 0, 1)]
        else:
            parts.update(_mlp_parts(m + "mlp.", p + "mlp.", inter, cfg.hidden_size))
    if not cfg.tie_word_embeddings:
        parts["lm_head"] = [("lm_head", 0, cfg.vocab_size)]
    return parts


def _mlp_parts(module: str, hf: str, inter: int, hidden: int) -> dict[str, list[tuple[str, int, int]]]:
    """A SwiGLU MLP's fused gate_up_proj and its down_proj (network paths under
    ``module``) from the checkpoint's gate/up/down projections under ``hf``."""
    return {
        module + "gate_up_proj": [(hf + "gate_proj", 0, inter), (hf + "up_proj", inter, 2 * inter)],
        module + "down_proj": [(hf + "down_proj", 0, hidden)],
    }


def moe_names(cfg: ModelConfig) -> tuple[str, str, str, str]:
    """How a checkpoint names an MoE block and its experts' gate, up and down
    projections: Mixtral ``block_sparse_moe.experts.E.w1/w3/w2``, Qwen2/3-MoE
    ``mlp.experts.E.gate_proj/up_proj/down_proj`` (as transformers saves them;
    it fuses them into 3-D tensors only in memory)."""
    if cfg.architecture == "MixtralForCausalLM":
        return "block_sparse_moe", "w1", "w3", "w2"
    return "mlp", "gate_proj", "up_proj", "down_proj"


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
    t: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    for path, parts in linear_parts(cfg).items():
        _rows(model.get_submodule(path), parts, t)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        t[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        attn = layer.self_attn
        if attn.q_norm is not None:
            t[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
            t[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
        if cfg.is_moe_layer(i):
            moe, inter = layer.mlp, cfg.moe_intermediate_size
            block, gate, up, down = moe_names(cfg)
            for e in range(cfg.num_experts):
                ep = p + f"{block}.experts.{e}."
                t[ep + f"{gate}.weight"] = moe.w13[e, :inter]
                t[ep + f"{up}.weight"] = moe.w13[e, inter:]
                t[ep + f"{down}.weight"] = moe.w2[e]
    return t


# The int4 kernels dequantise ``q - zero`` exactly in bf16/fp16 up to this zero.
MAX_INT4_ZERO = 127


def load_weights(
    model: Transformer, path: Path, progress: bool | None = None, converter: Converter | None = None
) -> None:
    """Fill ``model``'s parameters from the safetensors files in ``path``;
    ``converter`` (default: names as they are) rewrites foreign formats."""
    files = checkpoint_files(path)
    targets = checkpoint_targets(model)
    total = sum(f.stat().st_size for f in files)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    loaded: set[str] = set()
    unexpected: list[str] = []
    with CheckpointReader(files) as reader, tqdm(
        total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show
    ) as bar:
        for name, tensor, nbytes in (converter or identity_converter)(reader, targets):
            target = targets.get(name)
            if target is None or tensor is None:
                if not (_IGNORED.match(name) or (name == "lm_head.weight" and model.lm_head is None)):
                    unexpected.append(name)
                continue
            where = reader.file(name) if name in reader else "checkpoint"
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{where}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"but config.json implies {tuple(target.shape)}"
                )
            if tensor.is_floating_point() != target.is_floating_point() or (
                not target.is_floating_point() and tensor.dtype != target.dtype
            ):
                raise ValueError(f"{where}: tensor {name} has dtype {tensor.dtype}, expected {target.dtype}")
            if name.endswith(".zeros") and tensor.numel() and int(tensor.max()) > MAX_INT4_ZERO:
                raise ValueError(f"{where}: int4 zero points of {name} reach {int(tensor.max())}; at most "
                                 f"{MAX_INT4_ZERO} is supported (4-bit checkpoints use 0..16)")
            if name.endswith(".scales") and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: the quantization scales {name} hold NaN or infinite values")
            target.copy_(tensor)
            loaded.add(name)
            bar.update(nbytes)
    if unexpected:
        hint = "is config.json right for these weights?"
        packed = any(n.endswith((".qweight", ".qzeros")) for n in unexpected)
        ours = any(n.endswith(".zeros") for n in unexpected) or not any(n.endswith(".qzeros") for n in unexpected)
        if packed and getattr(model, "quantization", None) is None and ours:
            hint = (
                "they look like fastllm's own quantized weights, but config.json has no quantization_config "
                "(write back the one save_pretrained wrote, e.g. {\"quant_method\": \"fastllm\", \"format\": "
                "\"fastllm-v1\", \"method\": \"int4\", \"group_size\": 128})"
            )
        elif packed and getattr(model, "quantization", None) is None:
            hint = (
                "they look like GPTQ/AWQ packed weights, but config.json has no quantization_config "
                "(old AutoGPTQ exports keep it in quantize_config.json: copy it into config.json as "
                "\"quantization_config\" with \"quant_method\": \"gptq\")"
            )
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensors that {model.config.architecture} does not use, "
            f"e.g. {unexpected[:5]}; {hint}"
        )
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def save_weights(model: Transformer, path: Path) -> None:
    """Write the network's tensors under their Hugging Face names to
    ``path/model.safetensors`` (fused projections split back by rows). A
    sharded checkpoint already there (``model.safetensors.index.json`` and
    its ``model-XXXXX-of-YYYYY.safetensors``) is removed, as transformers
    does: the loader prefers the index and would read the old weights."""
    tensors = {name: view.detach().contiguous().cpu() for name, view in checkpoint_targets(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    for old in path.iterdir():
        if _SHARD.fullmatch(old.name):
            old.unlink()
