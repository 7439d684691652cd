"""int4_linear: the CUDA W4A16 kernel against the reference (flash-attention's
2x rule: its error against an fp64 computation on the same quantized weights is
at most twice that of torch's F.linear on the dequantized weight in the same
dtype), plus the wrapper's checks, a quantized model end to end, and the
host-side plan (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hopper_shared_memory, poison_cuda_allocator, requires_cuda, spy_variants
from fastllm import backend
from fastllm.ops import reference as ref
from fastllm.quant import quantize_int4

# (K, N, group): Llama-2-7B / 13B / 3-8B MLPs, Qwen2-0.5B up and down, odd N, tiny
SHAPES = [
    (4096, 11008, 128),
    (5120, 13824, 64),
    (896, 4864, 32),
    (4096, 14336, 128),
    (4864, 896, 128),
    (128, 129, 128),
    (96, 200, 32),
]
TOKENS = [1, 3, 16, 33, 64, 200]
DTYPES = [torch.float16, torch.bfloat16]

_cache: dict = {}


def _weights(k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0):
    """(qweight, scales, zeros, bias) for a random [n, k] weight, cached per shape."""
    key = (k, n, group, dtype, seed)
    if key not in _cache:
        _cache.clear()
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, generator=g, device="cuda") / k**0.5 + 0.01  # groups not centred on zero
        q, s, z = quantize_int4(w, group, dtype)
        _cache[key] = (q, s, z, torch.randn(n, generator=g, device="cuda").to(dtype))
    return _cache[key]


def _x(shape, dtype, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def _check(out, x, q, s, z, group, b):
    """out against fp64 on the same inputs; torch in out's dtype is the yardstick."""
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], q.shape[0])
    assert not torch.isnan(out).any()
    w = ref.dequantize_int4(q, s, z, group)
    expect = F.linear(x.double(), w.double(), None if b is None else b.double())
    peer = F.linear(x, w.to(x.dtype), b)
    err = (out.double() - expect).abs().max().item()
    peer_err = (peer.double() - expect).abs().max().item()
    assert err <= 2 * peer_err + 1e-6, (err, peer_err)


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_kernel_matches_reference(shape, m, dtype, bias):
    from fastllm.ops import cuda

    k, n, group = shape
    q, s, z, b = _weights(k, n, group, dtype)
    b = b if bias else None
    x = _x((m, k), dtype)
    poison_cuda_allocator()
    _check(cuda.int4_linear(x, q, s, z, group, b), x, q, s, z, group, b)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_group_size(group, m, dtype):
    """Each group size on every token-tile variant (g = 128 has its own when M <= 16)."""
    from fastllm.ops import cuda

    q, s, z, b = _weights(1536, 520, group, dtype)
    x = _x((m, 1536), dtype)
    poison_cuda_allocator()
    _check(cuda.int4_linear(x, q, s, z, group, b), x, q, s, z, group, b)
    _check(cuda.int4_linear(x, q, s, z, group), x, q, s, z, group, None)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16, 33])
@pytest.mark.parametrize("group", [32, 128])
def test_zeros_past_15(group, m, dtype):
    """GPTQ v1 checkpoints repacked by fastllm.quant_formats can hold zero 16, and
    the format allows zeros up to 127: the kernel's magic-number subtraction
    (1024 + zero in fp16, 128 + zero in bf16) must stay exact there, on the
    g128 (M <= 16) and the scaled-pair paths, the dequantizer and the scalar path."""
    from fastllm.ops import cuda, cuda_quant

    q, s, _, b = _weights(1536, 200, group, dtype)
    g = torch.Generator(device="cuda").manual_seed(5)
    z = torch.randint(14, 17, (200, 1536 // group), generator=g, device="cuda").to(torch.uint8)  # 14, 15, 16
    z[::7] = 127
    x = _x((m, 1536), dtype)
    _check(cuda.int4_linear(x, q, s, z, group, b), x, q, s, z, group, b)
    assert torch.equal(cuda_quant.int4_dequantize(q, s, z, group), ref.dequantize_int4(q, s, z, group).to(dtype))
    odd = _x((1 + m * 1536,), dtype)[1:].view(m, 1536)  # unaligned x: the scalar path
    odd.copy_(x)
    _check(cuda.int4_linear(odd, q, s, z, group, b), odd, q, s, z, group, b)


@requires_cuda
@pytest.mark.parametrize("k", [32, 96, 160, 288])
def test_k_not_a_multiple_of_the_tile(k):
    """K only a multiple of the group: partial K tiles and partial 128-column k-blocks."""
    from fastllm.ops import cuda

    for m in (1, 12, 40):
        q, s, z, b = _weights(k, 70, 32, torch.bfloat16)
        x = _x((m, k), torch.bfloat16)
        _check(cuda.int4_linear(x, q, s, z, 32, b), x, q, s, z, 32, b)


@requires_cuda
@pytest.mark.parametrize("m", [65, 130, 200])
def test_fused_kernel_past_64_tokens(m):
    """The wrapper dequantizes + cuBLAS there; the fused kernel itself loops 64-token blocks."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(1024, 777, 64, torch.float16)
    x = _x((m, 1024), torch.float16)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, 64, b), x, q, s, z, 64, b)


@requires_cuda
@pytest.mark.parametrize("splits", [2, 3, 16])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_split_k(m, splits):
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(4096, 1000, 128, torch.bfloat16)
    x = _x((m, 4096), torch.bfloat16)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, 128, b, splits=splits), x, q, s, z, 128, b)
    _check(cuda_quant._int4_fused(x, q, s, z, 128, None, splits=splits), x, q, s, z, 128, None)


@requires_cuda
def test_misaligned_leading_dims_and_empty():
    from fastllm.ops import cuda

    q, s, z, b = _weights(256, 300, 64, torch.float16)
    base = _x((1 + 5 * 256,), torch.float16)
    odd = base[1:].view(5, 256)  # contiguous, 2 bytes off 16-byte alignment: the scalar path
    assert odd.data_ptr() % 16
    _check(cuda.int4_linear(odd, q, s, z, 64, b), odd, q, s, z, 64, b)
    x = _x((2, 3, 256), torch.float16)
    out = cuda.int4_linear(x, q, s, z, 64, b)
    assert out.shape == (2, 3, 300)
    _check(out, x, q, s, z, 64, b)
    assert cuda.int4_linear(x[:0], q, s, z, 64).shape == (0, 3, 300)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_matches_torch_cast(group, dtype):
    from fastllm.ops import cuda_quant

    q, s, z, _ = _weights(2048, 129, group, dtype)
    expect = ref.dequantize_int4(q, s, z, group).to(dtype)
    assert torch.equal(cuda_quant.int4_dequantize(q, s, z, group), expect)
    qo = torch.empty(q.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(q)  # unaligned: scalar path
    qo.copy_(q)
    assert torch.equal(cuda_quant.int4_dequantize(qo, s, z, group), expect)


@requires_cuda
def test_bad_input():
    from fastllm.ops import cuda

    q, s, z, b = _weights(128, 32, 64, torch.float16)
    x = _x((4, 128), torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        cuda.int4_linear(x.float(), q, s, z, 64)
    with pytest.raises(ValueError, match="CUDA"):
        cuda.int4_linear(x.cpu(), q, s, z, 64)
    with pytest.raises(ValueError, match="contiguous"):
        cuda.int4_linear(_x((128, 4), torch.float16).t(), q, s, z, 64)
    with pytest.raises(ValueError, match="group_size"):
        cuda.int4_linear(x, q, s, z, 16)
    with pytest.raises(ValueError, match="group_size"):
        cuda.int4_linear(x, q, s, z, 256)
    with pytest.raises(ValueError, match="qweight"):
        cuda.int4_linear(_x((4, 64), torch.float16), q, s, z, 64)
    with pytest.raises(TypeError, match="qweight"):
        cuda.int4_linear(x, q.to(torch.int8), s, z, 64)
    with pytest.raises(TypeError, match="scales"):
        cuda.int4_linear(x, q, s.bfloat16(), z, 64)
    with pytest.raises(ValueError, match="scales"):
        cuda.int4_linear(x, q, s[:, :1].contiguous(), z, 64)
    with pytest.raises(ValueError, match="zeros"):
        cuda.int4_linear(x, q, s, z[:16], 64)
    with pytest.raises(TypeError, match="zeros"):
        cuda.int4_linear(x, q, s, z.to(torch.int32), 64)
    with pytest.raises(ValueError, match="must be on"):
        cuda.int4_linear(x, q, s.cpu(), z, 64)
    with pytest.raises(ValueError, match="bias"):
        cuda.int4_linear(x, q, s, z, 64, b[:3])
    with pytest.raises(ValueError, match="contiguous"):
        cuda.int4_linear(x, q, s, z, 64, torch.randn(64, device="cuda", dtype=torch.float16)[::2])


@requires_cuda
@pytest.mark.parametrize("variant", [1, 5, -1])
def test_unknown_variant_is_rejected(variant):
    """Variants are 0, 2, 3 and 4: 1 (an 8-stage pipeline at M <= 8) was removed."""
    from fastllm.ops import cuda_quant

    q, s, z, _ = _weights(512, 256, 128, torch.bfloat16)
    x = _x((1, 512), torch.bfloat16)
    with pytest.raises(ValueError, match=r"_variant must be 0 \(default\), 2 \(wgmma\), 3 or 4 \(wide\)"):
        cuda_quant._int4_fused(x, q, s, z, 128, _variant=variant)


def test_variants_are_discoverable():
    """bench/sweep.py finds the variants, 0, 2, 3 and 4, in the wrapper's
    literal ``_variant not in (...)`` check."""
    import inspect
    import re

    from fastllm.ops import cuda_quant

    m = re.search(r"_variant not in \(([\d,\s]+)\)", inspect.getsource(cuda_quant._int4_fused))
    assert m and [int(v) for v in m.group(1).replace(",", " ").split()] == [0, 2, 3, 4]


def test_sweep_times_a_variant_only_where_it_has_a_kernel(monkeypatch):
    """bench/sweep.py skips the settings where a variant is variant 0 (2 outside
    M 9..64, 3 and 4 above M = 16), so its time goes to the kernels that differ."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "sweep.py"
    spec = importlib.util.spec_from_file_location("fastllm_bench_sweep_int4", path)
    sweep = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, sweep)  # dataclasses look their module up
    spec.loader.exec_module(sweep)
    settings = [s for s in sweep.enumerate_settings(["int4"], True, {"int4": [0, 2, 3, 4]}) if not s.peer]
    tokens = {v: {s.knobs["m"] for s in settings if s.knobs["variant"] == v} for v in (0, 2, 3, 4)}
    assert tokens == {0: {1, 16, 32, 64}, 2: {16, 32, 64}, 3: {1, 16}, 4: {1, 16}}


# --------------------------------------------------------------------------- #
# The variants, held to the reference (their fp32 sums run in another order
# than variant 0's):
# - 2 (int4_linear_wgmma, the default at M 17..64): the warpgroup-MMA kernel
#   at M 9..64 on an sm_90 GPU with the 90a build (variant 0 elsewhere);
# - 3 and 4 (int4_linear_wide, opt-in, not yet run on a GPU): the wide tiles,
#   twice variant 0's warps per SM: at M <= 8 32 weight rows and 4 warp groups
#   along K per CTA (K tiles of 512), at M 9..16 64 rows, 16 per warp, and 2
#   warp groups; one (3) or two (4) mma chains per warp; variant 0 above 16.
# --------------------------------------------------------------------------- #
WGMMA_TOKENS = [9, 16, 32, 33, 64]
WIDE = [3, 4]


def _variant_tokens(wgmma, wide) -> list[tuple[int, int]]:
    """(variant, M) pairs: variant 2 at the M in ``wgmma``, 3 and 4 at those in ``wide``."""
    return [(2, m) for m in wgmma] + [(v, m) for v in WIDE for m in wide]


def _wgmma_runs() -> bool:
    """Whether variant 2 runs the wgmma kernel here (else it is variant 0)."""
    return torch.cuda.get_device_capability() == (9, 0) and "90a" in backend._C.cuda_archs()


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant, m", _variant_tokens(WGMMA_TOKENS, [1, 3, 5, 8, 9, 16]))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_variant_matches_reference(shape, variant, m, dtype, bias):
    from fastllm.ops import cuda_quant

    k, n, group = shape
    q, s, z, b = _weights(k, n, group, dtype)
    b = b if bias else None
    x = _x((m, k), dtype)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, group, b, _variant=variant), x, q, s, z, group, b)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant, m", _variant_tokens([9, 16, 17, 33, 48, 49, 64], [1, 4, 7, 8, 9, 12, 15, 16]))
@pytest.mark.parametrize("group", [32, 64, 128])
def test_variant_every_group_size(group, variant, m, dtype):
    """Every group size (g = 128 scales once per k-block on the wide tiles, the
    others per pair) on every padded token count of the wgmma kernel (16, 32,
    48, 64) and its edges, and on token counts that leave the x rows of a
    thread of the wide tiles partly copied (rows r and r + 4, or r + 8 at M > 8,
    of its compact x copies)."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(1536, 520, group, dtype)
    x = _x((m, 1536), dtype)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, group, b, _variant=variant), x, q, s, z, group, b)
    _check(cuda_quant._int4_fused(x, q, s, z, group, _variant=variant), x, q, s, z, group, None)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("variant, m", _variant_tokens([9, 33, 64], [1, 8, 16]))
def test_variant_split_k(variant, m, splits, dtype):
    """Forced split counts (uneven K shares; 16 on the 32 K tiles of the wgmma
    kernel, clamped to the 8 K tiles of 512 of the wide M <= 8 tile), into
    poisoned workspaces and outputs, with and without a bias."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(4096, 1000, 128, dtype)
    x = _x((m, 4096), dtype)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, 128, b, splits=splits, _variant=variant), x, q, s, z, 128, b)
    poison_cuda_allocator()
    _check(cuda_quant._int4_fused(x, q, s, z, 128, None, splits=splits, _variant=variant), x, q, s, z, 128, None)


@requires_cuda
@pytest.mark.parametrize("k", [32, 96, 160, 288, 544, 1056])
@pytest.mark.parametrize("variant, m", _variant_tokens([12, 40], [1, 6, 13]))
def test_variant_k_not_a_multiple_of_the_tile(k, variant, m):
    """K only a multiple of the group: a partial last K tile (zero-filled x and
    weights, zero scales), k-blocks of a warp group past K, partial 128-column
    k-blocks."""
    from fastllm.ops import cuda_quant

    for dtype in DTYPES:
        q, s, z, b = _weights(k, 70, 32, dtype)
        x = _x((m, k), dtype)
        _check(cuda_quant._int4_fused(x, q, s, z, 32, b, _variant=variant), x, q, s, z, 32, b)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant, m", _variant_tokens([16, 33], [3, 11]))
@pytest.mark.parametrize("group", [32, 128])
def test_variant_zeros_past_15(group, variant, m, dtype):
    """Zeros up to 127 (the format's range): the magic-number subtraction stays exact."""
    from fastllm.ops import cuda_quant

    q, s, _, b = _weights(1536, 200, group, dtype)
    g = torch.Generator(device="cuda").manual_seed(5)
    z = torch.randint(14, 17, (200, 1536 // group), generator=g, device="cuda").to(torch.uint8)
    z[::7] = 127
    x = _x((m, 1536), dtype)
    _check(cuda_quant._int4_fused(x, q, s, z, group, b, _variant=variant), x, q, s, z, group, b)


@requires_cuda
@pytest.mark.parametrize("variant, m", _variant_tokens([1, 5, 8, 65, 100], [17, 33, 65]))
def test_variant_outside_its_tokens_is_variant_0(variant, m):
    """Below 9 and above 64 tokens variant 2 is variant 0, bit for bit (plan
    and kernel); so are 3 and 4 above 16."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(2048, 777, 64, torch.bfloat16)
    x = _x((m, 2048), torch.bfloat16)
    for splits in (0, 1, 3):
        want = cuda_quant._int4_fused(x, q, s, z, 64, b, splits=splits, _variant=0)
        got = cuda_quant._int4_fused(x, q, s, z, 64, b, splits=splits, _variant=variant)
        assert torch.equal(got, want), splits


@requires_cuda
def test_wgmma_path_runs_where_it_should():
    """On an sm_90 GPU with the 90a build variant 2 runs its own kernel: its
    results are not variant 0's bits (another summation order) but as close to
    the reference; elsewhere it is variant 0 exactly."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(4096, 4096, 128, torch.bfloat16)
    x = _x((16, 4096), torch.bfloat16)
    v0 = cuda_quant._int4_fused(x, q, s, z, 128, b, _variant=0)
    v2 = cuda_quant._int4_fused(x, q, s, z, 128, b, _variant=2)
    _check(v2, x, q, s, z, 128, b)
    assert torch.equal(v2, v0) != _wgmma_runs()


@requires_cuda
@pytest.mark.parametrize("variant, m", [(2, 16), (3, 1), (4, 1)])
def test_variant_under_cuda_graph(variant, m):
    """The wgmma kernel (8 CTAs at M = 16) and the wide tiles (32 CTAs at
    M = 1): split-K and its reduction are captured too."""
    from fastllm.ops import cuda_quant

    q, s, z, b = _weights(4096, 1024, 128, torch.bfloat16)
    x = _x((m, 4096), torch.bfloat16)
    run = lambda: cuda_quant._int4_fused(x, q, s, z, 128, b, _variant=variant)  # noqa: E731
    assert cuda_quant._int4_plan(m, 1024, 4096, 128, cuda_quant._num_sms(0), 0, variant)[0] > 1
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, run())
    assert not torch.equal(y, eager)


@requires_cuda
def test_the_variant_each_token_count_gets(monkeypatch):
    """The wgmma kernel is the default from 17 tokens; the wide tiles are the
    choice up to 16 only when opted in (not verified on a GPU yet)."""
    from fastllm import ops

    q, s, z, _ = _weights(512, 256, 128, torch.bfloat16)
    variants = spy_variants(monkeypatch, "int4_linear", -1)
    for setting, m, want in (
        ("", 16, 0),  # a tie at M = 16 on an H200: the default stays variant 0
        ("", 17, 2),
        ("", 64, 2),
        ("", 8, 0),
        ("", 1, 0),
        ("int4_linear_wide", 1, 3),
        ("int4_linear_wide", 8, 3),
        ("int4_linear_wide", 16, 3),
        ("int4_linear_wide", 17, 2),
        ("", 16, 0),  # opted out again
    ):
        monkeypatch.setenv("FASTLLM_KERNELS", setting)
        backend.reset_settings()
        ops.int4_linear(_x((m, 512), torch.bfloat16), q, s, z, 128)
        assert variants[-1] == want, (setting, m)


@requires_cuda
def test_under_cuda_graph():
    from fastllm.ops import cuda

    q, s, z, b = _weights(4096, 1024, 128, torch.bfloat16)
    x = _x((1, 4096), torch.bfloat16)  # 16 CTAs: split-K and its reduction are captured too
    eager = cuda.int4_linear(x, q, s, z, 128, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.int4_linear(x, q, s, z, 128, b)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda.int4_linear(x, q, s, z, 128, b)
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, cuda.int4_linear(x, q, s, z, 128, b))
    assert not torch.equal(y, eager)


@requires_cuda
def test_op_table_uses_kernel_when_enabled(monkeypatch):
    from fastllm import ops

    q, s, z, b = _weights(256, 64, 32, torch.float16)
    x = _x((5, 256), torch.float16)
    calls = []
    monkeypatch.setenv("FASTLLM_KERNELS", "int4_linear")
    backend.reset_settings()
    real = backend._C.int4_linear
    monkeypatch.setattr(backend._C, "int4_linear", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    _check(ops.int4_linear(x, q, s, z, 32, b), x, q, s, z, 32, b)
    assert len(calls) == 1
    ops.int4_linear(x, q, s.float(), z, 32)  # fp32 scales: the reference, not the kernel
    assert len(calls) == 1


@requires_cuda
@pytest.mark.parametrize("quantization", ["int4-g32", "int8"])
def test_quantized_model_with_kernels_matches_reference_path(tmp_path, monkeypatch, only_named_kernels, quantization):
    from checkpoints import make_checkpoint
    from fastllm import Model

    make_checkpoint(tmp_path, "qwen2", intermediate_size=128)  # q/k/v biases
    ids = torch.randint(3, 384, (2, 13), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    logits = {}
    for kernels in (False, True):
        monkeypatch.setenv("FASTLLM_KERNELS", "int8_linear,int4_linear" if kernels else "")
        backend.reset_settings()
        model = Model.from_pretrained(tmp_path, device="cuda", dtype="bfloat16", quantization=quantization)
        calls = []
        op = quantization[:4] + "_linear"
        real = getattr(backend._C, op)
        monkeypatch.setattr(backend._C, op, lambda *a, real=real: (calls.append(1), real(*a))[1], raising=False)
        logits[kernels] = model.forward(ids).float()
        decode = model.forward(ids[:, :1]).float()  # one token per sequence: the decode shape
        monkeypatch.setattr(backend._C, op, real, raising=False)
        assert bool(calls) == kernels
        assert not torch.isnan(decode).any()
    rel = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    assert rel < 2e-2, rel


# --------------------------------------------------------------------------- #
# Host-side pieces (no GPU needed)
# --------------------------------------------------------------------------- #
def test_supported_predicate():
    from fastllm.ops.cuda_quant import int4_linear_supported as supported

    q, z = torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 2, dtype=torch.uint8)
    for dtype in DTYPES:
        x, s = torch.zeros(3, 64, dtype=dtype), torch.ones(8, 2, dtype=dtype)
        assert supported(x, q, s, z, 32) and supported(x, q, s, z, 32, torch.zeros(8, dtype=dtype))
        assert not supported(x, q, s, z, 32, torch.zeros(8))  # fp32 bias: the reference
        assert not supported(x, q, s.float(), z, 32)  # scales in another dtype
    assert not supported(torch.zeros(3, 64), q, torch.ones(8, 2), z, 32)  # fp32 activations
    assert not supported(torch.zeros(64, 3, dtype=torch.float16).t(), q, torch.ones(8, 2, dtype=torch.float16), z, 32)
    assert supported(torch.zeros(3, 64, dtype=torch.float16), q, None, z, 32)  # malformed: the wrapper reports it


@pytest.mark.skipif(not backend.HAS_C, reason="needs fastllm's compiled extension")
def test_plan():
    plan = backend._C.int4_linear_plan
    assert plan(1, 14336, 4096, 128, 132, 0) == (1, 0)  # 224 CTAs of one token tile: weight streaming, no split
    splits, ws = plan(1, 4096, 14336, 128, 132, 0)  # 64 CTAs: split K
    assert 2 <= splits <= 16 and ws == splits * 4096 and 64 * splits >= 132
    if hopper_shared_memory():  # 4 CTAs of 48 KB fit an SM: the split the H200 sweep found best
        assert splits == 8
        assert plan(16, 14336, 4096, 128, 132, 0) == (2, 2 * 16 * 14336)  # 112 CTAs of 96 KB, 2 per SM
        assert plan(16, 4096, 14336, 128, 132, 0)[0] == 8  # 32 CTAs
    for variant in (1, 5, -1):  # variants 0, 2, 3 and 4 only (1, the 8-stage pipeline, was removed)
        with pytest.raises(RuntimeError, match=r"variant must be 0 \(default\), 2 .* 3 or 4"):
            plan(1, 10, 64, 32, 132, 0, variant)
    for variant in (3, 4):  # the wide tiles: M <= 8 32 rows, K tiles of 512, 4 CTAs per SM; M <= 16 64, 256, 3
        assert plan(1, 14336, 4096, 128, 132, 0, variant) == (1, 0)  # 448 CTAs: every SM has some
        assert plan(8, 4096, 14336, 128, 132, 0, variant) == (4, 4 * 8 * 4096)  # 128 CTAs: 4 splits fill 132 SMs
        assert plan(1, 100, 1024, 32, 132, 16, variant)[0] == 2  # clamped to its two K tiles (variant 0: 4)
        assert plan(1, 8000, 1024, 32, 132, 0, variant) == (1, 0)  # 250 CTAs
        assert plan(1, 64, 512, 32, 132, 0, variant) == (1, 0)  # one K tile: nothing to split
        assert plan(16, 14336, 4096, 128, 132, 0, variant) == (1, 0)  # 224 CTAs
        assert plan(9, 4096, 14336, 128, 132, 0, variant) == (6, 6 * 9 * 4096)  # 64 CTAs, 3 per SM: 6 splits
        for m in (17, 33, 64, 65):  # variant 0's plan above 16 tokens
            for requested in (0, 3):
                assert plan(m, 4864, 896, 128, 132, requested, variant) == plan(m, 4864, 896, 128, 132, requested)
    assert plan(1, 100, 1024, 32, 132, 16)[0] == 4
    # The launch counts the same K tiles as the plan (checked before anything
    # touches the device, so fake aligned pointers do): 3 splits of K = 1024
    # are too many for the wide tile's two K tiles, 5 for variant 0's four.
    launch = backend._C.int4_linear
    for variant, splits in ((3, 3), (4, 3), (0, 5)):
        with pytest.raises(RuntimeError, match=r"num_splits must be in \[1, min\(16, K tiles\)\]"):
            launch(256, 256, 256, 256, 256, 256, 0, 1, 100, 1024, 32, splits, 2, 0, variant)
    assert plan(7, 1000, 4096, 64, 132, 3) == (3, 3 * 7 * 1000)
    assert plan(1, 100, 128, 32, 132, 16)[0] == 1  # clamped to the one K tile
    for m in (1, 8, 9, 16, 17, 33, 64, 65, 1000):
        splits, ws = plan(m, 896, 896, 128, 132, 0)
        assert splits >= 1 and ws == (splits * m * 896 if splits > 1 else 0)
    for m in (1, 8, 9, 16, 33, 64, 65):  # variant 2: a valid plan at every M (variant 0's where it falls back)
        for requested in (0, 3):
            splits, ws = plan(m, 4864, 896, 128, 132, requested, 2)
            assert 1 <= splits <= 7 and ws == (splits * m * 4864 if splits > 1 else 0)
    if not torch.cuda.is_available():  # no device: variant 2 is variant 0 everywhere
        for m in (9, 16, 64):
            assert plan(m, 14336, 4096, 128, 132, 0, 2) == plan(m, 14336, 4096, 128, 132, 0)
    with pytest.raises(RuntimeError, match="group_size"):
        plan(1, 10, 64, 48, 132, 0)
    with pytest.raises(RuntimeError, match="multiple"):
        plan(1, 10, 96, 64, 132, 0)
