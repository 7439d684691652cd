"""Weight-only quantization: int8 per output channel, int4 per group.

Formats (the canonical, on-disk layout; kernels may repack at load time):

- int8: ``qweight`` int8 [N, K], symmetric per output row,
  ``w ≈ qweight * scales[:, None]``, ``scales`` fp32 [N] = max|w_row| / 127.
- int4: ``qweight`` uint8 [N, K/2], two 4-bit values per byte (low nibble =
  even column), asymmetric per group of ``group_size`` consecutive columns
  (32, 64 or 128): ``w ≈ (q - zeros) * scales`` with ``q`` in [0, 15], integer
  ``zeros`` uint8 [N, K/g] and ``scales`` [N, K/g] in the model dtype. The
  range of each group is widened to include 0 (as GPTQ does), round to nearest.
  A layer whose in_features the group size does not divide gets the largest
  supported size that does (``effective_group_size``; e.g. 960 inputs at g128
  -> g64), with a warning; one divisible by none of them is an error.
  Zeros are 0..15 when fastllm quantizes; GPTQ v1 checkpoints repacked by
  ``fastllm.quant_formats`` can hold 16 (the reference and the kernels take any
  zero up to 127).

``quantize_network`` replaces the decoder layers' projections (q/k/v, o,
gate/up, down; Qwen2-MoE's shared expert's gate/up and down too) by quantized
modules; embeddings, the LM head (unless asked), norms, the MoE router, the
shared expert's one-logit gate and the routed MoE experts stay in 16-bit, and
so do the projections named in ``QuantizationConfig.skip_modules`` (set when a
GPTQ/AWQ checkpoint leaves some of them unquantized).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastllm import ops
from fastllm.model.layers import Linear
from fastllm.ops.reference import dequantize_int4, dequantize_int8, unpack_int4  # noqa: F401 (re-exported)

GROUP_SIZES = (32, 64, 128)
METHODS = ("int8", "int4")
FORMAT = "fastllm-v1"


def quantization_names() -> tuple[str, ...]:
    """Every name ``QuantizationConfig.parse`` takes: the methods, and int4 with each group size."""
    return (*METHODS, *(f"int4-g{g}" for g in GROUP_SIZES))


@dataclass(frozen=True)
class QuantizationConfig:
    """What to quantize and how; stored in config.json as ``quantization_config``."""

    method: str  # "int8" | "int4"
    group_size: int = 128  # int4 only
    lm_head: bool = False
    # Network paths of projections kept in 16-bit, e.g. "layers.3.mlp.down_proj"
    # (module names of ``Transformer``; the fused qkv_proj / gate_up_proj count as one).
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; choose one of {METHODS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"group_size must be an int, got {self.group_size!r}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.method == "int8" and self.group_size != 128:  # the field's default: int8 scales whole rows
            raise ValueError(f"int8 is per output channel and takes no group_size, got {self.group_size}")
        if not isinstance(self.lm_head, bool):
            raise TypeError(f"lm_head must be a bool, got {self.lm_head!r}")
        if isinstance(self.skip_modules, str) or not all(isinstance(m, str) for m in self.skip_modules):
            raise ValueError(f"skip_modules must be a sequence of module names, got {self.skip_modules!r}")
        object.__setattr__(self, "skip_modules", tuple(sorted(set(self.skip_modules))))

    def describe(self) -> str:
        """Short human-readable form, e.g. "int4 (group size 128)"."""
        return f"int4 (group size {self.group_size})" if self.method == "int4" else self.method

    @classmethod
    def parse(cls, value: "str | QuantizationConfig | None") -> "QuantizationConfig | None":
        """Accepts None, a config, "int8", "int4" (group 128) or "int4-g32"/"-g64"/"-g128"."""
        if value is None or isinstance(value, QuantizationConfig):
            return value
        if not isinstance(value, str):
            raise TypeError(f"quantization must be a str or QuantizationConfig, got {type(value).__name__}")
        method, dash, group = value.lower().partition("-g")
        if dash and method == "int8":
            raise ValueError(f"a group size only applies to int4, got {value!r}")
        if dash and group not in {str(g) for g in GROUP_SIZES}:
            raise ValueError(f"cannot parse quantization {value!r}; choose one of {', '.join(quantization_names())}")
        return cls(method, int(group) if group else 128)

    def to_json(self) -> dict[str, Any]:
        out = {"quant_method": "fastllm", "format": FORMAT, **asdict(self)}
        out["skip_modules"] = list(self.skip_modules)
        if not self.skip_modules:
            del out["skip_modules"]  # files written before it existed read the same
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "QuantizationConfig":
        if raw.get("quant_method") != "fastllm" or raw.get("format") != FORMAT:
            raise ValueError(
                f"unsupported quantization_config {raw}; fastllm reads its own '{FORMAT}' format and "
                "4-bit GPTQ (quant_method 'gptq') and AWQ ('awq', version 'gemm') checkpoints"
            )
        skip = raw.get("skip_modules", [])
        try:
            if not isinstance(skip, list):
                raise ValueError(f"skip_modules must be a list of module names, got {skip!r}")
            return cls(raw.get("method"), raw.get("group_size", 128), raw.get("lm_head", False), tuple(skip))
        except (ValueError, TypeError) as e:
            raise ValueError(f"config.json: quantization_config: {e}") from e


# --------------------------------------------------------------------------- #
# Quantize / dequantize (the reference formats)
# --------------------------------------------------------------------------- #
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (qweight int8 [N, K], scales fp32 [N])."""
    wf = w.float()
    scales = wf.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (qweight uint8 [N, K/2], scales [N, K/g] scale_dtype, zeros uint8 [N, K/g])."""
    n, k = w.shape
    _check_int4_shape(k, group_size)
    wg = w.float().view(n, k // group_size, group_size)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).to(scale_dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    s = scales.float()
    zeros = torch.round(-lo / s).clamp_(0, 15)
    q = (torch.round(wg / s[..., None]) + zeros[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, zeros.to(torch.uint8)


def _check_int4_shape(k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #
def _buffer(module: nn.Module, name: str, t: Tensor) -> None:
    module.register_buffer(name, t, persistent=True)


class Int8Linear(nn.Module):
    """W8A16 linear: ``y = x @ (qweight * scales).T + bias``."""

    tensor_names = ("qweight", "scales", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _buffer(self, "qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        _buffer(self, "scales", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.int8_linear(x, self.qweight, self.scales, self.bias)


class Int4Linear(nn.Module):
    """W4A16 linear with per-group scales and zero points."""

    tensor_names = ("qweight", "scales", "zeros", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int):
        super().__init__()
        _check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        _buffer(self, "qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        _buffer(self, "scales", torch.empty(out_features, groups, dtype=dtype))
        _buffer(self, "zeros", torch.empty(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)


def effective_group_size(in_features: int, group_size: int) -> int | None:
    """The int4 group size a layer with ``in_features`` inputs gets when
    ``group_size`` is asked: the largest supported size <= ``group_size`` that
    divides ``in_features`` (``group_size`` itself whenever it divides), or
    None if none does. A pure function of the shapes, so a saved model reloads
    with the same per-layer sizes without recording them."""
    fits = [g for g in GROUP_SIZES if g <= group_size and in_features % g == 0]
    return max(fits) if fits else None


def empty_quantized_linear(linear: Linear, cfg: QuantizationConfig) -> nn.Module:
    """An uninitialised quantized module with ``linear``'s shape (for loading)."""
    dtype, device = linear.weight.dtype, linear.weight.device
    with torch.device(device):
        if cfg.method == "int8":
            return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        group = effective_group_size(linear.in_features, cfg.group_size) or cfg.group_size  # None: the check raised
        return Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, group)


def quantize_linear(linear: Linear, cfg: QuantizationConfig) -> nn.Module:
    """A quantized copy of a loaded ``Linear``."""
    module = empty_quantized_linear(linear, cfg)
    if cfg.method == "int8":
        module.qweight, module.scales = quantize_int8(linear.weight)
    else:
        module.qweight, module.scales, module.zeros = quantize_int4(linear.weight, module.group_size, linear.weight.dtype)
    if linear.bias is not None:
        module.bias.copy_(linear.bias)
    return module


def projection_slots(network: nn.Module, lm_head: bool = False) -> list[tuple[str, nn.Module, str]]:
    """(path, parent, attribute) of every projection quantization can apply to:
    each layer's qkv_proj and o_proj, gate_up_proj and down_proj (dense MLPs and
    Qwen2-MoE's shared expert), and the untied LM head when ``lm_head``."""
    found = []
    for i, layer in enumerate(network.layers):
        found += [(f"layers.{i}.self_attn.qkv_proj", layer.self_attn, "qkv_proj")]
        found += [(f"layers.{i}.self_attn.o_proj", layer.self_attn, "o_proj")]
        mlp, path = layer.mlp, f"layers.{i}.mlp"
        if getattr(mlp, "shared_expert", None) is not None:  # Qwen2-MoE: quantized as a dense MLP
            mlp, path = mlp.shared_expert, path + ".shared_expert"
        if hasattr(mlp, "gate_up_proj"):
            found += [(f"{path}.gate_up_proj", mlp, "gate_up_proj"), (f"{path}.down_proj", mlp, "down_proj")]
    if lm_head and network.lm_head is not None:
        found.append(("lm_head", network, "lm_head"))
    return found


def quantized_slots(network: nn.Module, cfg: QuantizationConfig) -> list[tuple[str, nn.Module, str]]:
    """(path, parent, attribute) of every Linear that ``cfg`` quantizes."""
    slots = projection_slots(network, cfg.lm_head)
    unknown = set(cfg.skip_modules) - {path for path, _, _ in slots}
    if unknown:
        raise ValueError(f"quantization skip_modules names modules this network does not have: {sorted(unknown)}")
    return [slot for slot in slots if slot[0] not in cfg.skip_modules]


def quantizable_linears(network: nn.Module, cfg: QuantizationConfig) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear that ``cfg`` quantizes."""
    return [(parent, name) for _, parent, name in quantized_slots(network, cfg)]


def check_quantizable(network: nn.Module, cfg: QuantizationConfig) -> dict[str, int]:
    """Raise ValueError naming the first layer whose shape ``cfg`` cannot take
    (int4: in_features not a multiple of any supported group size). Returns
    {module type.name: group size} of the layers that get a smaller group than
    asked because theirs does not divide in_features."""
    smaller: dict[str, int] = {}
    if cfg.method != "int4":
        return smaller
    for path, parent, name in quantized_slots(network, cfg):
        k = getattr(parent, name).in_features
        group = effective_group_size(k, cfg.group_size)
        if group is None:
            raise ValueError(
                f"cannot quantize {path} to int4: in_features {k} is not a multiple of any supported group "
                f"size <= {cfg.group_size} ({GROUP_SIZES}); keep it in 16-bit with "
                f"QuantizationConfig('int4', {cfg.group_size}, skip_modules=[...]) naming each such layer"
            )
        if group != cfg.group_size:
            smaller[f"{type(parent).__name__}.{name} (in_features {k})"] = group
    return smaller


@torch.no_grad()
def quantize_network(network: nn.Module, cfg: QuantizationConfig) -> None:
    """Quantize a loaded network in place. A layer whose in_features the int4
    group size does not divide gets the largest supported size that does
    (``effective_group_size``), with a warning."""
    smaller = check_quantizable(network, cfg)
    if smaller:
        warnings.warn(
            f"int4 group size {cfg.group_size} does not divide the inputs of "
            + "; ".join(f"{k}: using group size {g}" for k, g in smaller.items()),
            UserWarning,
            stacklevel=3,
        )
    for parent, name in quantizable_linears(network, cfg):
        setattr(parent, name, quantize_linear(getattr(parent, name), cfg))
    network.quantization = cfg


def prepare_for_quantized_load(network: nn.Module, cfg: QuantizationConfig) -> None:
    """Swap in empty quantized modules so a quantized checkpoint can load into them."""
    check_quantizable(network, cfg)
    for parent, name in quantizable_linears(network, cfg):
        setattr(parent, name, empty_quantized_linear(getattr(parent, name), cfg))
    network.quantization = cfg
