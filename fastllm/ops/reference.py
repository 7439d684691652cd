"""Pure-PyTorch reference of every op the model uses: the specification.

Each function computes in float32 internally (inputs are upcast) and returns
the input dtype, unless its docstring says otherwise. The CUDA kernels in
``fastllm.ops.cuda`` are tested against these functions; on a machine without
the extension the op table (``fastllm.ops``) calls them directly.

Token-major layout throughout: a batch of sequences is packed into ``N`` tokens
(no padding); ``AttentionMetadata`` says which tokens belong to which sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Sampling's references live in their own file; they are part of this one's namespace.
from fastllm.ops.reference_sampling import (  # noqa: F401 (re-exported)
    SAMPLE_STREAM, philox4x32_10, philox_u64, philox_uniform, sample, sampling_mask,
)


# --------------------------------------------------------------------------- #
# Elementwise / normalisation
# --------------------------------------------------------------------------- #
def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Row gather: ``out[n] = weight[ids[n]]``. ids: [...] int64, weight: [V, D]."""
    return F.embedding(ids, weight)


def rmsnorm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm, optionally fused with the residual add before it.

    ``y = x / sqrt(mean(x^2, -1) + eps) * weight`` in fp32, returned in x.dtype.
    With ``residual`` (same shape and dtype as x): ``h = (x + residual)`` rounded
    to x.dtype, ``y = rmsnorm(h)``; returns ``(y, h)``. Normalising the rounded
    sum keeps the fused op bit-compatible with the unfused pair.
    x: [..., D], weight: [D].
    """
    h = None
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        h = x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return (y, h) if h is not None else y


def silu_and_mul(x: Tensor) -> Tensor:
    """SwiGLU gate: ``silu(x[..., :d]) * x[..., d:]`` for x: [..., 2d] -> [..., d]."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ weight.T + bias``. x: [..., K], weight: [N, K], bias: [N].

    The one op whose reference stays in the input dtype: torch's CPU and cuBLAS
    matmuls already accumulate in fp32, and upcasting every weight on every call
    would double the memory traffic of the reference path.
    """
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------- #
# Weight-only quantized linear (formats: see fastllm.quant)
# --------------------------------------------------------------------------- #
def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    """int8 [N, K] and fp32 scales [N] -> fp32 [N, K]: ``q * scale``."""
    return qweight.float() * scales.float()[:, None]


def unpack_int4(qweight: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in [0, 15]; the low nibble is the even column."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Packed uint8 [N, K/2], scales [N, K/g], uint8 zeros [N, K/g] -> fp32 [N, K]:
    ``(q - zero) * scale`` per group of ``group_size`` columns."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(n, k)


def _linear_fp32(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A16: ``x @ dequantize_int8(qweight, scales).T + bias`` in fp32. x: [..., K]."""
    return _linear_fp32(x, dequantize_int8(qweight, scales), bias)


def int4_linear(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """W4A16: ``x @ dequantize_int4(...).T + bias`` in fp32. x: [..., K]."""
    return _linear_fp32(x, dequantize_int4(qweight, scales, zeros, group_size), bias)


# --------------------------------------------------------------------------- #
# Rotary embedding
# --------------------------------------------------------------------------- #
def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
    """Apply NeoX-style rotary embedding to q and k **in place**.

    q: [N, Hq, D], k: [N, Hk, D] (may be strided views, last dim contiguous);
    positions: [N] int64; cos_sin_cache: [max_pos, D] fp32 holding
    ``cat(cos(pos * inv_freq), sin(pos * inv_freq))`` (D/2 frequencies each).
    For each head vector x = [x1, x2] (halves): ``x1' = x1 cos - x2 sin``,
    ``x2' = x2 cos + x1 sin``.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)  # [N, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    for t in (q, k):
        tf = t.float()
        x1, x2 = tf[..., :half], tf[..., half:]
        t.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


# --------------------------------------------------------------------------- #
# Attention over a paged KV cache
# --------------------------------------------------------------------------- #
@dataclass
class AttentionMetadata:
    """Where each token of a packed batch lives in the paged KV cache.

    ``B`` sequences contribute ``N = sum(query_lens)`` tokens to this step.
    Sequence ``b`` has ``seq_lens[b]`` tokens in the cache after this step's
    tokens are written; its queries are the last ``query_lens[b]`` of them.

    cu_seqlens_q: [B+1] int32 device, offsets of each sequence's queries.
    seq_lens: [B] int32 device; block_tables: [B, max_blocks] int32 device.
    slot_mapping: [N] int64 device, flat cache slot (block * block_size + offset)
    of each new token. The ``*_host`` lists hold the same lengths on the host so
    that the reference path and launch heuristics never synchronise.
    ``seq_lens_exact`` False: ``seq_lens_host`` are only upper bounds (a CUDA
    graph's step, whose lengths change on the device between replays); the
    reference then reads the lengths on the device without synchronising.
    """

    cu_seqlens_q: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    slot_mapping: Tensor
    query_lens_host: list[int]
    seq_lens_host: list[int]
    seq_lens_exact: bool = True

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new query (a decode step)."""
        return bool(self.query_lens_host) and all(n == 1 for n in self.query_lens_host)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)


def reshape_and_cache(
    k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """Write new keys/values into their cache slots, in place.

    k, v: [N, Hk, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D];
    slot_mapping: [N] int64 flat slot per token, distinct and in range.
    """
    nb, bs, hk, d = k_cache.shape
    k_cache.view(nb * bs, hk, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, hk, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The first ``seq_len`` cached vectors of one sequence: [seq_len, Hk, D]."""
    bs = cache.shape[1]
    nblocks = -(-seq_len // bs)
    return cache.index_select(0, block_table[:nblocks].long()).flatten(0, 1)[:seq_len]


def attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> Tensor:
    """Causal attention of each sequence's new queries over its cached keys.

    q: [N, Hq, D]; caches: [num_blocks, block_size, Hk, D] with Hq % Hk == 0
    (query head h reads KV head h // (Hq / Hk): GQA/MQA). Query i of sequence b
    sits at position ``p = seq_lens[b] - query_lens[b] + i`` and attends to keys
    ``j <= p`` (and ``j > p - sliding_window`` when a window is set):
    ``out = softmax(q k^T * scale + mask) v`` in fp32. Returns [N, Hq, D].
    """
    return prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window)


def _softmax_rows(scores: Tensor, row_lse: Tensor) -> Tensor:
    """exp(scores - lse) per row; a row with no keys (lse -inf) is all 0. Only
    that case: a NaN (from a NaN query or cache) stays NaN, not a silent 0."""
    return torch.where(torch.isneginf(row_lse)[..., None], 0.0, torch.exp(scores - row_lse[..., None]))


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``attention`` (any number of queries per sequence: prompts, chunks of
    prompts appended to a cached prefix), optionally with the log-sum-exp.

    With ``return_lse`` also returns ``lse`` [N, Hq] fp32, the natural log of
    the softmax denominator ``log(sum_j exp(q . k_j * scale))`` over the keys the
    query attends to (-inf when there are none, whose output is 0), so that
    attention over disjoint key sets can be merged afterwards:
    ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i(lse_i)``.
    """
    if not meta.seq_lens_exact:
        return _prefill_on_device_lens(q, k_cache, v_cache, meta, scale, sliding_window, return_lse)
    n, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    out = torch.zeros_like(q)  # tokens past the last sequence's queries: 0 (lse -inf), as the kernel
    lse = torch.full((n, hq), -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if qlen == 0:
            continue
        qb = q[start : start + qlen].float().transpose(0, 1)  # [Hq, qlen, D]
        kb = gather_kv(k_cache, meta.block_tables[b], slen).float()  # [slen, Hk, D]
        vb = gather_kv(v_cache, meta.block_tables[b], slen).float()
        kb = kb.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, slen, D]
        vb = vb.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [Hq, qlen, slen]
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, qlen]; -inf for a row with no keys
        probs = _softmax_rows(scores, row_lse)
        out[start : start + qlen] = torch.matmul(probs, vb).transpose(0, 1).to(q.dtype)
        if lse is not None:
            lse[start : start + qlen] = row_lse.transpose(0, 1)
        start += qlen
    return (out, lse) if return_lse else out


def _prefill_on_device_lens(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
    sliding_window: int | None, return_lse: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """``prefill_attention`` when only the device knows the lengths (a graphed
    step of ``W`` queries per sequence, e.g. a speculative verify pass): every
    sequence has the same number of queries, gathers all the blocks of its
    table (entries past its blocks are clamped into range) and masks the keys
    on ``meta.seq_lens``, as ``decode_attention`` does; nothing is read on the host."""
    n, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    b, group = meta.num_seqs, hq // hk
    w = meta.query_lens_host[0] if b else 0
    if any(ql != w for ql in meta.query_lens_host) or b * w > n:
        raise ValueError("prefill_attention: without exact host lengths every sequence needs the same number of "
                         f"queries, got query lengths {meta.query_lens_host} for {n} tokens")
    out = torch.zeros_like(q)
    lse = torch.full((n, hq), -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
    if b * w == 0:
        return (out, lse) if return_lse else out
    blocks = meta.block_tables.long().clamp(0, nb - 1)  # [B, Wb]
    k = k_cache[blocks].flatten(1, 2).float()  # [B, J, Hk, D]
    v = v_cache[blocks].flatten(1, 2).float()
    qb = q[: b * w].float().view(b, w, hk, group, d)
    scores = torch.einsum("bihgd,bjhd->bhgij", qb, k) * scale  # [B, Hk, G, W, J]
    j = torch.arange(k.shape[1], device=q.device)[None, None, :]
    qpos = meta.seq_lens.long()[:, None, None] - w + torch.arange(w, device=q.device)[None, :, None]  # [B, W, 1]
    allowed = j <= qpos  # [B, W, J]; qpos < L: only cached keys
    if sliding_window is not None:
        allowed &= j > qpos - sliding_window
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # [B, Hk, G, W]; -inf for a query with no keys
    probs = _softmax_rows(scores, row_lse)
    out[: b * w] = torch.einsum("bhgij,bjhd->bihgd", probs, v).reshape(b * w, hq, d).to(q.dtype)
    if lse is not None:
        lse[: b * w] = row_lse.permute(0, 3, 1, 2).reshape(b * w, hq)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- #
# Mixture of experts
# --------------------------------------------------------------------------- #
def moe_route(router_logits: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k expert routing: softmax over experts in fp32, keep the k largest.

    router_logits: [N, E]. Returns (weights [N, k] fp32, expert_ids [N, k] int64);
    with ``renormalize`` the k weights are divided by their sum (Mixtral).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
    """Sum over each token's chosen experts of ``weight * down(silu(gate x) * up x)``.

    x: [N, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I];
    weights: [N, k] fp32; expert_ids: [N, k]. Returns [N, H] in x.dtype. Each
    expert's output is rounded to x.dtype before the weighted fp32 sum.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(expert_ids).tolist():
        token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        h = silu_and_mul(linear(x[token_idx], w13[e]))
        y = linear(h, w2[e])
        out.index_add_(0, token_idx, y.float() * weights[token_idx, slot, None])
    return out.to(x.dtype)


def sigmoid_gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + sigmoid(gate) * y``: Qwen2-MoE's shared expert output ``y`` added to
    the routed output ``x`` under its per-token gate.

    x, y: [N, H]; gate: [N, 1] (one logit per token). fp32 inside; returns [N, H] in x.dtype.
    """
    if x.shape != y.shape or gate.shape != (*x.shape[:-1], 1):
        raise ValueError(f"sigmoid_gated_add: x {tuple(x.shape)} and y {tuple(y.shape)} must match and gate "
                         f"{tuple(gate.shape)} be {(*x.shape[:-1], 1)}")
    return (x.float() + torch.sigmoid(gate.float()) * y.float()).to(x.dtype)


# --------------------------------------------------------------------------- #
# Decode attention (one new query token per sequence)
# --------------------------------------------------------------------------- #
def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_seq_len: int | None = None,
) -> Tensor:
    """``attention`` for a step in which every sequence has exactly one new query.

    q: [B, Hq, D]; caches: [num_blocks, block_size, Hk, D]; block_tables: int32
    [B, max_blocks]; seq_lens: int32 [B], the cached tokens of each sequence
    including the new one (whose K/V are already written). The query sits at
    position ``L - 1`` (L = seq_lens[b]) and attends to keys ``j`` in
    ``[max(0, L - sliding_window), L)``: ``out = softmax(q k^T * scale) v`` in
    fp32, returned as [B, Hq, D] in q.dtype (zeros for L == 0).
    ``max_seq_len`` is a host-side bound on seq_lens that the CUDA kernel uses
    to size its grid; the reference does not need it.

    Written without reading the lengths on the host (every sequence gathers all
    ``max_blocks`` blocks of its table, the keys at or past ``L`` are masked), so
    that on a GPU it can be captured in a CUDA graph. Table entries past a
    sequence's blocks may hold anything: they are clamped into range and masked.
    """
    b, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    group = hq // hk
    blocks = block_tables.long().clamp(0, nb - 1)  # [B, W]
    k = k_cache[blocks].flatten(1, 2).float()  # [B, W * bs, Hk, D]
    v = v_cache[blocks].flatten(1, 2).float()
    scores = torch.einsum("bhgd,bjhd->bhgj", q.float().view(b, hk, group, d), k) * scale  # [B, Hk, G, J]
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    allowed = j < lens  # [B, J]
    if sliding_window is not None:
        allowed &= j >= lens - sliding_window
    allowed = allowed[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # L == 0: no keys, output 0
    out = torch.einsum("bhgj,bjhd->bhgd", probs, v)
    return out.reshape(b, hq, d).to(q.dtype)
