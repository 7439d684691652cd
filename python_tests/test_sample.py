"""The CUDA sampler (csrc/sample.cu) against the reference sampler.

Support: every draw lies inside ``reference.sampling_mask``'s support.
Frequencies: chi-square of many seeded draws against the exact renormalised
distribution. Plus exact argmax, ties at the boundary, seeds, the group
(cluster) size and shared-memory cache not changing a single draw, bad rows,
CUDA graphs. The Philox generator is checked on the CPU: the Python reference
against Random123's known answers, and csrc/philox.cuh compiled for the host
against the Python reference.

Variant 1 of the kernel (``_variant=1``, csrc/sample_v1.cuh) is the same
algorithm rescheduled, so its tokens must equal variant 0's bit for bit on
every input; the argmax kernel (``cuda_sample.argmax``) must equal the
reference at temperature 0, status codes included.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import requires_cuda, spy_variants
from fastllm import backend, sampling
from fastllm.config import GenerationConfig
from fastllm.ops import cuda_sample
from fastllm.ops import reference as ref

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# Philox (CPU)
# --------------------------------------------------------------------------- #
def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    assert ref.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert ref.philox4x32_10((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    pi = ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))
    assert ref.philox4x32_10(*pi) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_philox_uniform_is_uniform_and_keyed():
    u = np.array([ref.philox_uniform(3, i) for i in range(4000)])
    assert ((u >= 0) & (u < 1)).all()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert ref.philox_uniform(3, 0) != ref.philox_uniform(4, 0)
    assert ref.philox_uniform(-1, 5) == ref.philox_uniform(2**64 - 1, 5)  # taken modulo 2**64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile csrc/philox.cuh for the host")
def test_philox_header_matches_reference(tmp_path):
    src = tmp_path / "philox_host.cu"
    src.write_text(
        '#include <cstdio>\n#include "philox.cuh"\n'
        "int main() {\n"
        "  const unsigned long long seeds[] = {0ull, 1ull, 0xFFFFFFFFFFFFFFFFull, 1234567890123ull};\n"
        "  const unsigned long long offs[] = {0ull, 7ull, 0x100000000ull, 0xFFFFFFFFFFFFFFFFull};\n"
        "  for (auto s : seeds) for (auto o : offs)\n"
        '    std::printf("%llu %llu %llu\\n", s, o, (unsigned long long)fastllm::philox_u64(s, o, 0x73616d70u));\n'
        "}\n"
    )
    exe = tmp_path / "philox_host"
    subprocess.run(["nvcc", "-std=c++17", f"-I{REPO / 'csrc'}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, timeout=600)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    rows = [tuple(int(v) for v in line.split()) for line in lines if line.strip()]
    assert len(rows) == 16
    for seed, offset, bits in rows:
        assert bits == ref.philox_u64(seed, offset), (seed, offset)


# --------------------------------------------------------------------------- #
# CUDA kernel
# --------------------------------------------------------------------------- #
def _params(b: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, device="cuda"):
    return dict(
        temperature=torch.full((b,), float(temperature), device=device),
        top_k=torch.full((b,), int(top_k), dtype=torch.int32, device=device),
        top_p=torch.full((b,), float(top_p), device=device),
        min_p=torch.full((b,), float(min_p), device=device),
    )


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
    dict(temperature=0.5, top_k=1),
]


def _ids(setting):
    return ",".join(f"{k}={v}" for k, v in setting.items())


VARIANTS = [0, 1]


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
def test_frequencies_match_exact_distribution(setting, dtype, variant):
    from fastllm.ops import cuda

    vocab, draws = 40, 20000
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5).to(dtype)
    keep, p = ref.sampling_mask(logits.float(), **_params(1, device="cpu", **setting))
    keep, p = keep[0].numpy(), p[0].double().numpy()
    batch = logits.cuda().expand(draws, vocab).contiguous()
    tokens = cuda.sample(batch, **_params(draws, **setting), seeds=[11] * draws, offsets=list(range(draws)),
                         _variant=variant)
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    assert counts[~keep].sum() == 0, "sampled outside the allowed support"
    if keep.sum() > 1:  # one kept token (top_k=1): chi-square has no degree of freedom (p-value NaN)
        assert stats.chisquare(counts[keep], p[keep] / p[keep].sum() * draws).pvalue > 1e-3


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32000, 50257, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_support_large_vocab(vocab, dtype, variant):
    """Every draw is inside the reference's support, for many rows and settings."""
    from fastllm.ops import cuda

    rows = 24
    g = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 4).to(dtype)
    temperature = torch.rand(rows, generator=g, device="cuda") * 1.5 + 0.1
    top_k = torch.randint(0, 64, (rows,), generator=g, device="cuda", dtype=torch.int32)
    top_p = torch.rand(rows, generator=g, device="cuda") * 0.9 + 0.1
    min_p = torch.rand(rows, generator=g, device="cuda") * 0.3
    top_p[::3] = 1.0
    min_p[::2] = 0.0
    keep, _ = ref.sampling_mask(logits, temperature, top_k, top_p, min_p)
    for offset in range(8):
        tok = cuda.sample(logits, temperature, top_k, top_p, min_p, seeds=list(range(rows)), offsets=[offset] * rows,
                          _variant=variant)
        assert tok.dtype == torch.int64 and tok.shape == (rows,)
        assert ((tok >= 0) & (tok < vocab)).all()
        assert keep.gather(1, tok[:, None]).all(), "a draw outside the support"


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [5, 1001, 128256])
def test_greedy_is_exact_argmax(vocab, dtype, variant):
    from fastllm.ops import cuda

    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(33, vocab, generator=g, device="cuda").to(dtype)
    logits[3] = 1.0  # every token tied: the lowest id
    logits[4, vocab // 2 :] = 100.0  # ties in the upper half
    logits[5, -1] = float("inf")
    tok = cuda.sample(logits, **_params(33, temperature=0.0), seeds=[0] * 33, offsets=[0] * 33, _variant=variant)
    assert torch.equal(tok, torch.argmax(logits.float(), dim=-1))


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_ties_at_boundary_are_all_kept_and_equally_likely(variant):
    from fastllm.ops import cuda

    draws = 20000
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -5.0]], device="cuda").expand(draws, 6).contiguous()
    tok = cuda.sample(logits, **_params(draws, top_k=2), seeds=[5] * draws, offsets=list(range(draws)),
                      _variant=variant)
    counts = np.bincount(tok.cpu().numpy(), minlength=6)
    assert counts[4:].sum() == 0 and (counts[:4] > 0).all()
    assert stats.chisquare(counts[1:4]).pvalue > 1e-3
    # top-p: probs 0.4, 0.2, 0.2, 0.2. These logits give the kernel q = 1, 0.5, 0.5, 0.5
    # exactly (fl32(-fl32(ln 2) * fl32(log2 e)) == -1, so __expf returns 0.5). With
    # top_p 0.5 the mass above each 0.2 is 0.4 < 0.5: all kept. With top_p 0.4 the
    # mass above is 0.4 and top_p is 0.4f = 0.4 + 6e-9: the reference's fp32
    # probabilities round 0.4 to 0.4f, so only token 0 is kept (the kernel compares
    # at fp32 resolution; an exact comparison would keep all four).
    y = -float(np.float32(np.log(2.0)))
    logits = torch.tensor([[0.0, y, y, y]], device="cuda").expand(draws, 4).contiguous()
    for top_p, support in ((0.5, {0, 1, 2, 3}), (0.4, {0}), (0.45, {0, 1, 2, 3})):
        keep, _ = ref.sampling_mask(logits[:1].cpu(), **_params(1, top_p=top_p, device="cpu"))
        assert set(keep[0].nonzero().flatten().tolist()) == support, top_p  # the reference agrees
        tok = cuda.sample(logits, **_params(draws, top_p=top_p), seeds=[6] * draws, offsets=list(range(draws)),
                          _variant=variant)
        assert set(tok.tolist()) == support, top_p


@requires_cuda
@pytest.mark.parametrize("vocab", [3000, 128256, 262144])
def test_group_size_and_cache_do_not_change_a_draw(vocab):
    """Masses are fixed point, so the token is a function of (logits, params,
    seed, offset) alone: every group size and shared-memory cache size (which
    moves part of the row to the global-memory path) and both kernel variants
    give the same draws."""
    from fastllm.ops import cuda

    rows = 6
    g = torch.Generator(device="cuda").manual_seed(2)
    logits = torch.randn(rows, vocab, generator=g, device="cuda", dtype=torch.float32) * 3
    params = dict(
        temperature=torch.tensor([1.0, 0.8, 1.2, 1.0, 0.6, 2.0], device="cuda"),
        top_k=torch.tensor([0, 50, 0, 1000, 0, 7], dtype=torch.int32, device="cuda"),
        top_p=torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.95], device="cuda"),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.0], device="cuda"),
    )
    major = torch.cuda.get_device_capability()[0]
    groups = [1, 2, 4, 8, 16] if major >= 9 else [1]
    results = []
    for offset in range(4):
        base = None
        for group, cache, variant in [(gr, c, v) for gr in [0, *groups] for c in (None, 1024) for v in VARIANTS]:
            try:
                tok = cuda.sample(logits, **params, seeds=[9] * rows, offsets=[offset] * rows, _group=group,
                                  _cache_limit=cache, _variant=variant)
            except RuntimeError as e:  # a cluster of 16 may not fit some GPUs
                assert "does not fit" in str(e)
                continue
            base = tok if base is None else base
            assert torch.equal(tok, base), (group, cache, variant, tok.tolist(), base.tolist())
        results.append(base)
    assert len({tuple(r.tolist()) for r in results}) > 1  # offsets change the draws


@requires_cuda
def test_draws_agree_with_reference_random_numbers():
    """Same Philox numbers as the reference: draws agree except where a CDF
    boundary falls between the kernel's and torch's rounding (rare)."""
    from fastllm.ops import cuda

    rows, vocab = 512, 300
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, vocab, generator=g) * 2
    params = _params(rows, temperature=0.9, top_k=40, top_p=0.9, device="cpu")
    seeds, offsets = list(range(rows)), [3] * rows
    want = ref.sample(logits, **params, seeds=seeds, offsets=offsets)
    got = cuda.sample(logits.cuda(), **{k: v.cuda() for k, v in params.items()}, seeds=seeds, offsets=offsets)
    assert (got.cpu() == want).float().mean() >= 0.99


@requires_cuda
def test_row_independent_of_batch():
    from fastllm.ops import cuda

    g = torch.Generator(device="cuda").manual_seed(8)
    logits = torch.randn(9, 5000, generator=g, device="cuda")
    p = _params(9, temperature=1.1, top_p=0.95)
    all_rows = cuda.sample(logits, **p, seeds=list(range(9)), offsets=[4] * 9)
    one = cuda.sample(logits[5:6].contiguous(), **_params(1, temperature=1.1, top_p=0.95), seeds=[5], offsets=[4])
    assert all_rows[5] == one[0]
    again = cuda.sample(logits, **p, seeds=torch.arange(9, device="cuda"), offsets=torch.full((9,), 4))
    assert torch.equal(all_rows, again)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_infinite_logits_share_the_mass(variant):
    from fastllm.ops import cuda

    row = torch.tensor([0.0, float("inf"), 3.0, float("inf"), float("-inf")], device="cuda")
    tok = cuda.sample(row.expand(400, 5).contiguous(), **_params(400), seeds=[1] * 400, offsets=list(range(400)),
                      _variant=variant)
    assert set(tok.tolist()) == {1, 3}
    some_neg_inf = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0]] * 200, device="cuda")
    tok = cuda.sample(some_neg_inf, **_params(200), seeds=[2] * 200, offsets=list(range(200)), _variant=variant)
    assert set(tok.tolist()) <= {1, 3}


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_rows_and_parameters(variant):
    from fastllm.ops import cuda

    p = _params(2)
    v = dict(_variant=variant)
    with pytest.raises(ValueError, match="NaN"):
        cuda.sample(torch.tensor([[0.0, float("nan")], [0.0, 1.0]], device="cuda"), **p, seeds=[0, 0], offsets=[0, 0],
                    **v)
    with pytest.raises(ValueError, match="-inf"):
        cuda.sample(torch.full((2, 3), float("-inf"), device="cuda"), **p, seeds=[0, 0], offsets=[0, 0], **v)
    logits = torch.randn(2, 10, device="cuda")
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(top_k=-2)):
        with pytest.raises(ValueError, match="out of range"):
            cuda.sample(logits, **_params(2, **bad), seeds=[0, 0], offsets=[0, 0], **v)
    unchecked = cuda.sample(logits, **_params(2, top_p=0.0), seeds=[0, 0], offsets=[0, 0], check=False, **v)
    assert unchecked.tolist() == [-3, -3]
    with pytest.raises(TypeError, match="dtype"):
        cuda.sample(logits.double(), **p, seeds=[0, 0], offsets=[0, 0])
    with pytest.raises(ValueError, match="CUDA"):
        cuda.sample(logits.cpu(), **p, seeds=[0, 0], offsets=[0, 0])
    with pytest.raises(ValueError, match="shape"):
        cuda.sample(logits, **_params(3), seeds=[0, 0], offsets=[0, 0])
    with pytest.raises(ValueError, match="entries"):
        cuda.sample(logits, **p, seeds=[0], offsets=[0, 0])
    with pytest.raises(ValueError, match="contiguous"):
        cuda.sample(torch.randn(10, 2, device="cuda").t(), **p, seeds=[0, 0], offsets=[0, 0])
    assert cuda.sample(logits[:0], **_params(0), seeds=[], offsets=[]).shape == (0,)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_under_cuda_graph(variant):
    from fastllm.ops import cuda

    rows, vocab = 8, 32000
    logits = torch.randn(rows, vocab, device="cuda")
    p = dict(_params(rows, temperature=0.8, top_k=50, top_p=0.9), _variant=variant)
    seeds = torch.arange(rows, device="cuda")
    offsets = torch.zeros(rows, dtype=torch.int64, device="cuda")
    eager = cuda.sample(logits, **p, seeds=seeds, offsets=offsets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.sample(logits, **p, seeds=seeds, offsets=offsets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda.sample(logits, **p, seeds=seeds, offsets=offsets)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    offsets.fill_(5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cuda.sample(logits, **p, seeds=seeds, offsets=offsets))


@requires_cuda
def test_op_table_uses_kernel_when_enabled(monkeypatch):
    from fastllm import backend, ops

    logits = torch.randn(2, 100, device="cuda")
    calls = []
    monkeypatch.setenv("FASTLLM_KERNELS", "sample")
    backend.reset_settings()
    real = backend._C.sample
    monkeypatch.setattr(backend._C, "sample", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    ops.sample(logits, **_params(2), seeds=[0, 1], offsets=[0, 0])
    assert calls


# --------------------------------------------------------------------------- #
# Variant 1 (csrc/sample_v1.cuh): the same tokens as variant 0, bit for bit
# --------------------------------------------------------------------------- #
def _bench_module(monkeypatch, name: str):
    spec = importlib.util.spec_from_file_location(f"fastllm_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_variant_values_for_the_sweep(monkeypatch):
    """bench/sweep.py reads the variants from the wrapper's literal ``_variant
    not in (...)`` check; they are 0 and 1, and its sample settings cover both
    and the argmax kernel."""
    m = re.search(r"_variant not in \(([\d,\s]+)\)", inspect.getsource(cuda_sample.sample))
    assert m and [int(v) for v in m.group(1).replace(",", " ").split()] == [0, 1]
    sweep = _bench_module(monkeypatch, "sweep")
    assert sweep.kernel_variants("sample") == (0, 1)
    settings = sweep.enumerate_settings(["sample"], False, {"sample": [0, 1]})
    assert {s.knobs.get("variant") for s in settings if not s.peer and "argmax" not in s.knobs} == {0, 1}
    assert {s.case for s in settings if s.knobs.get("argmax")} == {f"greedy B={b}" for b in sweep.SAMPLE_BATCHES}


def test_profile_cases_for_the_variant_and_argmax(monkeypatch):
    prof = _bench_module(monkeypatch, "profile_kernels")
    assert prof.parse_case("sample_topp_B32_v1") == dict(name="sample_topp_B32_v1", kind="sample", mode="topp", b=32,
                                                         variant=1)
    assert prof.parse_case("sample_argmax_B256_g2") == dict(name="sample_argmax_B256_g2", kind="sample",
                                                            mode="argmax", b=256, group=2)


def test_bad_variant_is_rejected_first():
    logits = torch.zeros(2, 5)  # on the CPU: the variant check comes before the device check
    p = _params(2, device="cpu")
    with pytest.raises(ValueError, match="_variant must be 0"):
        cuda_sample.sample(logits, **p, seeds=[0, 0], offsets=[0, 0], _variant=2)
    for bad in ("1", 1.0, True):
        with pytest.raises(TypeError, match="_variant must be an int"):
            cuda_sample.sample(logits, **p, seeds=[0, 0], offsets=[0, 0], _variant=bad)
    with pytest.raises(ValueError, match="CUDA"):  # a good variant reaches the device check
        cuda_sample.sample(logits, **p, seeds=[0, 0], offsets=[0, 0], _variant=1)


def test_new_kernels_are_opt_in(monkeypatch):
    """sample_v1 and sample_argmax are not verified: on only when named in FASTLLM_KERNELS."""
    assert {"sample_v1", "sample_argmax"}.isdisjoint(backend.VERIFIED_KERNELS)
    monkeypatch.setattr(backend, "compiled_kernels", lambda: ["sample", "sample_v1", "sample_argmax"])
    monkeypatch.delenv("FASTLLM_KERNELS", raising=False)
    backend.reset_settings()
    assert cuda_sample.default_variant() == 0 and not backend.kernel_enabled("sample_argmax")
    monkeypatch.setenv("FASTLLM_KERNELS", "sample_v1")
    backend.reset_settings()
    assert cuda_sample.default_variant() == 1 and not backend.kernel_enabled("sample_argmax")


def _variant_rows(vocab: int, dtype: torch.dtype, seed: int):
    """24 rows that reach every path: greedy, each filter alone and together,
    top-k >= V, tiny top-p, min-p 1, extreme temperatures, ties at the
    boundaries, +inf, NaN, all -inf, bad parameters, some -inf, huge logits,
    constant rows. Returns (logits, params, indices of the plain rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = 24
    logits = torch.randn(rows, vocab, generator=g) * 3
    settings = [dict(temperature=0.0), dict(), dict(temperature=0.8, top_p=0.9), dict(temperature=0.7, top_k=50),
                dict(temperature=1.2, top_k=5, top_p=0.8, min_p=0.05), dict(min_p=0.2), dict(top_k=1),
                dict(top_k=vocab, top_p=0.5), dict(top_k=vocab + 3), dict(top_p=1e-6), dict(min_p=1.0),
                dict(temperature=1e-30), dict(temperature=1e30), dict(top_k=3, top_p=0.6), dict(top_p=0.3),
                dict(top_p=0.9), dict(), dict(), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=0.95),
                dict(top_p=0.5), dict(top_k=2), dict(temperature=2.0, top_p=0.999)]
    logits[13:15] = torch.randint(-3, 4, (2, vocab), generator=g).float()  # many ties at the boundaries
    logits[15, :: max(1, vocab // 3)] = float("inf")
    logits[16, vocab // 2] = float("nan")
    logits[17] = float("-inf")
    logits[20, ::2] = float("-inf")
    logits[21] *= 1e30  # inf in fp16
    logits[22] = 1.5
    p = {k: torch.tensor([float(s.get(k, d)) for s in settings])
         for k, d in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0))}
    p["top_k"] = torch.tensor([int(s.get("top_k", 0)) for s in settings], dtype=torch.int32)
    plain = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 23]
    return logits.to(dtype), p, plain


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32000, 128256, 151936, 262144])
def test_variant1_draws_equal_variant0(vocab, dtype):
    """Every group size (cluster of 1..16 blocks: the 16-16-9-bit masses when a
    chunk is <= 65536 values, the carry scheme above), shared-memory caches down
    to nothing (the recomputed tail), every row kind of _variant_rows: variant 1
    returns variant 0's tokens and status codes exactly, and they are right."""
    from fastllm.ops import cuda

    logits, p, plain = _variant_rows(vocab, dtype, seed=vocab)
    rows = logits.shape[0]
    dev_logits = logits.cuda()
    params = {k: v.cuda() for k, v in p.items()}
    groups = [0, 1, 2, 4, 8, 16] if torch.cuda.get_device_capability()[0] >= 9 else [0, 1]
    seen = 0
    for offset in (0, 1):
        seeds = list(range(100, 100 + rows))
        for group in groups:
            for cache in (None, 0, 1000):
                got = {}
                for variant in VARIANTS:
                    try:
                        got[variant] = cuda.sample(dev_logits, **params, seeds=seeds, offsets=[offset] * rows,
                                                   check=False, _group=group, _cache_limit=cache, _variant=variant)
                    except RuntimeError as e:  # a cluster of 16 may not fit some GPUs
                        assert "does not fit" in str(e)
                if len(got) < 2:  # a cluster of 16 that does not fit one variant's shared memory
                    continue
                assert torch.equal(got[1], got[0]), (group, cache, offset, got[0].tolist(), got[1].tolist())
                seen += 1
    assert seen >= 2 * len(groups)
    tok = got[1].cpu()
    assert tok[16] == -1 and tok[17] == -2 and tok[18] == -3 and tok[19] == -3  # NaN, all -inf, bad parameters
    assert tok[0] == torch.argmax(logits[0].float()) and tok[6] == torch.argmax(logits[6].float())
    good = [r for r in range(rows) if r not in (16, 17, 18, 19)]
    assert ((tok[good] >= 0) & (tok[good] < vocab)).all()
    assert not torch.isneginf(logits[20].float()[tok[20]]) and torch.isposinf(logits[15].float()[tok[15]])
    keep, _ = ref.sampling_mask(logits[plain].float(), **{k: v[plain] for k, v in p.items()})
    assert keep.gather(1, tok[plain][:, None]).all(), "a draw outside the support"


@requires_cuda
def test_variant_follows_sample_v1_kernel(monkeypatch):
    """Without ``_variant`` the wrapper runs variant 0, or 1 once FASTLLM_KERNELS names sample_v1."""
    from fastllm.ops import cuda

    logits = torch.randn(3, 1000, device="cuda")
    seen = spy_variants(monkeypatch, "sample", 14)
    cuda.sample(logits, **_params(3, top_p=0.9), seeds=[0, 1, 2], offsets=[0, 0, 0])
    monkeypatch.setenv("FASTLLM_KERNELS", "sample_v1")
    backend.reset_settings()
    cuda.sample(logits, **_params(3, top_p=0.9), seeds=[0, 1, 2], offsets=[0, 0, 0])
    cuda.sample(logits, **_params(3, top_p=0.9), seeds=[0, 1, 2], offsets=[0, 0, 0], _variant=0)
    assert seen == [0, 1, 0]
    assert {"sample_v1", "sample_argmax"} <= set(backend.compiled_kernels())


# --------------------------------------------------------------------------- #
# The argmax kernel (csrc/sample_argmax.cu)
# --------------------------------------------------------------------------- #
def _expected_argmax(logits: torch.Tensor) -> torch.Tensor:
    """reference.sample at temperature 0 row by row, with its errors as status codes."""
    out = []
    for row in logits:
        try:
            out.append(int(ref.sample(row[None], **_params(1, temperature=0.0, device="cpu"), seeds=[0],
                                      offsets=[0])[0]))
        except ValueError as e:
            out.append(-1 if "NaN" in str(e) else -2 if "-inf" in str(e) else -99)
    return torch.tensor(out)


def _argmax_rows(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    logits[1] = 0.25  # every token tied: the lowest id
    logits[2, vocab // 3:] = 50.0  # ties in the upper part
    logits[3, -1] = float("inf")
    logits[4, ::3] = float("inf")  # several +inf: the first
    logits[5] = float("-inf")
    logits[6, vocab // 2] = float("nan")
    logits[7, :-1] = float("-inf")  # only the last is finite
    logits[8] = -0.0
    logits[8, vocab // 2:] = 0.0  # -0 and +0 are equal: the first
    logits[9, 0] = float("nan")
    logits[9, 1:] = float("-inf")  # NaN wins over all -inf, as in the reference
    logits[10] = torch.randint(-2, 3, (vocab,), generator=g).float()
    return logits.to(dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 1001, 32000, 128256, 151936, 262144])
def test_argmax_matches_reference(vocab, dtype):
    """Every group size, aligned and misaligned rows (the 16-byte path and the
    scalar one), ties, +-inf, -0, NaN and all -inf rows: reference.sample's
    greedy tokens, and its errors as status codes."""
    rows = 33
    logits = _argmax_rows(rows, vocab, dtype, seed=vocab)
    want = _expected_argmax(logits)
    assert (want[[5, 6, 9]] == torch.tensor([-2, -1, -1])).all() and want[4] == 0 and want[1] == 0
    groups = [0, 1, 2, 4, 8] if torch.cuda.get_device_capability()[0] >= 9 else [0, 1]
    flat = torch.empty(rows * vocab + 1, dtype=dtype, device="cuda")
    misaligned = flat[1:].view(rows, vocab)  # 2 or 4 bytes past a 16-byte boundary
    misaligned.copy_(logits)
    for x in (logits.cuda(), misaligned):
        for group in groups:
            got = cuda_sample.argmax(x, check=False, _group=group)
            assert got.dtype == torch.int64 and got.shape == (rows,)
            assert torch.equal(got.cpu(), want), (group, x.data_ptr() % 16, got.tolist(), want.tolist())


@requires_cuda
def test_argmax_equals_sample_greedy_on_many_rows():
    """Many rows (one block per row and beyond): the argmax kernel and the
    sampler at temperature 0 agree on every row."""
    from fastllm.ops import cuda

    rows, vocab = 300, 50257
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 2
    logits[::7, 123] = 20.0
    want = cuda.sample(logits, **_params(rows, temperature=0.0), seeds=[0] * rows, offsets=[0] * rows)
    assert torch.equal(cuda_sample.argmax(logits), want)
    assert torch.equal(want, torch.argmax(logits.float(), dim=-1))


@requires_cuda
def test_argmax_errors_and_checks():
    with pytest.raises(ValueError, match="NaN in rows \\[1\\]"):
        cuda_sample.argmax(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]], device="cuda"))
    with pytest.raises(ValueError, match="-inf in rows \\[0\\]"):
        cuda_sample.argmax(torch.full((1, 9), float("-inf"), device="cuda"))
    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(TypeError, match="dtype"):
        cuda_sample.argmax(x.double())
    with pytest.raises(ValueError, match="contiguous"):
        cuda_sample.argmax(torch.randn(10, 4, device="cuda").t())
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        cuda_sample.argmax(x[0])
    with pytest.raises(ValueError, match="_group"):
        cuda_sample.argmax(x, _group=16)
    assert cuda_sample.argmax(x[:0]).shape == (0,)
    if torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(RuntimeError, match="clusters"):
            cuda_sample.argmax(x, _group=2)


def test_argmax_rejects_bad_input_on_cpu():
    with pytest.raises(TypeError, match="torch.Tensor"):
        cuda_sample.argmax([[0.0, 1.0]])
    with pytest.raises(TypeError, match="dtype"):
        cuda_sample.argmax(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        cuda_sample.argmax(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="_group"):
        cuda_sample.argmax(torch.zeros(2, 3), _group=3)
    with pytest.raises(ValueError, match="CUDA"):
        cuda_sample.argmax(torch.zeros(2, 3))


@requires_cuda
def test_argmax_under_cuda_graph():
    logits = torch.randn(16, 32000, device="cuda")
    eager = cuda_sample.argmax(logits)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_sample.argmax(logits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_sample.argmax(logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    logits[:, 7] = 100.0
    graph.replay()
    torch.cuda.synchronize()
    assert (out == 7).all()


# --------------------------------------------------------------------------- #
# sampling.sample_next: all-greedy steps go to the argmax kernel when enabled
# --------------------------------------------------------------------------- #
def _greedy_step(rows: int = 3, vocab: int = 50, device: str = "cpu"):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(4)).to(device)
    configs = [GenerationConfig(temperature=0.0) for _ in range(rows)]
    contexts = [sampling.LogitContext(seen=[], counted=[]) for _ in range(rows)]
    return logits, configs, contexts


def test_greedy_route_decision(monkeypatch):
    enabled = {"sample_argmax"}
    monkeypatch.setattr(backend, "kernel_enabled", lambda name: name in enabled)
    on_gpu = SimpleNamespace(is_cuda=True)
    greedy = [GenerationConfig(temperature=0.0)] * 2
    assert sampling.greedy_on_device(on_gpu, greedy)
    assert not sampling.greedy_on_device(on_gpu, [greedy[0], GenerationConfig(temperature=0.5)])
    assert not sampling.greedy_on_device(on_gpu, [])
    assert not sampling.greedy_on_device(torch.zeros(2, 5), greedy)  # CPU logits: the reference
    enabled.clear()
    assert not sampling.greedy_on_device(on_gpu, greedy)  # not opted in


def test_greedy_route_keeps_cpu_results(monkeypatch):
    """CPU steps never reach the kernel, even with it enabled: the reference's tokens."""
    logits, configs, contexts = _greedy_step()
    want = ref.sample(logits.clone(), **_params(3, temperature=0.0, device="cpu"), seeds=[0] * 3, offsets=[0] * 3)
    monkeypatch.setattr(backend, "kernel_enabled", lambda name: True)

    def fail(*a, **k):
        raise AssertionError("the argmax kernel ran on CPU logits")

    monkeypatch.setattr(cuda_sample, "argmax", fail)
    got = sampling.sample_next(logits, configs, contexts, seeds=[1, 2, 3], steps=[0, 0, 0])
    assert torch.equal(got, want)


def test_greedy_route_calls_argmax_after_the_processors(monkeypatch):
    """With the route on, sample_next draws with cuda_sample.argmax (here a CPU
    stand-in) after the logit processors, passing check through, and the
    tokens are the reference's."""
    logits, configs, contexts = _greedy_step()
    top = int(torch.argmax(logits[0]))
    contexts[0] = sampling.LogitContext(seen=[], counted=[], banned=[top])  # the argmax of row 0 is banned
    calls = []

    def fake_argmax(x, *, check=True):
        calls.append((x.clone(), check))
        return torch.argmax(x, dim=-1)

    monkeypatch.setattr(sampling, "greedy_on_device", lambda x, c: True)
    monkeypatch.setattr(cuda_sample, "argmax", fake_argmax)
    got = sampling.sample_next(logits, configs, contexts, seeds=[1, 2, 3], steps=[0, 0, 0], check=False)
    assert len(calls) == 1 and calls[0][1] is False
    assert torch.isneginf(calls[0][0][0, top]) and got[0] != top
    want = ref.sample(calls[0][0], **_params(3, temperature=0.0, device="cpu"), seeds=[0] * 3, offsets=[0] * 3)
    assert torch.equal(got, want)


@requires_cuda
def test_greedy_steps_use_the_argmax_kernel_when_enabled(monkeypatch):
    logits, configs, contexts = _greedy_step(rows=5, vocab=32000, device="cuda")
    want = sampling.sample_next(logits.clone(), configs, contexts, seeds=[0] * 5, steps=[0] * 5)
    calls = []
    real = backend._C.sample_argmax
    monkeypatch.setattr(backend._C, "sample_argmax", lambda *a: (calls.append(a), real(*a))[1], raising=False)
    assert sampling.sample_next(logits.clone(), configs, contexts, seeds=[0] * 5, steps=[0] * 5).tolist() == \
        want.tolist() and not calls  # not opted in: the sampler
    monkeypatch.setenv("FASTLLM_KERNELS", "sample_argmax")
    backend.reset_settings()
    got = sampling.sample_next(logits.clone(), configs, contexts, seeds=[0] * 5, steps=[0] * 5)
    assert len(calls) == 1 and torch.equal(got, want)
    configs[2] = GenerationConfig(temperature=0.7)
    sampling.sample_next(logits.clone(), configs, contexts, seeds=[0] * 5, steps=[0] * 5)
    assert len(calls) == 1  # a sampled row: the whole step goes to the sampler
