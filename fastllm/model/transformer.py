"""The decoder-only transformer (Llama, Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE), over fastllm.ops.

Token-major: a step's tokens from all sequences are packed into [N, hidden];
``AttentionMetadata`` tells attention which tokens belong together and where
their keys and values live in the paged KV cache. q/k/v and gate/up projections
are fused into one matmul each (weights concatenated at load time).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastllm import ops
from fastllm.model.config import ModelConfig
from fastllm.model.layers import Linear, RMSNorm, _param, rope_cos_sin_cache
from fastllm.ops import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.layer_window(layer)
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias, dtype)
        # Qwen3: each head of q and k RMS-normalised (one weight of head_dim shared by the heads)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def forward(
        self, x: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata, cos_sin: Tensor
    ) -> Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [N, (Hq + 2 Hk) D]
        q = qkv[:, : self.q_size].view(n, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # rows of head_dim; the results are contiguous [N, H, D]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(n, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(n, self.num_kv_heads, self.head_dim)
        ops.rotary_embedding(q, k, positions, cos_sin)
        k_cache, v_cache = kv
        ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:  # one query per sequence: the split-KV decode kernel
            o = ops.decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, self.sliding_window,
                max_seq_len=meta.max_seq_len,
            )
        else:
            o = ops.prefill_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window)  # [N, Hq, D]
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate x) * up x)`` with gate and up fused; of width
    ``intermediate_size`` (default: the config's)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, intermediate_size: int | None = None):
        super().__init__()
        inter = cfg.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype)
        self.down_proj = Linear(inter, cfg.hidden_size, cfg.mlp_bias, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    """Mixtral's and Qwen2/3-MoE's block: route each token to its top-k experts
    (softmax over all experts, the k largest, renormalised to sum 1 unless the
    config says not), the weighted sum of their SwiGLU outputs. Qwen2-MoE adds
    a shared expert every token goes through, gated per token:
    ``routed + sigmoid(shared_expert_gate x) * shared_expert(x)``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.moe_renormalize
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Linear(h, e, False, dtype)
        self.w13 = _param(e, 2 * i, h, dtype=dtype)  # per expert: gate (w1) rows, then up (w3)
        self.w2 = _param(e, h, i, dtype=dtype)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg, dtype, shared) if shared else None
        self.shared_expert_gate = Linear(h, 1, False, dtype) if shared else None

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = ops.moe_route(self.gate(x), self.top_k, renormalize=self.renormalize)
        out = ops.fused_moe(x, self.w13, self.w2, weights, ids)  # [N, H]
        if self.shared_expert is None:
            return out
        return ops.sigmoid_gated_add(out, self.shared_expert(x), self.shared_expert_gate(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SparseMoE(cfg, dtype) if cfg.is_moe_layer(index) else MLP(cfg, dtype)

    def forward(self, x, residual, positions, kv, meta, cos_sin):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv, meta, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    """Embedding, N decoder layers, final norm, LM head (possibly tied)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.register_buffer("cos_sin_cache", torch.empty(cfg.max_position_embeddings, cfg.head_dim), persistent=False)
        self.quantization = None  # a fastllm.quant.QuantizationConfig once quantized

    def init_buffers(self) -> None:
        """Compute the non-checkpoint buffers (the rotary cos/sin table) in place."""
        cfg = self.config
        self.cos_sin_cache.copy_(rope_cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope))

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
        logits_indices: Tensor | None = None,
    ) -> Tensor:
        """input_ids, positions: [N] int64. Returns fp32 logits [M, V] for the
        rows ``logits_indices`` (all N tokens when None)."""
        return self.logits(self.hidden_states(input_ids, positions, kv_caches, meta, logits_indices))

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
        indices: Tensor | None = None,
    ) -> Tensor:
        """The final-normed hidden states [M, H] of the rows ``indices`` (all N
        when None): what ``logits`` turns into next-token logits."""
        x = ops.embedding(input_ids, self.embed_tokens.weight)  # [N, H]
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv, meta, self.cos_sin_cache)
        if indices is not None:
            x, residual = x[indices], residual[indices]
        x, _ = self.norm(x, residual)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """LM head: hidden states [M, H] -> fp32 logits [M, V]."""
        if self.lm_head is None:
            return ops.linear(x, self.embed_tokens.weight).float()
        return self.lm_head(x).float()
