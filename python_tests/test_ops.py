"""Reference ops against independent formulations (transformers, SDPA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastllm.cache import CachedSequence, KVCache, prepare_step
from fastllm.model.config import RopeConfig
from fastllm.model.layers import rope_cos_sin_cache
from fastllm.ops import AttentionMetadata
from fastllm.ops import reference as ref


@pytest.mark.parametrize("rope_type", ["default", "linear", "llama3"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_matches_transformers(rope_type, head_dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {"rope_type": rope_type, "rope_theta": 500000.0}
    if rope_type != "default":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf_cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=512, rope_scaling=params)
    rope = RopeConfig(theta=500000.0, type=rope_type, factor=8.0, original_max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    n = 37
    q, k = torch.randn(n, 4, head_dim, generator=g), torch.randn(n, 2, head_dim, generator=g)
    positions = torch.randint(0, 512, (n,), generator=g)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    qq, kk = q.clone(), k.clone()
    ref.rotary_embedding(qq, kk, positions, rope_cos_sin_cache(head_dim, 512, rope))
    torch.testing.assert_close(qq, q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kk, k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def _fill_cache(seq_lens, hk, d, block_size=4, dtype=torch.float32):
    """Random K/V for sequences of given lengths written through prepare_step."""
    g = torch.Generator().manual_seed(1)
    blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    cache = KVCache(1, blocks, hk, d, dtype, torch.device("cpu"), block_size=block_size)
    cache.allocator.allocate(3)  # so block ids are not simply 0..n
    seqs = [CachedSequence() for _ in seq_lens]
    _, _, meta, _ = prepare_step(cache, seqs, [[0] * n for n in seq_lens])
    k = torch.randn(sum(seq_lens), hk, d, generator=g, dtype=dtype)
    v = torch.randn(sum(seq_lens), hk, d, generator=g, dtype=dtype)
    ref.reshape_and_cache(k, v, cache.k[0], cache.v[0], meta.slot_mapping)
    return cache, seqs, k, v


def test_cache_roundtrip():
    lens = [5, 1, 9]
    cache, seqs, k, v = _fill_cache(lens, 2, 8)
    start = 0
    for seq, n in zip(seqs, lens):
        table = torch.tensor(seq.block_table, dtype=torch.int32)
        torch.testing.assert_close(ref.gather_kv(cache.k[0], table, n), k[start : start + n])
        torch.testing.assert_close(ref.gather_kv(cache.v[0], table, n), v[start : start + n])
        start += n


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("hq, hk", [(4, 4), (6, 2), (4, 1)])
def test_attention_matches_sdpa(hq, hk, window):
    """Prefill of whole sequences, then queries appended to a cached prefix."""
    d = 16
    lens = [7, 1, 12]
    cache, seqs, k, v = _fill_cache(lens, hk, d)
    g = torch.Generator().manual_seed(2)
    # queries: the last qlen tokens of each sequence (qlen = full length, then 1..3)
    for qlens in (lens, [2, 1, 3]):
        q = torch.randn(sum(qlens), hq, d, generator=g)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor(
                [s.block_table + [0] * (3 - len(s.block_table)) for s in seqs], dtype=torch.int32
            ),
            slot_mapping=torch.zeros(0, dtype=torch.int64),
            query_lens_host=qlens,
            seq_lens_host=lens,
        )
        out = ref.attention(q, cache.k[0], cache.v[0], meta, d**-0.5, window)
        qs = ks = 0
        for n, ql in zip(lens, qlens):
            qb = q[qs : qs + ql].transpose(0, 1)
            kb = k[ks : ks + n].transpose(0, 1).repeat_interleave(hq // hk, 0)
            vb = v[ks : ks + n].transpose(0, 1).repeat_interleave(hq // hk, 0)
            qpos = torch.arange(n - ql, n)[:, None]
            kpos = torch.arange(n)[None]
            mask = kpos <= qpos
            if window:
                mask &= kpos > qpos - window
            expect = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
            torch.testing.assert_close(out[qs : qs + ql], expect.transpose(0, 1), rtol=1e-5, atol=1e-5)
            qs, ks = qs + ql, ks + n


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("hq, hk", [(4, 4), (6, 2), (4, 1)])
def test_decode_attention_reference_matches_attention(hq, hk, window):
    """The graph-safe decode reference (all table blocks gathered, masked on
    the device lengths) equals the per-sequence ``attention``, whatever the
    table holds past a sequence's blocks; a sequence of length 0 gets zeros."""
    d, bs, nb = 8, 4, 12
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(nb, bs, hk, d, generator=g)
    v_cache = torch.randn(nb, bs, hk, d, generator=g)
    lens = [1, 9, 0, 16, 6]
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.full((len(lens), 4), -7, dtype=torch.int32)  # garbage past each sequence's blocks
    for b, n in enumerate(lens):
        used = -(-n // bs)
        tables[b, :used] = torch.tensor(perm[:used], dtype=torch.int32)
        perm = perm[used:] + perm[:used]
    q = torch.randn(len(lens), hq, d, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = ref.decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, window)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, 1, 2, 2, 3, 4], dtype=torch.int32),
        seq_lens=seq_lens,
        block_tables=tables.clamp(min=0),
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_lens_host=[1, 1, 0, 1, 1],
        seq_lens_host=lens,
    )
    keep = [b for b, n in enumerate(lens) if n]
    expect = ref.attention(q[keep], k_cache, v_cache, meta, 0.3, window)
    torch.testing.assert_close(out[keep], expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros(hq, d))


@pytest.mark.parametrize("window", [None, 2, 6])
@pytest.mark.parametrize("hq, hk", [(4, 4), (6, 2)])
def test_prefill_reference_on_device_lengths_matches_host_lengths(hq, hk, window):
    """A graphed step of w queries per sequence (a speculative verify pass)
    passes only bounds on the host (``seq_lens_exact=False``): the reference
    then gathers every table block and masks on the device lengths. Same
    outputs and log-sum-exps as with exact host lengths, whatever the table
    holds past a sequence's blocks; the tokens after the last sequence get 0 / -inf."""
    d, bs, nb, w = 8, 4, 12, 3
    g = torch.Generator().manual_seed(6)
    k_cache = torch.randn(nb, bs, hk, d, generator=g)
    v_cache = torch.randn(nb, bs, hk, d, generator=g)
    lens = [3, 9, 16, 5]
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.full((len(lens), 5), 11, dtype=torch.int32)  # stale blocks past each sequence's own
    for b, n in enumerate(lens):
        used = -(-n // bs)
        tables[b, :used] = torch.tensor(perm[:used], dtype=torch.int32)
        perm = perm[used:] + perm[:used]
    q = torch.randn(len(lens) * w + 2, hq, d, generator=g)  # two tokens past the last sequence's queries
    exact = AttentionMetadata(
        cu_seqlens_q=torch.arange(0, (len(lens) + 1) * w, w, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_lens_host=[w] * len(lens),
        seq_lens_host=lens,
    )
    bounded = dataclasses.replace(exact, seq_lens_host=[20] * len(lens), seq_lens_exact=False)
    out, lse = ref.prefill_attention(q, k_cache, v_cache, bounded, 0.3, window, return_lse=True)
    want, want_lse = ref.prefill_attention(q, k_cache, v_cache, exact, 0.3, window, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], torch.zeros(2, hq, d)) and torch.isinf(lse[-2:]).all()
    ragged = dataclasses.replace(bounded, query_lens_host=[w, w, w, w - 1])
    with pytest.raises(ValueError, match="same number of queries"):
        ref.prefill_attention(q, k_cache, v_cache, ragged, 0.3, window)


def test_prepare_step_slots_are_distinct_and_blocks_owned():
    cache = KVCache(1, 20, 1, 4, torch.float32, torch.device("cpu"), block_size=4)
    seqs = [CachedSequence() for _ in range(3)]
    ids, pos, meta, last = prepare_step(cache, seqs, [[1] * 6, [2] * 4, [3]])
    assert pos.tolist() == list(range(6)) + list(range(4)) + [0]
    assert last.tolist() == [5, 9, 10]
    assert len(set(meta.slot_mapping.tolist())) == 11
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned)) == 2 + 1 + 1
    _, pos, meta, _ = prepare_step(cache, seqs, [[4], [5], [6]])
    assert pos.tolist() == [6, 4, 1] and meta.seq_lens_host == [7, 5, 2]
    assert len(seqs[1].block_table) == 2  # token 4 opened a second block
    with pytest.raises(RuntimeError, match="full"):
        prepare_step(cache, [CachedSequence()], [[0] * 100])


def test_silu_and_mul_and_rmsnorm_formulas():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2 * 33, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref.silu_and_mul(x), F.silu(x[:, :33]) * x[:, 33:])
    w = torch.randn(33, generator=g, dtype=torch.float64)
    y = x[:, :33]
    expect = y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ref.rmsnorm(y, w, 1e-6), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gated_add_matches_qwen2_moe_formula(dtype):
    """``x + sigmoid(gate) * y`` as transformers' Qwen2MoeSparseMoeBlock adds its shared expert."""
    g = torch.Generator().manual_seed(11)
    x, y, gate = (torch.randn(7, 33, generator=g), torch.randn(7, 33, generator=g), torch.randn(7, 1, generator=g) * 3)
    out = ref.sigmoid_gated_add(x.to(dtype), y.to(dtype), gate.to(dtype))
    assert out.dtype == dtype and out.shape == (7, 33)
    want = x.to(dtype).float() + F.sigmoid(gate.to(dtype).float()) * y.to(dtype).float()
    torch.testing.assert_close(out.float(), want, rtol=0 if dtype == torch.float32 else 1e-2, atol=1e-6)
    with pytest.raises(ValueError, match="gate"):
        ref.sigmoid_gated_add(x, y, gate.view(1, 7))
    with pytest.raises(ValueError, match="must match"):
        ref.sigmoid_gated_add(x, y[:, :32], gate)
