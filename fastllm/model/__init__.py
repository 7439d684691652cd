"""The decoder network, its configuration and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import torch

from fastllm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, parse_dtype
from fastllm.model.transformer import Transformer
from fastllm.model.weights import load_weights

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "Transformer", "load_network", "parse_dtype"]


def load_network(
    path: str | Path, device: torch.device, dtype: torch.dtype, progress: bool | None = None
) -> Transformer:
    """Build the network described by ``path/config.json`` on ``device`` and load its weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = ModelConfig.from_file(path / "config.json")
    with torch.device(device):
        net = Transformer(cfg, dtype)
    load_weights(net, path, progress)
    return net.eval()
