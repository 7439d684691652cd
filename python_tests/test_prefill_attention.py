"""Prefill attention: the reference's LSE against independent formulas (CPU), the
CUDA kernel against the fp32 reference (flash-attention's 2x rule, GPU)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from conftest import poison_cuda_allocator, requires_cuda
from fastllm.ops import AttentionMetadata
from fastllm.ops import reference as ref
from fastllm.ops.cuda_prefill_attention import prefill_attention_supported, wgmma_usable


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def paged_case(q_lens, seq_lens, hq, hk, d, dtype, block_size=16, seed=0, device="cpu", qkv_view=False):
    """Random K/V of sequences of lengths seq_lens in a paged cache whose block
    ids are a random permutation (unused blocks and slots hold NaN, unused table
    entries are -1), and random queries for the last q_lens positions of each.
    Returns (q, k_cache, v_cache, meta)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-s // block_size) for s in seq_lens]
    total = sum(nblocks) + 3
    perm = torch.randperm(total, generator=g).tolist()
    k_cache = torch.full((total, block_size, hk, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    width = max(nblocks, default=0) + 1
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    slots, new_slots = [], []  # every cached token's slot; the slots of this step's tokens
    for b, s in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(nblocks[b])]
        tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(s)]
        new_slots += slots[len(slots) - min(q_lens[b], s) :] if q_lens[b] else []
    n_kv = sum(seq_lens)
    k = torch.randn(n_kv, hk, d, generator=g).to(dtype)
    v = torch.randn(n_kv, hk, d, generator=g).to(dtype)
    ref.reshape_and_cache(k.to(device), v.to(device), k_cache, v_cache,
                          torch.tensor(slots, dtype=torch.int64, device=device))
    n = sum(q_lens)
    if qkv_view:  # q as a view of a fused qkv projection output
        qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(dtype).to(device)
        q = qkv[:, : hq * d].view(n, hq, d)
    else:
        q = torch.randn(n, hq, d, generator=g).to(dtype).to(device)
    cu = [0]
    for ql in q_lens:
        cu.append(cu[-1] + ql)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(new_slots, dtype=torch.int64, device=device),
        query_lens_host=list(q_lens),
        seq_lens_host=list(seq_lens),
    )
    return q, k_cache, v_cache, meta


def dense_scores(q, k_cache, meta, scale, window):
    """Per sequence: explicit masked scores [Hq, qlen, slen] in fp32."""
    hq, hk = q.shape[1], k_cache.shape[2]
    start, out = 0, []
    for b, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        qb = q[start : start + ql].float().transpose(0, 1)
        kb = ref.gather_kv(k_cache, meta.block_tables[b], sl).float().repeat_interleave(hq // hk, 1).transpose(0, 1)
        s = qb @ kb.transpose(1, 2) * scale
        qpos = torch.arange(sl - ql, sl, device=q.device)[:, None]
        kpos = torch.arange(sl, device=q.device)[None]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        out.append(s.masked_fill(~allowed, float("-inf")))
        start += ql
    return out


def torch_peer(q, k_cache, v_cache, meta, scale, window):
    """The same attention done by torch in the 16-bit dtype (scores and P rounded
    to it, as flash-attention's attention_ref without upcast)."""
    hq, hk = q.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    start = 0
    for b, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if ql == 0:
            continue
        qb = q[start : start + ql].transpose(0, 1)
        kb = ref.gather_kv(k_cache, meta.block_tables[b], sl).repeat_interleave(hq // hk, 1).transpose(0, 1)
        vb = ref.gather_kv(v_cache, meta.block_tables[b], sl).repeat_interleave(hq // hk, 1).transpose(0, 1)
        s = torch.matmul(qb, kb.transpose(1, 2)) * scale
        qpos = torch.arange(sl - ql, sl, device=q.device)[:, None]
        kpos = torch.arange(sl, device=q.device)[None]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0).to(q.dtype)
        out[start : start + ql] = torch.matmul(p, vb).transpose(0, 1)
        start += ql
    return out


def check_kernel(q, k_cache, v_cache, meta, scale, window, out, lse=None):
    """flash-attention's rule: kernel error <= 2x the error of torch in q's dtype."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    want, want_lse = ref.prefill_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window,
                                           return_lse=True)
    peer = torch_peer(q, k_cache, v_cache, meta, scale, window)
    err = (out.float() - want).abs().max().item()
    peer_err = (peer.float() - want).abs().max().item()
    assert err <= 2 * peer_err + 1e-4, (err, peer_err)
    if lse is not None:
        assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and not torch.isnan(lse).any()
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-3, rtol=1e-3)


def merge_lse(parts):
    """out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i (fp32)."""
    lses = torch.stack([lse for _, lse in parts])  # [P, N, H]
    total = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - total).nan_to_num_(0.0)  # a part without keys weighs 0
    out = sum(w[i][..., None] * o.float() for i, (o, _) in enumerate(parts))
    return out, total


def split_prefix_chunk(q, k_cache, v_cache, meta, prefix, device):
    """Attention of one sequence's chunk of queries (after `prefix` cached keys),
    split into (a) the prefix keys only, each query as its own sequence of
    length `prefix` (position prefix - 1: sees all of them), and (b) the chunk's
    own keys in a fresh cache (causal). Returns ((q, caches, meta) of a, of b)."""
    (ql,), (sl,) = meta.query_lens_host, meta.seq_lens_host
    assert sl == prefix + ql
    table = meta.block_tables[0]
    meta_a = AttentionMetadata(
        cu_seqlens_q=torch.arange(ql + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((ql,), prefix, dtype=torch.int32, device=device),
        block_tables=table[None].expand(ql, -1).contiguous(),
        slot_mapping=torch.zeros(0, dtype=torch.int64, device=device),
        query_lens_host=[1] * ql,
        seq_lens_host=[prefix] * ql,
    )
    bs, hk, d = k_cache.shape[1:]
    k_chunk = ref.gather_kv(k_cache, table, sl)[prefix:]
    v_chunk = ref.gather_kv(v_cache, table, sl)[prefix:]
    nb = -(-ql // bs)
    kc = torch.zeros(nb, bs, hk, d, dtype=k_cache.dtype, device=device)
    vc = torch.zeros_like(kc)
    ref.reshape_and_cache(k_chunk, v_chunk, kc, vc, torch.arange(ql, device=device))
    meta_b = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, ql], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([ql], dtype=torch.int32, device=device),
        block_tables=torch.arange(nb, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.zeros(0, dtype=torch.int64, device=device),
        query_lens_host=[ql],
        seq_lens_host=[ql],
    )
    return (q, k_cache, v_cache, meta_a), (q, kc, vc, meta_b)


# --------------------------------------------------------------------------- #
# The reference (CPU)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("hq, hk", [(4, 4), (6, 2), (4, 1)])
def test_reference_lse_is_logsumexp_of_scores(hq, hk, window):
    q, kc, vc, meta = paged_case([3, 1, 9, 0], [3, 12, 20, 4], hq, hk, 16, torch.float32, block_size=4, seed=1)
    scale = 0.3
    out, lse = ref.prefill_attention(q, kc, vc, meta, scale, window, return_lse=True)
    expect = torch.cat([torch.logsumexp(s, dim=-1).transpose(0, 1) for s in dense_scores(q, kc, meta, scale, window)])
    torch.testing.assert_close(lse, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref.prefill_attention(q, kc, vc, meta, scale, window), rtol=0, atol=0)


def test_reference_query_without_keys():
    """query_len > seq_len puts the first queries at negative positions: no keys,
    output 0 and lse -inf."""
    q, kc, vc, meta = paged_case([3], [3], 2, 1, 8, torch.float32, block_size=4, seed=2)
    meta.seq_lens_host = [1]
    meta.seq_lens = torch.tensor([1], dtype=torch.int32)
    out, lse = ref.prefill_attention(q, kc, vc, meta, 0.5, return_lse=True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.isinf(lse[:2]).all() and (lse[:2] < 0).all()
    assert torch.isfinite(lse[2]).all()


def test_reference_lse_merges_prefix_and_chunk():
    """Attention over [prefix keys] and over [chunk keys] merged with their LSEs
    equals attention over all keys (what chunked prefill / cascade attention do)."""
    prefix, ql = 13, 6
    q, kc, vc, meta = paged_case([ql], [prefix + ql], 6, 2, 16, torch.float32, block_size=4, seed=3)
    whole, whole_lse = ref.prefill_attention(q, kc, vc, meta, 0.25, return_lse=True)
    a, b = split_prefix_chunk(q, kc, vc, meta, prefix, "cpu")
    parts = [ref.prefill_attention(*a, 0.25, return_lse=True), ref.prefill_attention(*b, 0.25, return_lse=True)]
    out, lse = merge_lse(parts)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_supported_is_false_off_the_kernel_domain():
    q, kc, vc, meta = paged_case([4], [4], 2, 1, 64, torch.bfloat16, seed=4)
    assert not prefill_attention_supported(q, kc, vc, meta, 0.125)  # CPU tensors
    assert not prefill_attention_supported(q.float(), kc.float(), vc.float(), meta, 0.125)


def test_op_table_runs_reference_on_cpu():
    from fastllm import ops

    q, kc, vc, meta = paged_case([5, 2], [5, 9], 4, 2, 16, torch.float32, block_size=4, seed=5)
    out, lse = ops.prefill_attention(q, kc, vc, meta, 0.25, 3, return_lse=True)
    want, want_lse = ref.prefill_attention(q, kc, vc, meta, 0.25, 3, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# --------------------------------------------------------------------------- #
# The CUDA kernel
# --------------------------------------------------------------------------- #
HEAD_DIMS = [64, 80, 96, 128, 256]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(params=["mma", "wgmma", "wgmma_pipelined"])
def impl(request):
    """Every kernel test runs every kernel: mma.sync and the two sm_90a wgmma ones."""
    return request.param


def kernel(impl, *head_dims):
    """cuda.prefill_attention bound to one kernel; skips the wgmma kernel where
    it cannot run (not an sm_90 GPU, no 90a build, other head dims)."""
    from fastllm.ops import cuda

    if impl != "mma" and not all(wgmma_usable(d) for d in head_dims):
        pytest.skip(f"the wgmma kernel needs an sm_90 GPU, a 90a build and head dims in (64, 128), got {head_dims}")
    return functools.partial(cuda.prefill_attention, impl=impl)


@requires_cuda
@pytest.mark.parametrize("q_len", [1, 7, 129, 1000])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_prompt_lengths(dtype, d, q_len, impl):
    """One prompt, GQA 32/8, every head dim, with the LSE."""
    attn = kernel(impl, d)

    bs = 16 if q_len % 2 else 32
    q, kc, vc, meta = paged_case([q_len], [q_len], 32, 8, d, dtype, block_size=bs, seed=q_len + d, device="cuda")
    poison_cuda_allocator()
    out, lse = attn(q, kc, vc, meta, d**-0.5, return_lse=True)
    check_kernel(q, kc, vc, meta, d**-0.5, None, out, lse)


@requires_cuda
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 1, 37, 300])
@pytest.mark.parametrize("hq, hk", [(32, 8), (8, 1), (4, 4), (6, 2)], ids=["gqa", "mqa", "mha", "g3"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_varlen_prefix_window(dtype, d, hq, hk, window, block_size, impl):
    """Several sequences packed: whole prompts, chunks after cached prefixes,
    single queries, an empty one; sliding windows; shuffled cache blocks."""
    attn = kernel(impl, d)

    q_lens = [1, 7, 129, 300, 0, 40, 1]
    seq_lens = [1, 100, 129, 900, 5, 373, 64]
    q, kc, vc, meta = paged_case(q_lens, seq_lens, hq, hk, d, dtype, block_size=block_size, seed=d + hq,
                                 device="cuda")
    poison_cuda_allocator()
    out, lse = attn(q, kc, vc, meta, d**-0.5, window, return_lse=True)
    check_kernel(q, kc, vc, meta, d**-0.5, window, out, lse)
    out_only = attn(q, kc, vc, meta, d**-0.5, window)
    assert torch.equal(out_only, out)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_long_prompt(dtype, impl):
    attn = kernel(impl, 128)

    q, kc, vc, meta = paged_case([4096], [4096], 32, 8, 128, dtype, seed=7, device="cuda")
    out, lse = attn(q, kc, vc, meta, 128**-0.5, return_lse=True)
    check_kernel(q, kc, vc, meta, 128**-0.5, None, out, lse)


@requires_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
def test_kernel_long_chunk_after_prefix_with_window(d, impl):
    attn = kernel(impl, d)

    q, kc, vc, meta = paged_case([700, 513], [3000, 513], 16, 4, d, torch.bfloat16, seed=8, device="cuda")
    out, lse = attn(q, kc, vc, meta, d**-0.5, 1000, return_lse=True)
    check_kernel(q, kc, vc, meta, d**-0.5, 1000, out, lse)


@requires_cuda
def test_kernel_lse_merges_prefix_and_chunk(impl):
    attn = kernel(impl, 128)

    prefix, ql = 1000, 333
    q, kc, vc, meta = paged_case([ql], [prefix + ql], 32, 8, 128, torch.bfloat16, seed=9, device="cuda")
    whole, whole_lse = attn(q, kc, vc, meta, 0.09, return_lse=True)
    a, b = split_prefix_chunk(q, kc, vc, meta, prefix, "cuda")
    out, lse = merge_lse([attn(*a, 0.09, return_lse=True),
                          attn(*b, 0.09, return_lse=True)])
    torch.testing.assert_close(lse, whole_lse, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(out, whole.float(), atol=2e-2, rtol=2e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_queries_without_keys(dtype, impl):
    """Inconsistent lengths (query_len > seq_len) put queries at negative
    positions: zero output and -inf LSE, like the reference; no fault."""
    attn = kernel(impl, 64)

    q, kc, vc, meta = paged_case([5, 3], [5, 3], 4, 2, 64, dtype, seed=10, device="cuda")
    meta.seq_lens = torch.tensor([2, 3], dtype=torch.int32, device="cuda")
    meta.seq_lens_host = [2, 3]
    out, lse = attn(q, kc, vc, meta, 0.125, return_lse=True)
    check_kernel(q, kc, vc, meta, 0.125, None, out, lse)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.isneginf(lse[:3]).all()


@requires_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_q_view_of_fused_qkv_and_misaligned(d, impl):
    attn = kernel(impl, d)

    q, kc, vc, meta = paged_case([37, 64], [50, 64], 8, 2, d, torch.bfloat16, seed=11, device="cuda", qkv_view=True)
    assert not q.is_contiguous()
    check_kernel(q, kc, vc, meta, d**-0.5, None, attn(q, kc, vc, meta, d**-0.5))
    base = torch.randn(1 + q.numel(), device="cuda", dtype=torch.bfloat16)
    odd = base[1:].view(q.shape)  # contiguous, 2 bytes off 16-byte alignment: copied first
    odd.copy_(q)
    check_kernel(odd, kc, vc, meta, d**-0.5, None, attn(odd, kc, vc, meta, d**-0.5))


@requires_cuda
def test_kernel_q_with_any_stride_on_size_one_dims(impl):
    """torch leaves the stride of a size-1 dim arbitrary (a contiguous [1, H, D]
    tensor may have stride(0) == 3, and clone() keeps it): the kernel never uses it."""
    attn = kernel(impl, 64)

    q0, kc, vc, meta = paged_case([1], [20], 8, 2, 64, torch.float16, seed=18, device="cuda")
    q = torch.empty_strided((1, 8, 64), (3, 64, 1), device="cuda", dtype=torch.float16)
    q.copy_(q0)
    assert q.is_contiguous()
    check_kernel(q, kc, vc, meta, 0.125, None, attn(q, kc, vc, meta, 0.125))
    q0, kc, vc, meta = paged_case([3, 5], [3, 9], 1, 1, 64, torch.float16, seed=19, device="cuda")
    q = torch.empty_strided((8, 1, 64), (64, 5, 1), device="cuda", dtype=torch.float16)
    q.copy_(q0)
    check_kernel(q, kc, vc, meta, 0.125, None, attn(q, kc, vc, meta, 0.125))


@requires_cuda
def test_kernel_inconsistent_metadata_never_faults(impl):
    """Block ids out of range, seq_lens past the block table, cu_seqlens_q past
    the tokens: the kernel zero-fills or clamps (no fault, finite output)."""
    attn = kernel(impl, 128)

    q, kc, vc, meta = paged_case([40, 9], [100, 9], 8, 2, 128, torch.bfloat16, block_size=16, seed=17, device="cuda")
    kc.nan_to_num_(0.0)  # slots past a sequence's end are read once its length is wrong
    vc.nan_to_num_(0.0)
    meta.block_tables[0, 1] = 10**6
    meta.block_tables[0, 3] = -5
    meta.seq_lens[1] = 10**6  # far past its table
    meta.cu_seqlens_q[2] = 10**4  # past the 49 tokens
    out, lse = attn(q, kc, vc, meta, 0.1, return_lse=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()


@requires_cuda
def test_kernel_empty_and_uncovered_tokens(impl):
    attn = kernel(impl, 64)

    q, kc, vc, meta = paged_case([0], [4], 4, 2, 64, torch.float16, seed=12, device="cuda")
    out, lse = attn(q, kc, vc, meta, 0.125, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    q, kc, vc, meta = paged_case([3], [3], 4, 2, 64, torch.float16, seed=13, device="cuda")
    q2 = torch.cat([q, q[:2]])  # two tokens that no sequence owns
    out, lse = attn(q2, kc, vc, meta, 0.125, return_lse=True)
    check_kernel(q, kc, vc, meta, 0.125, None, out[:3], lse[:3])
    assert torch.equal(out[3:], torch.zeros_like(out[3:])) and torch.isneginf(lse[3:]).all()


@requires_cuda
def test_kernel_bad_input():
    from fastllm.ops import cuda

    q, kc, vc, meta = paged_case([4], [4], 4, 2, 64, torch.float16, seed=14, device="cuda")
    s = 0.125
    with pytest.raises(TypeError, match="dtype"):
        cuda.prefill_attention(q.float(), kc.float(), vc.float(), meta, s)
    with pytest.raises(TypeError, match="dtype"):
        cuda.prefill_attention(q, kc.bfloat16(), vc.bfloat16(), meta, s)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cuda.prefill_attention(q.tolist(), kc, vc, meta, s)
    with pytest.raises(ValueError, match="head_dim"):
        cuda.prefill_attention(q[..., :48], kc[..., :48].contiguous(), vc[..., :48].contiguous(), meta, s)
    with pytest.raises(ValueError, match="head_dim"):
        cuda.prefill_attention(q[..., :32], kc, vc, meta, s)
    with pytest.raises(ValueError, match="multiple"):
        cuda.prefill_attention(q[:, :3], kc, vc, meta, s)
    with pytest.raises(ValueError, match="power of two"):
        cuda.prefill_attention(q, kc[:, :12].contiguous(), vc[:, :12].contiguous(), meta, s)
    with pytest.raises(ValueError, match="contiguous"):
        cuda.prefill_attention(q, kc.transpose(0, 1), vc, meta, s)
    with pytest.raises(ValueError, match="contiguous last"):
        cuda.prefill_attention(q.transpose(1, 2), kc, vc, meta, s)
    with pytest.raises(ValueError, match="must be on"):
        cuda.prefill_attention(q, kc.cpu(), vc, meta, s)
    with pytest.raises(ValueError, match="scale"):
        cuda.prefill_attention(q, kc, vc, meta, 0.0)
    with pytest.raises(ValueError, match="scale"):
        cuda.prefill_attention(q, kc, vc, meta, float("nan"))
    with pytest.raises(ValueError, match="sliding_window"):
        cuda.prefill_attention(q, kc, vc, meta, s, 0)
    bad = AttentionMetadata(meta.cu_seqlens_q.long(), meta.seq_lens, meta.block_tables, meta.slot_mapping,
                            meta.query_lens_host, meta.seq_lens_host)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        cuda.prefill_attention(q, kc, vc, bad, s)
    bad = AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, meta.block_tables[0], meta.slot_mapping,
                            meta.query_lens_host, meta.seq_lens_host)
    with pytest.raises(ValueError, match="block_tables"):
        cuda.prefill_attention(q, kc, vc, bad, s)
    bad = AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, meta.slot_mapping,
                            [5], meta.seq_lens_host)
    with pytest.raises(ValueError, match="query_lens_host"):
        cuda.prefill_attention(q, kc, vc, bad, s)
    # outside the kernel's domain the op table would run the reference instead
    assert prefill_attention_supported(q, kc, vc, meta, s, 3, return_lse=True)
    assert not prefill_attention_supported(q.float(), kc.float(), vc.float(), meta, s)
    assert not prefill_attention_supported(q[..., :32], kc[..., :32].contiguous(), vc[..., :32].contiguous(), meta, s)
    assert not prefill_attention_supported(q, kc, vc, meta, s, 0)
    assert not prefill_attention_supported(q, kc, vc, meta, -1.0)
    assert not prefill_attention_supported(q, kc[:, :12].contiguous(), vc[:, :12].contiguous(), meta, s)


@requires_cuda
def test_op_table_uses_kernel_when_enabled(monkeypatch, only_named_kernels):
    from fastllm import backend, ops

    q, kc, vc, meta = paged_case([9, 3], [20, 3], 8, 2, 128, torch.bfloat16, seed=15, device="cuda")
    calls = []
    monkeypatch.setenv("FASTLLM_KERNELS", "prefill_attention")
    backend.reset_settings()
    real = backend._C.prefill_attention
    monkeypatch.setattr(backend._C, "prefill_attention", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    out, lse = ops.prefill_attention(q, kc, vc, meta, 0.1, return_lse=True)
    assert len(calls) == 1
    check_kernel(q, kc, vc, meta, 0.1, None, out, lse)
    ops.prefill_attention(q.float(), kc.float(), vc.float(), meta, 0.1)  # fp32: the reference
    assert len(calls) == 1
    monkeypatch.setenv("FASTLLM_KERNELS", "")
    backend.reset_settings()
    ops.prefill_attention(q, kc, vc, meta, 0.1)  # not verified, not opted in: the reference
    assert len(calls) == 1


@requires_cuda
def test_kernel_under_cuda_graph(impl):
    attn = kernel(impl, 128)

    q, kc, vc, meta = paged_case([100, 17], [300, 17], 32, 8, 128, torch.bfloat16, seed=16, device="cuda")
    eager, eager_lse = attn(q, kc, vc, meta, 0.1, 64, return_lse=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attn(q, kc, vc, meta, 0.1, 64, return_lse=True)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = attn(q, kc, vc, meta, 0.1, 64, return_lse=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(lse, eager_lse)
    q.copy_(q * 0.5)
    meta.seq_lens.copy_(torch.tensor([250, 17], dtype=torch.int32))  # device lengths change between replays
    graph.replay()
    torch.cuda.synchronize()
    meta.seq_lens_host = [250, 17]
    again, again_lse = attn(q, kc, vc, meta, 0.1, 64, return_lse=True)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    assert not torch.equal(out, eager)


def test_impl_choice_is_checked():
    """The kernel choice is validated before anything runs (no GPU needed)."""
    from fastllm.ops.cuda_prefill_attention import _resolve_impl

    with pytest.raises(ValueError, match="impl must be"):
        _resolve_impl("prefill_attention", "flash", 128, torch.device("cpu"))
    assert not wgmma_usable(80) and not wgmma_usable(256)  # never, whatever the GPU
    if not torch.cuda.is_available():
        assert not wgmma_usable(128)
        for impl in ("wgmma", "wgmma_pipelined"):
            with pytest.raises(ValueError, match="sm_90"):
                _resolve_impl("prefill_attention", impl, 128, torch.device("cpu"))
        assert _resolve_impl("prefill_attention", None, 128, torch.device("cpu")) == 0  # mma


@requires_cuda
def test_wgmma_chosen_when_enabled_and_usable(monkeypatch, only_named_kernels):
    """impl=None: a wgmma kernel once enabled and it can run (the pipelined one
    first), mma.sync otherwise (other head dims, other GPUs); impl='wgmma' where
    it cannot run is a ValueError, not a launch of an empty kernel."""
    from fastllm import backend
    from fastllm.ops import cuda

    calls = []
    real = backend._C.prefill_attention
    monkeypatch.setattr(backend._C, "prefill_attention", lambda *a: (calls.append(a[-1]), real(*a))[1], raising=False)
    for d in (128, 80):
        q, kc, vc, meta = paged_case([9, 3], [20, 3], 8, 2, d, torch.bfloat16, seed=20, device="cuda")
        for enabled, code in [
            ("prefill_attention_sm90", 1),
            ("prefill_attention_sm90_pipelined", 2),
            ("prefill_attention_sm90,prefill_attention_sm90_pipelined", 2),
        ]:
            monkeypatch.setenv("FASTLLM_KERNELS", enabled)
            backend.reset_settings()
            out = cuda.prefill_attention(q, kc, vc, meta, 0.1)
            check_kernel(q, kc, vc, meta, 0.1, None, out)
            assert calls[-1] == (code if wgmma_usable(d) else 0)
        monkeypatch.setenv("FASTLLM_KERNELS", "")
        backend.reset_settings()
        cuda.prefill_attention(q, kc, vc, meta, 0.1)
        assert calls[-1] == 0
        if not wgmma_usable(d):
            for impl in ("wgmma", "wgmma_pipelined"):
                with pytest.raises(ValueError, match="wgmma"):
                    cuda.prefill_attention(q, kc, vc, meta, 0.1, impl=impl)
    assert not wgmma_usable(80)
