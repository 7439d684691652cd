"""Building blocks of the decoder, each a thin shell over ``fastllm.ops``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastllm import ops
from fastllm.model.config import RopeConfig


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """``y = x @ weight.T + bias``; weight: [out, in]. Quantized variants replace it."""

    tensor_names = ("weight", "bias")  # what a checkpoint stores for it, each split by rows

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm with the residual add fused in when a residual is passed."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return ops.rmsnorm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> Tensor:
    """Inverse frequencies [head_dim / 2] (fp32), with linear, llama3 or yarn scaling.

    Computed exactly as transformers does, so positions map to the same angles.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope.type == "yarn":
        inv_freq = _yarn_inv_freq(head_dim, rope)
    return inv_freq


def _yarn_inv_freq(head_dim: int, rope: RopeConfig) -> Tensor:
    """YaRN (arXiv 2309.00071): the original frequencies for dimensions that
    turn more than ``beta_fast`` times over the original context, the
    interpolated ones (divided by factor) below ``beta_slow`` turns, a linear
    ramp between; as transformers computes them."""
    def dim_of(turns: float) -> float:  # the dimension that turns ``turns`` times over the original context
        return head_dim * math.log(rope.original_max_position_embeddings / (turns * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: original frequency (extrapolation), 0: interpolated
    return (1.0 / (rope.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(rope: RopeConfig) -> float:
    """The scale YaRN puts on cos and sin (1 for the other types): the
    config's attention_factor, else ``0.1 ln(factor) + 1`` (with mscale and
    mscale_all_dim, the ratio of two such terms)."""
    if rope.type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(m: float = 1.0) -> float:
        return 1.0 if rope.factor <= 1 else 0.1 * m * math.log(rope.factor) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.mscale) / mscale(rope.mscale_all_dim)
    return mscale()


def rope_cos_sin_cache(head_dim: int, max_positions: int, rope: RopeConfig) -> Tensor:
    """[max_positions, head_dim] fp32: cos of the D/2 angles, then their sin
    (both times YaRN's attention factor)."""
    inv_freq = rope_inv_freq(head_dim, rope)
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)
    scale = rope_attention_factor(rope)
    return table * scale if scale != 1.0 else table
