"""Model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastllm.config import eos_id_list, read_json_object

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
)
# A config without "architectures" names its class by model_type (transformers' auto mapping).
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM"}
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
_MOE = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
_QWEN2 = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # q/k/v biases, none on o_proj
_QWEN_MOE = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")  # moe_intermediate_size, norm_topk_prob, dense layers

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Map 'bfloat16'/'bf16'/torch.bfloat16/... to a torch dtype (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; use float32, float16 or bfloat16")
        return value
    key = str(value).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use float32, float16 or bfloat16")
    return _DTYPES[key]


@dataclass
class RopeConfig:
    """Rotary embedding parameters (HF ``rope_parameters`` / ``rope_scaling``)."""

    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn: the ramp between interpolated and original frequencies, and the cos/sin scale
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None  # None: from factor (and mscale / mscale_all_dim)
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # the layers the window applies to (None: all)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    num_experts: int = 0  # 0 = dense MLP
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's (Qwen2/3-MoE; Mixtral: intermediate_size)
    moe_renormalize: bool = True  # the top-k routing weights sum to 1 (Mixtral; Qwen2/3-MoE's norm_topk_prob)
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP (Qwen-MoE's mlp_only_layers)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes to experts."""
        return self.num_experts > 0 and len(self.dense_layers) < self.num_layers

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    def layer_window(self, i: int) -> int | None:
        """Layer ``i``'s sliding attention window (None: full attention)."""
        if self.sliding_window is None or (self.sliding_layers is not None and i not in self.sliding_layers):
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if archs:
            arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
            what = f"architecture {archs!r}"
        else:
            arch = _BY_MODEL_TYPE.get(raw.get("model_type"))
            what = f"model_type {raw.get('model_type')!r} (config.json names no architectures)"
        if arch is None:
            raise ValueError(f"unsupported {what}; fastllm runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ValueError(f"config.json is missing the required field {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")

        num_layers = int(need("num_hidden_layers"))
        sliding, sliding_layers = _parse_sliding(arch, raw, num_layers)
        inter = int(need("intermediate_size"))
        eos_ids = eos_id_list(raw.get("eos_token_id"), "config.json")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj, Qwen2-MoE too unless its
            # qkv_bias says not; Llama's (and Qwen3's) attention_bias covers all four.
            qkv_bias=_qkv_bias(arch, raw),
            o_bias=arch not in _QWEN2 and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=sliding,
            sliding_layers=sliding_layers,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            **_parse_moe(arch, raw, num_layers, inter),
            torch_dtype=_config_dtype(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization_config=raw.get("quantization_config"),
            raw=dict(raw),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {path.parent} (expected a Hugging Face model directory)")
        return cls.from_dict(read_json_object(path))


def _parse_sliding(arch: str, raw: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """The sliding window and the layers it applies to (None: all), as
    transformers reads them: Qwen models store a window but apply it only with
    ``use_sliding_window``, and Qwen2/Qwen3/Qwen2-MoE only on the layers
    ``layer_types`` marks ``sliding_attention`` (default: Qwen2/Qwen3 from
    ``max_window_layers`` on; Qwen2-MoE the even layers below it)."""
    window = raw.get("sliding_window")
    if arch in _QWEN and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return None, None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"config.json: sliding_window must be a positive int, got {window!r}")
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM"):
        return window, None
    types = raw.get("layer_types")
    if types is None:
        first = int(raw.get("max_window_layers", 28))
        if arch == "Qwen2MoeForCausalLM":  # transformers' Qwen2MoeConfig default
            slides = [i % 2 == 0 and i < first for i in range(num_layers)]
        else:
            slides = [i >= first for i in range(num_layers)]
        types = ["sliding_attention" if s else "full_attention" for s in slides]
    if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types must list 'full_attention' or 'sliding_attention' for each "
                         f"of the {num_layers} layers, got {types!r}")
    return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _qkv_bias(arch: str, raw: dict[str, Any]) -> bool:
    """Whether q/k/v have biases: always for Qwen2, by ``qkv_bias`` (default
    true) for Qwen2-MoE, by ``attention_bias`` for the others."""
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        value = raw.get("qkv_bias", True)
        if not isinstance(value, bool):
            raise ValueError(f"config.json: qkv_bias must be true or false, got {value!r}")
        return value
    return bool(raw.get("attention_bias", False))


def _positive_int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """``raw[key]`` (``default`` when absent or null), checked to be an int >= 1."""
    value = default if raw.get(key) is None else raw[key]
    if value is None:
        raise ValueError(f"config.json is missing the required field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: {key} must be a positive int, got {value!r}")
    return value


def _parse_moe(arch: str, raw: dict[str, Any], num_layers: int, inter: int) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields: the experts, how many each
    token gets, their width, whether the top-k weights are renormalised, the
    dense layers and (Qwen2-MoE) the shared expert's width."""
    if arch not in _MOE:
        return dict(moe_intermediate_size=inter)
    num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
    if num_experts < 1:
        raise ValueError("config.json: a mixture-of-experts model needs num_local_experts (or num_experts) >= 1")
    top_k = int(raw.get("num_experts_per_tok", 2))
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"config.json: num_experts_per_tok must be in [1, {num_experts}], got {top_k}")
    fields: dict[str, Any] = dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=inter)
    if arch in _QWEN_MOE:
        fields.update(
            moe_intermediate_size=_positive_int(raw, "moe_intermediate_size", inter),
            moe_renormalize=bool(raw.get("norm_topk_prob", False)),
            dense_layers=_qwen_moe_dense_layers(raw, num_layers),
        )
    if arch == "Qwen2MoeForCausalLM":
        fields["shared_expert_intermediate_size"] = _positive_int(raw, "shared_expert_intermediate_size")
    return fields


def _qwen_moe_dense_layers(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Layers of a Qwen2/Qwen3-MoE model with a dense MLP, as transformers picks them:
    those in ``mlp_only_layers`` and those with ``(i + 1) % decoder_sparse_step != 0``."""
    step = int(raw.get("decoder_sparse_step") or 1)
    only = raw.get("mlp_only_layers") or []
    if step < 1 or not all(isinstance(i, int) for i in only):
        raise ValueError(f"config.json: decoder_sparse_step must be >= 1 and mlp_only_layers a list of layer "
                         f"indices, got {step!r} and {only!r}")
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step)


def _config_dtype(raw: dict[str, Any]) -> torch.dtype | None:
    value = raw.get("torch_dtype", raw.get("dtype"))
    try:
        return parse_dtype(value)
    except ValueError:
        return None


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
    # With both, transformers takes rope_scaling whole (convert_rope_params_to_dict).
    merged = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(f"unsupported rope type {rtype!r}; fastllm implements default, linear, llama3 and yarn")
    max_pos = raw.get("max_position_embeddings") or 8192
    original = int(merged.get("original_max_position_embeddings") or max_pos)
    factor = merged.get("factor")
    if factor is None:  # yarn without a factor (DeepSeek's convention): the context's growth
        factor = max_pos / original if rtype == "yarn" else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"config.json: the rope scaling factor must be a positive number, got {factor!r}")

    def opt(key: str) -> float | None:
        return None if merged.get(key) is None else float(merged[key])

    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=float(factor),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        truncate=bool(merged.get("truncate", True)),
        attention_factor=opt("attention_factor"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
    )
