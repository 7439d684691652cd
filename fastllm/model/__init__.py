"""The decoder network, its configuration and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import torch

from fastllm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, parse_dtype
from fastllm.model.transformer import Transformer
from fastllm.model.weights import CheckpointReader, checkpoint_files, load_weights, save_weights

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "Transformer",
    "build_network",
    "load_network",
    "parse_dtype",
    "save_weights",
]


def build_network(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, quantization=None) -> Transformer:
    """An uninitialised network (quantized modules where ``quantization`` says),
    allocated once, directly on ``device``."""
    from fastllm.quant import prepare_for_quantized_load

    with torch.device("meta"):
        net = Transformer(cfg, dtype)
        if quantization is not None:
            prepare_for_quantized_load(net, quantization)
    net = net.to_empty(device=device)
    net.init_buffers()
    return net.eval()


def _requant_conflict(asked: "QuantizationConfig", saved: "QuantizationConfig") -> str | None:
    """Why a checkpoint saved quantized as ``saved`` cannot load as ``asked``
    (None: it can). A request that leaves lm_head / skip_modules at their
    defaults takes the saved ones."""
    if asked.method != saved.method or (saved.method == "int4" and asked.group_size != saved.group_size):
        return "another method or group size"
    if asked.lm_head and not saved.lm_head:
        return "its lm_head is not quantized"
    if asked.skip_modules and asked.skip_modules != saved.skip_modules:
        return f"it keeps {list(saved.skip_modules) or 'no modules'} in 16-bit"
    return None


def load_network(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    quantization=None,
    cfg: ModelConfig | None = None,
) -> Transformer:
    """Build the network described by ``path/config.json`` on ``device`` and load
    its weights (``cfg``: its already parsed config). A checkpoint saved quantized
    loads as such: fastllm's own format as saved, 4-bit GPTQ/AWQ repacked into
    fastllm's int4 (``fastllm.quant_formats``). ``quantization`` (a
    fastllm.quant.QuantizationConfig) quantizes a 16-bit checkpoint after loading."""
    from fastllm.quant import QuantizationConfig, quantize_network
    from fastllm.quant_formats import make_converter, parse_external, plan_quantization

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = cfg or ModelConfig.from_file(path / "config.json")
    raw = cfg.quantization_config
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"config.json: quantization_config must be an object, got {raw!r}")
    external = parse_external(raw) if raw else None
    converter, source = None, "fastllm"
    if external is not None:
        with CheckpointReader(checkpoint_files(path)) as reader:
            saved = plan_quantization(external, cfg, reader.names)
        converter, source = make_converter(external), external.name
    else:
        saved = QuantizationConfig.from_json(raw) if raw else None
    conflict = _requant_conflict(quantization, saved) if saved is not None and quantization is not None else None
    if conflict is not None:
        raise ValueError(
            f"{path} is already quantized ({source} {saved.describe()}); it cannot be loaded as "
            f"{quantization.describe()}: {conflict} (leave quantization unset to load it as it is)"
        )
    net = build_network(cfg, device, dtype, saved)
    load_weights(net, path, progress, converter)
    if saved is None and quantization is not None:
        quantize_network(net, quantization)
    return net
