"""Decode attention and the paged-cache write (csrc/attention.cu) against the reference.

Tolerance (flash-attention's rule): the kernel's error against the fp32
reference is at most twice the error of the same attention computed by torch
in the kernel's dtype (SDPA on the gathered 16-bit K/V), plus a tiny epsilon.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import poison_cuda_allocator, requires_cuda, spy_variants
from fastllm import backend
from fastllm.ops import reference as ref


def paged_cache(lens: list[int], hk: int, d: int, dtype, block_size: int = 16, seed: int = 0, spare: int = 3):
    """Random K/V for sequences of ``lens`` tokens in a shuffled paged cache.

    Returns (k_cache, v_cache, block_tables int32 [B, max_blocks], seq_lens int32 [B]).
    Unused slots and spare blocks hold large values, so reading outside a
    sequence's range shows up in the output."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = [max(1, -(-n // block_size)) for n in lens]
    num_blocks = sum(per_seq) + spare
    k_cache = torch.full((num_blocks, block_size, hk, d), 60.0, device="cuda").to(dtype)
    v_cache = torch.full((num_blocks, block_size, hk, d), 60.0, device="cuda").to(dtype)
    perm = torch.randperm(num_blocks, generator=g, device="cuda").tolist()
    width = max(per_seq)
    tables, used = [], 0
    for n, nb in zip(lens, per_seq):
        blocks = perm[used : used + nb]
        used += nb
        tables.append(blocks + [perm[-1]] * (width - nb))  # padding entries point at a spare block
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)],
                             dtype=torch.int64, device="cuda")
        k = torch.randn(n, hk, d, generator=g, device="cuda").to(dtype)
        v = torch.randn(n, hk, d, generator=g, device="cuda").to(dtype)
        ref.reshape_and_cache(k, v, k_cache, v_cache, slots)
    return (k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device="cuda"),
            torch.tensor(lens, dtype=torch.int32, device="cuda"))


def torch_peer(q, k_cache, v_cache, tables, lens, scale, window=None):
    """The same attention computed by torch in q's dtype (SDPA per sequence)."""
    out = torch.zeros_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        start = max(0, n - window) if window else 0
        k = ref.gather_kv(k_cache, tables[b], n)[start:].transpose(0, 1)  # [Hk, L, D]
        v = ref.gather_kv(v_cache, tables[b], n)[start:].transpose(0, 1)
        k, v = k.repeat_interleave(hq // hk, 0), v.repeat_interleave(hq // hk, 0)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0]
    return out


def check_close(out, expect_fp32, peer):
    assert not torch.isnan(out).any()
    err = (out.float() - expect_fp32).abs().max().item()
    peer_err = (peer.float() - expect_fp32).abs().max().item()
    assert err <= 2 * peer_err + 1e-4, (err, peer_err)


# The split kernels (csrc/attention.cu): 0, the default, runs on tensor cores
# for head dims 64/128/256 (decode_split_tc_kernel) and on CUDA cores for the
# others; 1 runs the CUDA-core one (decode_split_kernel, also the fallback for
# caches of 2^31 slots) for every head dim. Both are tested everywhere.
VARIANTS = [0, 1]
VARIANT_ARG = 21  # position of `variant` in _C.decode_attention's arguments


def run_case(lens, hq, hk, d, dtype, block_size=16, window=None, num_splits=None, seed=0, q=None, variant=0):
    from fastllm.ops import cuda

    k_cache, v_cache, tables, seq_lens = paged_cache(lens, hk, d, dtype, block_size, seed)
    if q is None:
        q = torch.randn(len(lens), hq, d, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1))
        q = (q * 1.5).to(dtype)
    scale = d**-0.5
    poison_cuda_allocator()
    out = cuda.decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, window, num_splits=num_splits,
                                _variant=variant)
    assert out.shape == q.shape and out.dtype == dtype
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, scale, window)
    check_close(out, expect, torch_peer(q, k_cache, v_cache, tables, seq_lens, scale, window))
    return out


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (8, 8), (16, 1), (12, 4), (40, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_matches_reference(heads, d, dtype, variant):
    hq, hk = heads
    run_case([1, 17, 300, 1000, 5], hq, hk, d, dtype, variant=variant)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
def test_batches_of_mixed_lengths(batch, block_size, variant):
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2500, (batch,), generator=g).tolist()
    run_case(lens, 32, 8, 128, torch.bfloat16, block_size=block_size, seed=batch, variant=variant)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64, 65, 256])
def test_forced_splits(num_splits, variant):
    """Any split count gives the same answer, including more splits than tiles
    (65 and 256: more than one pass of variant 1's combine)."""
    run_case([4096, 33, 1], 32, 8, 128, torch.bfloat16, num_splits=num_splits, variant=variant)
    run_case([8192, 2048], 8, 1, 256, torch.float16, num_splits=num_splits, variant=variant)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_long_context_single_sequence(variant):
    run_case([32768], 32, 8, 128, torch.bfloat16, variant=variant)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [1, 16, 100, 4096])
def test_sliding_window(window, variant):
    run_case([1, 50, 700, 3000], 16, 4, 64, torch.float16, window=window, variant=variant)


@requires_cuda
def test_short_sequences_with_many_splits_are_read_right_after():
    """Every sequence fits one split, so no combine CTA has work and all exit at
    once; the combine is launched early (PDL) and must still complete
    only after the split kernel wrote the outputs that the next kernel reads."""
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([5, 40, 64], 8, 128, torch.bfloat16)
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16)
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.1)
    peer = torch_peer(q, k_cache, v_cache, tables, lens, 0.1)
    for i in range(20):
        poison_cuda_allocator()
        out = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, num_splits=64, _variant=i % 3)
        snapshot = out.clone()  # the very next kernel on the stream
        check_close(snapshot, expect, peer)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_sequence_gives_zeros(variant):
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([5, 1, 9], 2, 64, torch.float16)
    lens[1] = 0
    q = torch.randn(3, 4, 64, device="cuda", dtype=torch.float16)
    out = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=4, _variant=variant)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125)
    torch.testing.assert_close(out.float(), expect, atol=2e-3, rtol=2e-3)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_q_as_view_of_fused_qkv(variant):
    hq, hk, d, b = 8, 2, 128, 3
    qkv = torch.randn(b, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(b, hq, d)  # token stride (hq + 2hk) d
    assert not q.is_contiguous()
    run_case([10, 200, 3], hq, hk, d, torch.bfloat16, q=q, variant=variant)


@requires_cuda
def test_max_seq_len_bound_only_sizes_the_grid():
    """A host bound below the real lengths costs speed, never correctness; so
    does a much larger one."""
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([3000, 40], 4, 64, torch.bfloat16)
    q = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16)
    want = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    for bound in (0, 1, 100, 1 << 20):
        got = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.125, max_seq_len=bound)
        check_close(got, ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125),
                    torch_peer(q, k_cache, v_cache, tables, lens, 0.125))
        assert (got.float() - want.float()).abs().max() < 2e-2


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_under_cuda_graph(variant):
    """Lengths and block tables are read on the device: a captured step
    replays correctly after they change (variant 1: its PDL launch captured)."""
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([500, 900], 8, 128, torch.bfloat16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    bound = 1024
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, max_seq_len=bound, _variant=variant)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, max_seq_len=bound, _variant=variant)
        after = out.float() * 2  # a kernel right after, inside the graph
    lens.copy_(torch.tensor([20, 901], dtype=torch.int32))
    q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.1)
    check_close(out, expect, torch_peer(q, k_cache, v_cache, tables, lens, 0.1))
    assert torch.equal(after, out.float() * 2)


@requires_cuda
def test_bad_input():
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([5, 9], 2, 64, torch.float16)
    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        cuda.decode_attention(q.float(), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        cuda.decode_attention(q, k_cache.bfloat16(), v_cache.bfloat16(), tables, lens, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        cuda.decode_attention(torch.randn(2, 3, 64, device="cuda", dtype=torch.float16), k_cache, v_cache,
                              tables, lens, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        kc = torch.zeros(4, 16, 2, 32, device="cuda", dtype=torch.float16)
        cuda.decode_attention(torch.randn(2, 4, 32, device="cuda", dtype=torch.float16), kc, kc.clone(),
                              tables, lens, 0.1)
    with pytest.raises(TypeError, match="int32"):
        cuda.decode_attention(q, k_cache, v_cache, tables.long(), lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens[:1], 0.1)
    with pytest.raises(ValueError, match="must be on"):
        cuda.decode_attention(q, k_cache, v_cache, tables.cpu(), lens, 0.1)
    with pytest.raises(ValueError, match="scale"):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens, math.inf)
    with pytest.raises(ValueError, match="scale"):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens, 1e39)  # inf once converted to float32
    with pytest.raises(ValueError, match="num_splits"):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, num_splits=1000)
    with pytest.raises(ValueError, match="sliding_window"):
        cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, 0)
    for variant in (2, 3, -1):  # 2 (the combine fused into the split kernel) was removed
        with pytest.raises(ValueError, match=r"_variant must be 0 \(default: tensor cores\) or 1 \(CUDA cores\)"):
            cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, _variant=variant)


@requires_cuda
def test_default_variant_is_tensor_cores(monkeypatch):
    """The op table and the wrapper run variant 0 unless told otherwise."""
    from fastllm import ops
    from fastllm.ops import cuda

    k_cache, v_cache, tables, lens = paged_cache([3000, 9], 2, 64, torch.bfloat16)
    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
    variants = spy_variants(monkeypatch, "decode_attention", VARIANT_ARG)
    cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, _variant=1)
    assert variants == [0, 0, 1]


def test_variants_are_discoverable():
    """bench/sweep.py finds the variants, 0 and 1, in the wrapper's literal
    ``_variant not in (...)`` check."""
    import inspect

    from fastllm.ops import cuda_attention

    m = re.search(r"_variant not in \(([\d,\s]+)\)", inspect.getsource(cuda_attention.decode_attention))
    assert m and [int(v) for v in m.group(1).replace(",", " ").split()] == [0, 1]


@pytest.mark.skipif(not backend.HAS_C, reason="needs fastllm's compiled extension")
def test_plan_rejects_unknown_variants():
    from fastllm.ops.cuda_common import DTYPE_CODES

    plan = backend._C.decode_attention_plan
    bf16 = DTYPE_CODES[torch.bfloat16]
    for variant in (2, 3, -1):
        with pytest.raises(RuntimeError, match=r"variant must be 0 \(default"):
            plan(1, 32, 8, 128, 4096, 0, 0, bf16, variant)


@requires_cuda
def test_supported_predicate_and_op_table_fallback(monkeypatch):
    """Shapes the kernel does not cover (fp32, head_dim 32) run the reference
    through the op table instead of failing."""
    from fastllm import backend, ops
    from fastllm.ops import cuda

    monkeypatch.setenv("FASTLLM_KERNELS", "decode_attention")
    backend.reset_settings()
    k_cache, v_cache, tables, lens = paged_cache([5, 9], 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, device="cuda")
    assert not cuda.decode_attention_supported(q, k_cache, v_cache, tables, lens, 0.1)
    out = ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    torch.testing.assert_close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.1))
    k_cache, v_cache, tables, lens = paged_cache([5, 9], 2, 64, torch.bfloat16)
    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert cuda.decode_attention_supported(q, k_cache, v_cache, tables, lens, 0.1)
    calls = []
    real = backend._C.decode_attention
    monkeypatch.setattr(backend._C, "decode_attention", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    assert calls


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_garbage_lengths_and_block_ids_never_fault(variant):
    """seq_lens is device data the wrapper cannot check: lengths past the block
    table (up to INT32_MAX, where 32-bit split arithmetic used to overflow) are
    clamped to the table, and block ids outside the cache read zeros."""
    from fastllm.ops import cuda

    bs = 16
    k_cache, v_cache, tables, lens = paged_cache([5, 300, 33], 4, 128, torch.bfloat16, bs)
    k_cache.normal_(), v_cache.normal_()  # every slot of the table is now a key of a clamped sequence
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    cap = tables.shape[1] * bs
    garbage = torch.tensor([5, 2**31 - 1, 10**9], dtype=torch.int32, device="cuda")
    clamped = torch.tensor([5, cap, cap], dtype=torch.int32, device="cuda")
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, clamped, 0.1)
    peer = torch_peer(q, k_cache, v_cache, tables, clamped, 0.1)
    for splits in (None, 1, 3, 256):
        out = cuda.decode_attention(q, k_cache, v_cache, tables, garbage, 0.1, num_splits=splits, _variant=variant)
        check_close(out, expect, peer)
    bad = tables.clone()
    bad[1, 1], bad[1, 2] = 10**6, -7
    out = cuda.decode_attention(q, k_cache, v_cache, bad, lens, 0.1, _variant=variant)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_q_with_any_stride_on_size_one_dims(variant):
    """torch leaves the stride of a size-1 dim arbitrary (a contiguous [1, H, D]
    tensor may have stride(0) == 3): the kernel never uses it."""
    q = torch.empty_strided((1, 8, 64), (3, 64, 1), device="cuda", dtype=torch.float16)
    q.copy_(torch.randn(1, 8, 64, device="cuda"))
    assert q.is_contiguous()
    run_case([70], 8, 2, 64, torch.float16, q=q, variant=variant)
    q1 = torch.empty_strided((2, 1, 64), (64, 5, 1), device="cuda", dtype=torch.float16)
    q1.copy_(torch.randn(2, 1, 64, device="cuda"))
    run_case([9, 40], 1, 1, 64, torch.float16, q=q1, variant=variant)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_device():
    """The wrappers launch on the tensors' device (and plan for it), not on
    whichever device is current."""
    from fastllm.ops import cuda

    with torch.cuda.device(1):
        k_cache, v_cache, tables, lens = paged_cache([40, 700], 2, 128, torch.bfloat16)
        q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(3, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert torch.cuda.current_device() == 0 and q.device.index == 1
    out = cuda.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    expect = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.1)
    check_close(out, expect, torch_peer(q, k_cache, v_cache, tables, lens, 0.1))
    slots = torch.tensor([0, 5, 17], device=q.device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.reshape_and_cache(k, k, want_k, want_v, slots)
    cuda.reshape_and_cache(k, k, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# --------------------------------------------------------------------------- #
# reshape_and_cache
# --------------------------------------------------------------------------- #
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 2, 64), (33, 8, 128), (5, 3, 80), (4, 1, 6)], ids=str)
def test_reshape_and_cache_matches_reference(shape, dtype):
    from fastllm.ops import cuda

    n, hk, d = shape
    g = torch.Generator(device="cuda").manual_seed(n)
    k = torch.randn(n, hk, d, generator=g, device="cuda").to(dtype)
    v = torch.randn(n, hk, d, generator=g, device="cuda").to(dtype)
    slots = torch.randperm(12 * 16, generator=g, device="cuda")[:n]
    caches = [torch.randn(12, 16, hk, d, generator=g, device="cuda").to(dtype) for _ in range(2)]
    expect = [c.clone() for c in caches]
    ref.reshape_and_cache(k, v, *expect, slots)
    cuda.reshape_and_cache(k, v, *caches, slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


@requires_cuda
def test_reshape_and_cache_strided_views_and_padding_slots():
    from fastllm.ops import cuda

    n, hq, hk, d = 9, 8, 2, 128
    qkv = torch.randn(n, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
    v = qkv[:, (hq + hk) * d :].view(n, hk, d)
    slots = torch.arange(n, device="cuda") * 3
    slots[4] = -1  # padding token: skipped
    k_cache = torch.zeros(4, 16, hk, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    cuda.reshape_and_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    for i in range(n):
        if i == 4:
            continue
        assert torch.equal(flat_k[3 * i], k[i]) and torch.equal(flat_v[3 * i], v[i])
    assert flat_k[12].abs().sum() == 0  # slot 12 belonged to the padding token
    with pytest.raises(ValueError, match="slot_mapping"):
        cuda.reshape_and_cache(k, v, k_cache, v_cache, slots[:3])
    with pytest.raises(ValueError, match="do not match"):
        cuda.reshape_and_cache(k, v, k_cache[..., :64].contiguous(), v_cache[..., :64].contiguous(), slots)
