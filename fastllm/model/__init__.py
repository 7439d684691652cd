"""The decoder network, its configuration and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import torch

from fastllm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, parse_dtype
from fastllm.model.transformer import Transformer
from fastllm.model.weights import load_weights, save_weights

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


def load_network(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    quantization=None,
    cfg: ModelConfig | None = None,
) -> Transformer:
    """Build the network described by ``path/config.json`` on ``device`` and load
    its weights (``cfg``: its already parsed config). A checkpoint saved quantized loads as such; ``quantization`` (a
    fastllm.quant.QuantizationConfig) quantizes a 16-bit checkpoint after loading."""
    from fastllm.quant import QuantizationConfig, quantize_network

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = cfg or ModelConfig.from_file(path / "config.json")
    saved = QuantizationConfig.from_json(cfg.quantization_config) if cfg.quantization_config else None
    if saved is not None and quantization is not None and quantization != saved:
        raise ValueError(f"{path} is already quantized ({saved.method}); it cannot be loaded as {quantization.method}")
    net = build_network(cfg, device, dtype, saved)
    load_weights(net, path, progress)
    if saved is None and quantization is not None:
        quantize_network(net, quantization)
    return net
