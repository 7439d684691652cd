"""Knob sweep of the kernels that miss their targets: which setting is fastest.

    python3 -P bench/sweep.py OUTDIR [--only decode,int4,int8,sample] [--quick] [--dry-run] [--budget S]

Times every knob setting of decode_attention (num_splits, _variant), int4/int8
linear (split-K) and sample (blocks per row) beside the torch peer, with the
helpers of bench/conftest.py: ``cold`` = median us of one call replayed from a
CUDA graph right after a 256 MB L2-evicting read (the cost inside a decode
step), ``hot`` = back-to-back calls in one graph, inputs warm in L2. Each
setting's output is also checked against a float32 reference (``check``
column / field: a fast setting that is wrong is no answer). Prints one table
per kernel (cells ``cold/hot`` us; ``pick`` = what the automatic plan
chooses; per row the fastest cold setting against auto and the peer; per case
the fastest setting over every variant and knob against the default path,
auto of the first variant) and writes OUTDIR/sweep.json (every setting, the
tables, the device).

The settings:
- decode_attention, bf16, 32 q / 8 kv heads, d 128, 16-token pages in random
  order, B1xL256, B1xL4096, B1xL32768, B8xL4096, B32xL2048: num_splits in auto, 1, 2,
  4, ..., 128 (those with splits * 32 <= L) x ``_variant``: the values that the
  installed fastllm.ops.cuda_attention.decode_attention accepts (read from its
  ``_variant not in (...)`` check; 0 and 1 if unreadable; none if it takes no
  ``_variant``; ``--variants 0,1`` overrides), each passed explicitly (its
  default may follow FASTLLM_KERNELS); ``pick`` is decode_attention_plan's
  automatic num_splits for that variant; peer: SDPA with enable_gqa on a dense
  cache of the same keys.
- int4 (g128) / int8 linear, bf16, (K, N) in 4096x14336, 14336x4096, 2048x8192,
  M in 1, 4, 16, 64: ``splits`` in auto (0), 1, 2, 3, 4, 6, 8, 16 through
  cuda_quant._int4_fused / _int8_fused (a request is clamped to the K tiles:
  ``eff_splits`` in the JSON, ``~`` in the table) x their ``_variant`` (main
  loops; found and passed as for decode) where they take one; peer: bf16
  F.linear. GB/s counts the weight bytes (with scales and zeros).
- sample, V = 128256 fp32 logits, top-p 0.9 (temperature 0.8) and greedy, B in
  1, 8, 32, 256: ``_group`` (blocks per row) in auto (0), 1, 2, 4, 8, 16 (the
  auto choice is not exposed: compare the auto column with the forced ones)
  x ``_variant`` (found and passed as for decode: 0 the verified kernel, 1 the
  rescheduled one), and for greedy one block per row with no shared-memory
  cache (``1/nc``: ``_cache_limit=8``) and the argmax kernel
  (``argmax``: cuda_sample.argmax, what sampling.sample_next uses for
  all-greedy steps when ``sample_argmax`` is enabled); peer for greedy:
  torch.argmax.
``--quick`` drops decode splits 2 and 128, int splits 3 and 6, M = 4, sample
B = 8, and takes 30 instead of 100 cold samples.

Robustness: a setting that raises (a ValueError for an invalid knob) is
recorded with its message and the sweep goes on. The settings run in a child
process; if it dies, hangs (no progress for --stall s) or its CUDA context is
poisoned (an illegal address), the setting is recorded as failed and a fresh
child continues with the next one. --budget bounds the whole sweep: what did
not fit is marked ``not run``; sweep.json is rewritten after every child.

Time (estimate, H200): 375 settings with no variants, 827 with every variant
(decode 0/1, int4 0/2/3/4, sample 0/1; --dry-run counts them); each is 3
warm-up calls and a check, two graph captures (1 and 20 calls), 100 cold samples (~0.1 ms
each with the flush; ~0.4 ms for sample at B=256) and 7 hot replays of 20
calls: ~20 ms (80 ms for the slowest), 5-15 s in all; plus ~10-15 s to start the child (torch
import, CUDA context) and build the inputs (quantizing 6 weights, fp32
references), ~10 s more per restart after a crash. About 25-40 s in all, under
90 s even at twice the per-setting cost; --quick about half. The summary line
prints the measured time beside the estimate.

Outside a GPU run: ``--dry-run`` lists the settings without touching CUDA;
FASTLLM_SWEEP_FAKE="error:3,fatal:7,crash:9,hang:12" makes the child invent
timings (and fail at those settings) to exercise the parent without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("decode", "int4", "int8", "sample")

# decode_attention
HQ, HK, D, BLOCK = 32, 8, 128, 16
DECODE_CASES = [(1, 256), (1, 4096), (1, 32768), (8, 4096), (32, 2048)]  # B1xL256: a short chat's decode step
DECODE_SPLITS = [None, 1, 2, 4, 8, 16, 32, 64, 128]
DECODE_SPLITS_QUICK = [None, 1, 4, 8, 16, 32, 64]
# int4 / int8 linear
INT_SHAPES = [(4096, 14336), (14336, 4096), (2048, 8192)]  # (K, N)
INT_TOKENS, INT_TOKENS_QUICK = [1, 4, 16, 32, 64], [1, 16, 32, 64]
INT_SPLITS, INT_SPLITS_QUICK = [0, 1, 2, 3, 4, 6, 8, 16], [0, 1, 2, 4, 8, 16]
GROUP = 128
# sample
VOCAB = 128256
SAMPLE_BATCHES, SAMPLE_BATCHES_QUICK = [1, 8, 32, 256], [1, 32, 256]
SAMPLE_MODES = ["topp", "greedy"]
SAMPLE_GROUPS = [0, 1, 2, 4, 8, 16]

TITLES = {
    "decode": "decode_attention (bf16, Hq 32 / Hk 8, d 128, 16-token pages; columns: num_splits; GB/s of K+V)",
    "int4": "int4_linear g128 (bf16; columns: split-K, ~ = clamped; peer: bf16 F.linear; GB/s of weights+scales+zeros)",
    "int8": "int8_linear (bf16; columns: split-K, ~ = clamped; peer: bf16 F.linear; GB/s of weights+scales)",
    "sample": ("sample (V 128256 fp32; columns: blocks per row (_group), argmax = the argmax kernel; rows per "
               "_variant; peer: torch.argmax for greedy; GB/s of logits)"),
}


@dataclass
class Setting:
    index: int
    family: str
    case: str  # inputs are built once per case
    row: str  # table row
    col: str  # table column
    label: str  # unique, human readable
    knobs: dict = field(default_factory=dict)
    peer: bool = False


# --------------------------------------------------------------------------- #
# The settings (the parent and every child enumerate the same list)
# --------------------------------------------------------------------------- #
VARIANT_FUNCS = {  # the kernels whose wrapper may take ``_variant`` (experimental code paths)
    "decode": ("fastllm.ops.cuda_attention", "decode_attention"),
    "int4": ("fastllm.ops.cuda_quant", "_int4_fused"),
    "int8": ("fastllm.ops.cuda_quant", "_int8_fused"),
    "sample": ("fastllm.ops.cuda_sample", "sample"),
}


def kernel_variants(family: str) -> tuple[int, ...]:
    """The ``_variant`` values of the installed wrapper: () when it takes no ``_variant``; else the values
    its argument check names (``_variant not in (0, 1, 2)``), or (0, 1) if that cannot be read."""
    if family not in VARIANT_FUNCS:
        return ()
    module, name = VARIANT_FUNCS[family]
    try:
        fn = getattr(importlib.import_module(module), name)
        if "_variant" not in inspect.signature(fn).parameters:
            return ()
        src = inspect.getsource(fn)
    except Exception:  # noqa: BLE001 - no fastllm (or no source) here
        return ()
    m = re.search(r"_variant not in \(([\d,\s]+)\)", src)
    values = tuple(int(v) for v in m.group(1).replace(",", " ").split()) if m else ()
    return values if 0 in values else (0, 1)


# The tokens M where an int4 variant runs its own kernel (elsewhere it is variant 0:
# csrc/int4_linear.cu's wgmma_path and wide_path); variants not named cover every M.
INT4_VARIANT_TOKENS = {2: (9, 64), 3: (1, 16), 4: (1, 16)}


def variant_covers(family: str, variant: int | None, m: int) -> bool:
    """Whether ``_variant=variant`` of ``family`` runs a kernel of its own at M = m."""
    lo, hi = INT4_VARIANT_TOKENS.get(variant, (0, 1 << 30)) if family == "int4" else (0, 1 << 30)
    return lo <= m <= hi


def enumerate_settings(families: list[str], quick: bool, variants: dict[str, list[int]]) -> list[Setting]:
    """``variants``: per kernel, the ``_variant`` values to sweep ([] = do not pass ``_variant``)."""
    out: list[Setting] = []

    def add(**kw):
        out.append(Setting(index=len(out), **kw))

    if "decode" in families:
        for b, length in DECODE_CASES:
            case = f"B{b}xL{length}"
            splits = [s for s in (DECODE_SPLITS_QUICK if quick else DECODE_SPLITS) if s is None or s * 32 <= length]
            for i, variant in enumerate(variants.get("decode") or (None,)):
                row = f"{case} v{variant or 0}"
                for s in splits:
                    col = "auto" if s is None else str(s)
                    add(family="decode", case=case, row=row, col=col, label=f"decode {case} splits={col} v{variant or 0}",
                        knobs=dict(b=b, length=length, num_splits=s, variant=variant))
                if i == 0:
                    add(family="decode", case=case, row=row, col="peer", label=f"decode {case} sdpa",
                        knobs=dict(b=b, length=length), peer=True)
    for fam in ("int4", "int8"):
        if fam not in families:
            continue
        for k, n in INT_SHAPES:
            for m in INT_TOKENS_QUICK if quick else INT_TOKENS:
                case = f"{k}x{n}"
                for i, variant in enumerate(variants.get(fam) or (None,)):
                    if i > 0 and not variant_covers(fam, variant, m):
                        continue  # the same kernel as variant 0 there
                    row = f"{k}->{n} M={m}" + ("" if variant is None else f" v{variant}")
                    for s in INT_SPLITS_QUICK if quick else INT_SPLITS:
                        col = "auto" if s == 0 else str(s)
                        add(family=fam, case=case, row=row, col=col, label=f"{fam} {row} splits={col}",
                            knobs=dict(k=k, n=n, m=m, splits=s, variant=variant))
                    if i == 0:
                        add(family=fam, case=case, row=row, col="peer", label=f"{fam} {k}->{n} M={m} bf16 F.linear",
                            knobs=dict(k=k, n=n, m=m), peer=True)
    if "sample" in families:
        for mode in SAMPLE_MODES:
            for b in SAMPLE_BATCHES_QUICK if quick else SAMPLE_BATCHES:
                case = f"{mode} B={b}"
                for i, variant in enumerate(variants.get("sample") or (None,)):
                    row = case + ("" if variant is None else f" v{variant}")
                    for g in SAMPLE_GROUPS:
                        col = "auto" if g == 0 else str(g)
                        add(family="sample", case=case, row=row, col=col, label=f"sample {row} group={col}",
                            knobs=dict(mode=mode, b=b, group=g, variant=variant))
                    if mode == "greedy":  # one block per row caching nothing
                        add(family="sample", case=case, row=row, col="1/nc", label=f"sample {row} group=1 no cache",
                            knobs=dict(mode=mode, b=b, group=1, cache=8, variant=variant))
                    if mode == "greedy" and i == 0:  # the argmax kernel for all-greedy steps, and the peer
                        add(family="sample", case=case, row=row, col="argmax", label=f"sample {case} argmax kernel",
                            knobs=dict(mode=mode, b=b, argmax=True))
                        add(family="sample", case=case, row=row, col="peer", label=f"sample {case} torch.argmax",
                            knobs=dict(mode=mode, b=b), peer=True)
    return out


def variants_text(variants: dict[str, list[int]]) -> str:
    parts = [f"{f} {','.join(map(str, v))}" for f, v in variants.items() if v]
    return ("_variant swept (passed explicitly): " + "; ".join(parts)) if parts else "no _variant knob swept"


def estimate_s(settings: list[Setting], quick: bool) -> float:
    per = {"decode": 0.025, "int4": 0.025, "int8": 0.025, "sample": 0.05}  # s per setting
    scale = 0.45 if quick else 1.0
    return 12.0 + sum(per[s.family] * scale for s in settings)


# --------------------------------------------------------------------------- #
# The child: builds inputs, times settings, writes one JSON line per event
# --------------------------------------------------------------------------- #
def load_conftest():
    spec = importlib.util.spec_from_file_location("fastllm_bench_conftest", os.path.join(HERE, "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Runner:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.ct = load_conftest()
        self.n_cold = args.cold or (30 if args.quick else 100)
        self.inner = 20
        self.hot_reps = 3 if args.quick else 7
        self.cache_key = None
        self.inp: dict = {}
        self.dev = torch.device("cuda", 0)

    # ---------------------------------------------------------------- inputs
    def inputs(self, s: Setting) -> dict:
        key = (s.family, s.case)
        if key != self.cache_key:
            self.inp = {}
            self.cache_key = None
            self.torch.cuda.empty_cache()
            self.inp = getattr(self, f"_build_{s.family}")(s)
            self.cache_key = key
        return self.inp

    def _build_decode(self, s: Setting) -> dict:
        torch = self.torch
        import torch.nn.functional as F

        b, length = s.knobs["b"], s.knobs["length"]
        g = torch.Generator(device=self.dev).manual_seed(0)
        bf = torch.bfloat16
        q = torch.randn(b, HQ, D, device=self.dev, dtype=bf, generator=g)
        blocks = -(-length // BLOCK)
        k_cache = torch.randn(b * blocks, BLOCK, HK, D, device=self.dev, dtype=bf, generator=g)
        v_cache = torch.randn(b * blocks, BLOCK, HK, D, device=self.dev, dtype=bf, generator=g)
        perm = torch.randperm(b * blocks, device=self.dev, generator=g).to(torch.int32)
        tables = perm.view(b, blocks)
        lens = torch.full((b,), length, dtype=torch.int32, device=self.dev)

        def dense(cache):  # [b, Hk, L, D], the same keys in order
            return cache[tables.long()].reshape(b, blocks * BLOCK, HK, D)[:, :length].transpose(1, 2).contiguous()

        kd, vd = dense(k_cache), dense(v_cache)
        ref = F.scaled_dot_product_attention(q.float()[:, :, None], kd.float(), vd.float(), enable_gqa=True)[:, :, 0]
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, kd=kd, vd=vd, ref=ref,
                    bytes=b * length * HK * D * 2 * 2)

    def decode_plan(self, b: int, length: int, splits: int | None, variant: int | None) -> tuple[int, int]:
        """(num_splits, workspace floats) that decode_attention_plan gives this variant (older extensions
        take no variant argument)."""
        from fastllm.ops.cuda_common import DTYPE_CODES, ext

        args = (b, HQ, HK, D, length, 0, splits or 0, DTYPE_CODES[self.torch.bfloat16])
        with self.torch.cuda.device(self.dev):
            if variant is None:
                return tuple(ext().decode_attention_plan(*args))
            try:
                return tuple(ext().decode_attention_plan(*args, variant))
            except TypeError:
                return tuple(ext().decode_attention_plan(*args))

    def _build_int(self, s: Setting) -> dict:
        torch = self.torch
        from fastllm.ops import reference
        from fastllm.quant import quantize_int4, quantize_int8

        k, n = s.knobs["k"], s.knobs["n"]
        g = torch.Generator(device=self.dev).manual_seed(0)
        w = torch.randn(n, k, generator=g, device=self.dev, dtype=torch.bfloat16) * 0.02
        d = dict(w=w, k=k, n=n, x={}, ref={})
        if s.family == "int4":
            d["q"], d["s"], d["z"] = quantize_int4(w, GROUP, torch.bfloat16)
            d["wref"] = reference.dequantize_int4(d["q"], d["s"], d["z"], GROUP)
            d["bytes"] = n * k // 2 + n * (k // GROUP) * 3
        else:
            d["q"], d["s"] = quantize_int8(w)
            d["wref"] = reference.dequantize_int8(d["q"], d["s"])
            d["bytes"] = n * k + n * 4
        return d

    _build_int4 = _build_int
    _build_int8 = _build_int

    def _build_sample(self, s: Setting) -> dict:
        torch = self.torch
        b, mode = s.knobs["b"], s.knobs["mode"]
        g = torch.Generator(device=self.dev).manual_seed(0)
        logits = torch.randn(b, VOCAB, generator=g, device=self.dev) * 3
        greedy = mode == "greedy"
        temperature = torch.full((b,), 0.0 if greedy else 0.8, device=self.dev)
        top_p = torch.full((b,), 1.0 if greedy else 0.9, device=self.dev)
        d = dict(logits=logits, temperature=temperature, top_p=top_p,
                 top_k=torch.zeros(b, dtype=torch.int32, device=self.dev), min_p=torch.zeros(b, device=self.dev),
                 seeds=torch.arange(b, dtype=torch.int64, device=self.dev),
                 offsets=torch.zeros(b, dtype=torch.int64, device=self.dev), bytes=b * VOCAB * 4)
        if greedy:
            d["argmax"] = logits.argmax(-1)
        else:  # the smallest probability inside each row's top-p nucleus
            probs = (logits / 0.8).softmax(-1)
            sp = probs.sort(-1, descending=True).values
            before = sp.cumsum(-1) - sp
            size = (before < 0.9).sum(-1).clamp(min=1)
            d["probs"], d["thresh"] = probs, sp.gather(1, (size - 1)[:, None])[:, 0]
        return d

    # -------------------------------------------------------------- settings
    def fn_and_check(self, s: Setting):
        """(the call, a function of its output returning (check text, error number), extra fields)."""
        torch = self.torch
        import torch.nn.functional as F

        d = self.inputs(s)
        kn = s.knobs
        extra: dict = {}
        if s.family == "decode":
            extra["pick"] = self.decode_plan(kn["b"], kn["length"], None, kn.get("variant"))[0]
            if s.peer:
                q4 = d["q"][:, :, None]

                def fn():
                    return F.scaled_dot_product_attention(q4, d["kd"], d["vd"], enable_gqa=True)[:, :, 0]
            else:
                from fastllm.ops import cuda_attention

                kw = dict(max_seq_len=kn["length"], num_splits=kn["num_splits"])
                if kn["variant"] is not None:  # always explicit: its default may follow FASTLLM_KERNELS
                    kw["_variant"] = kn["variant"]
                extra["eff_splits"], extra["workspace_floats"] = self.decode_plan(
                    kn["b"], kn["length"], kn["num_splits"], kn["variant"])

                def fn():
                    return cuda_attention.decode_attention(
                        d["q"], d["k_cache"], d["v_cache"], d["tables"], d["lens"], D**-0.5, **kw)

            def check(out):
                err = ((out.float() - d["ref"]).abs().max() / d["ref"].abs().max()).item()
                return ("ok" if err < 2e-2 else "BAD"), err
        elif s.family in ("int4", "int8"):
            from fastllm.ops import cuda_quant

            m = kn["m"]
            if m not in d["x"]:
                g = torch.Generator(device=self.dev).manual_seed(m)
                d["x"][m] = torch.randn(m, d["k"], generator=g, device=self.dev, dtype=torch.bfloat16)
                d["ref"][m] = d["x"][m].float() @ d["wref"].T
            x, ref = d["x"][m], d["ref"][m]
            sms = cuda_quant._num_sms(self.dev.index)
            if s.peer:
                w = d["w"]

                def fn():
                    return F.linear(x, w)

                extra["GBps_bytes"] = d["n"] * d["k"] * 2
            elif s.family == "int4":
                v = kn.get("variant") or 0
                plan = cuda_quant._int4_plan(m, d["n"], d["k"], GROUP, sms, kn["splits"], *([v] if v else []))
                extra.update(eff_splits=plan[0], workspace_floats=plan[1])
                extra["pick"] = cuda_quant._int4_plan(m, d["n"], d["k"], GROUP, sms, 0, *([v] if v else []))[0]

                vkw = {} if kn.get("variant") is None else {"_variant": kn["variant"]}

                def fn():
                    return cuda_quant._int4_fused(x, d["q"], d["s"], d["z"], GROUP, None, splits=kn["splits"], **vkw)
            else:
                plan = cuda_quant._int8_plan(m, d["n"], d["k"], sms, kn["splits"])
                extra.update(eff_splits=plan[0], workspace_floats=plan[1])
                extra["pick"] = cuda_quant._int8_plan(m, d["n"], d["k"], sms, 0)[0]

                vkw = {} if kn.get("variant") is None else {"_variant": kn["variant"]}

                def fn():
                    return cuda_quant._int8_fused(x, d["q"], d["s"], None, splits=kn["splits"], **vkw)

            def check(out):
                if s.peer:  # the bf16 weights, not the quantized ones: nothing to compare
                    return "n/a", None
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                return ("ok" if err < 2e-2 else "BAD"), err
        else:
            from fastllm.ops import cuda_sample

            if s.peer:
                def fn():
                    return torch.argmax(d["logits"], dim=-1)
            elif kn.get("argmax"):
                def fn():
                    return cuda_sample.argmax(d["logits"], check=False)
            else:
                group, cache = kn["group"], kn.get("cache")
                vkw = {} if kn.get("variant") is None else {"_variant": kn["variant"]}  # always explicit

                def fn():
                    return cuda_sample.sample(d["logits"], d["temperature"], d["top_k"], d["top_p"], d["min_p"],
                                              d["seeds"], d["offsets"], check=False, _group=group,
                                              _cache_limit=cache, **vkw)

            def check(out):
                if kn["mode"] == "greedy":
                    bad = int((out != d["argmax"]).sum())
                    return ("ok" if bad == 0 else "BAD"), bad
                neg = int((out < 0).sum())
                tok = out.clamp(min=0)
                p = d["probs"].gather(1, tok[:, None])[:, 0]
                bad = int((p < d["thresh"] * (1 - 2e-2)).sum()) + neg  # 2%: fp32 order at the boundary
                return ("ok" if bad == 0 else "BAD"), bad
        return fn, check, extra

    def run(self, s: Setting) -> dict:
        torch, ct = self.torch, self.ct
        fn, check, extra = self.fn_and_check(s)
        out = fn()  # errors (an invalid knob) surface here
        torch.cuda.synchronize()
        res: dict = dict(extra)
        res["check"], res["err"] = check(out)
        del out
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        one, many = ct.capture(fn), ct.capture(fn, self.inner)
        graph = one is not None and many is not None
        cold = sorted(ct.cold_times_us(one or fn, self.n_cold))
        if many:
            hot = ct.median([ct.cuda_time_us(many, 1) / self.inner for _ in range(self.hot_reps)])
        else:
            hot = ct.median([ct.cuda_time_us(fn, self.inner) for _ in range(self.hot_reps)])
        del one, many  # frees the graphs' memory pools
        us = ct.median(cold)
        nbytes = res.pop("GBps_bytes", None) or self.inp.get("bytes", 0)
        res.update(us_cold=us, us_cold_min=cold[0], us_cold_p90=cold[min(len(cold) - 1, int(len(cold) * 0.9))],
                   us_hot=hot, graph=graph, GBps=nbytes / (us * 1e-6) / 1e9 if nbytes else None)
        return res


def cuda_ok(torch) -> bool:
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 - a sticky error: this context is done
        return False


def child_main(args, settings: list[Setting]) -> int:
    out = open(args.results, "a", buffering=1)

    def emit(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    fake = os.environ.get("FASTLLM_SWEEP_FAKE")
    if fake is not None:
        return fake_child(args, settings, emit, fake)
    import torch

    if not torch.cuda.is_available():
        emit(kind="fatal", error="no CUDA device visible to torch")
        return 2
    try:
        from fastllm import backend

        if not backend.HAS_C:
            emit(kind="fatal", error=f"fastllm's extension is not importable: {backend._C_ERROR}")
            return 2
        import fastllm

        props = torch.cuda.get_device_properties(0)
        emit(kind="info", device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
             cuda=torch.version.cuda, fastllm=os.path.dirname(fastllm.__file__), variants=args.variant_map,
             pid=os.getpid(), start=args.start)
        runner = Runner(args)
    except Exception as e:  # noqa: BLE001
        emit(kind="fatal", error=first_line(e))
        return 2
    todo = settings[args.start:]
    try:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=len(settings), initial=args.start, file=sys.stderr, mininterval=0.5 if tty else 15,
                   ncols=110, desc="sweep")
    except ImportError:
        bar = None
    for s in todo:
        if time.time() > args.deadline:
            emit(kind="out_of_time", index=s.index)
            break
        emit(kind="begin", index=s.index)
        if bar is not None:
            bar.set_postfix_str(s.label[-45:], refresh=False)
        t0 = time.time()
        fatal = False
        try:
            res = runner.run(s)
        except Exception as e:  # noqa: BLE001 - record it, go on
            res = {"error": first_line(e)}  # (inputs that failed to build are rebuilt: cache_key is set last)
            fatal = not cuda_ok(torch)
            if fatal:
                res["fatal"] = True
        res["wall_s"] = round(time.time() - t0, 3)
        emit(kind="result", index=s.index, **res)
        if bar is not None:
            bar.update(1)
        if fatal:
            return 3  # the parent starts a fresh child at the next setting
    if bar is not None:
        bar.close()
    emit(kind="done")
    return 0


def fake_child(args, settings: list[Setting], emit, spec: str) -> int:
    """Test hook without a GPU (FASTLLM_SWEEP_FAKE="error:3,fatal:7,crash:9,hang:12"): made-up timings, and
    the named settings raise, poison the context, kill the process or hang, to exercise the parent."""
    what = {int(i): k for k, i in (item.split(":") for item in spec.split(",") if ":" in item)}
    emit(kind="info", device="fake", sms=132, torch="-", cuda="-", fastllm="-", variant=False, pid=os.getpid(),
         start=args.start)
    for s in settings[args.start:]:
        if time.time() > args.deadline:
            emit(kind="out_of_time", index=s.index)
            break
        emit(kind="begin", index=s.index)
        act = what.get(s.index)
        if act == "crash":
            os._exit(139)
        if act == "hang":
            time.sleep(3600)
        if act in ("error", "fatal"):
            res = {"error": f"ValueError: fake {act} at {s.index}", **({"fatal": True} if act == "fatal" else {})}
        else:
            us = 10.0 + (s.index * 7) % 13
            res = dict(us_cold=us, us_cold_min=us - 1, us_cold_p90=us + 1, us_hot=us / 2, graph=True, GBps=1000.0,
                       check="BAD" if s.index % 17 == 5 else "ok", err=0.0, pick=4,
                       **({"eff_splits": 2} if s.col == "3" else {}))
        emit(kind="result", index=s.index, wall_s=0.0, **res)
        if act == "fatal":
            return 3
    emit(kind="done")
    return 0


# --------------------------------------------------------------------------- #
# The parent: runs children, merges, prints tables, writes sweep.json
# --------------------------------------------------------------------------- #
def read_events(path: str) -> list[dict]:
    events = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut off by a kill
    except FileNotFoundError:
        pass
    return events


def fmt_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "ERR" if not r.get("not_run") else "-"
    cell = f"{r['us_cold']:.1f}/{r['us_hot']:.1f}"
    if r.get("check") == "BAD":
        cell += "!"
    return cell


def _base(row: str) -> str:
    return re.sub(r" v\d+$", "", row)


def _vs(r: dict, other: dict | None, name: str) -> str | None:
    if not other or "us_cold" not in other:
        return None
    return f"{(r['us_cold'] / other['us_cold'] - 1) * 100:+.0f}% vs {name}"


def tables(settings: list[Setting], results: dict[int, dict]) -> str:
    """One table per kernel: a row per case (and variant), a column per knob value; then the fastest
    setting of each case over all variants against the default path (auto, first variant) and the peer."""
    lines: list[str] = []
    ok = lambda r: r is not None and "us_cold" in r and r.get("check") != "BAD"  # noqa: E731
    for fam in FAMILIES:
        fs = [s for s in settings if s.family == fam]
        if not fs:
            continue
        rows: list[str] = []
        cols: list[str] = []
        for s in fs:
            if s.row not in rows:
                rows.append(s.row)
            if not s.peer and s.col not in cols:
                cols.append(s.col)
        cols.append("peer")
        grid = {(s.row, s.col): s for s in fs}
        peers = {_base(s.row): results.get(s.index) for s in fs if s.peer}
        defaults: dict[str, dict | None] = {}  # the auto setting of each case's first row: what callers get
        for s in fs:
            if s.col == "auto":
                defaults.setdefault(_base(s.row), results.get(s.index))
        lines.append("")
        lines.append(f"== {TITLES[fam]}")
        lines.append("   us per call, cold/hot; ! = output check failed; ERR = raised (listed below); - = not run")
        w = 12
        lines.append(f"{'case':22s} {'pick':>4s} " + " ".join(f"{c:>{w}s}" for c in cols) + "   best of the row (cold)")
        errors: dict[str, list[str]] = {}
        for row in rows:
            cells, pick, best, auto = [], "", None, None
            for c in cols:
                s = grid.get((row, c))
                r = results.get(s.index) if s else None
                cell = fmt_cell(r) if s else ""
                if r and "error" in r and not r.get("not_run"):
                    errors.setdefault(r["error"], []).append(s.label)
                if r and "us_cold" in r:
                    if "eff_splits" in r and c not in ("auto", "peer") and str(r["eff_splits"]) != c:
                        cell = "~" + cell
                    if r.get("pick") is not None and not pick:
                        pick = str(r["pick"])
                    if c == "auto":
                        auto = r
                    if not s.peer and ok(r) and (best is None or r["us_cold"] < best[1]["us_cold"]):
                        best = (c, r)
                cells.append(f"{cell:>{w}s}")
            tail = ""
            if best:
                c, r = best
                gb = f" {r['GBps']:.0f} GB/s" if r.get("GBps") else ""
                tail = f"   {c} {r['us_cold']:.1f} us{gb}"
                vs = [v for v in (_vs(r, auto, "auto") if c != "auto" else None, _vs(r, peers.get(_base(row)), "peer"))
                      if v]
                if vs:
                    tail += f" ({', '.join(vs)})"
            lines.append(f"{row:22s} {pick:>4s} " + " ".join(cells) + tail)
        for msg, labels in errors.items():
            more = f" (+{len(labels) - 3} more)" if len(labels) > 3 else ""
            lines.append(f"   ERR {msg}: {', '.join(labels[:3])}{more}")
        lines.append("   fastest per case (every variant and knob; cold us, hot us):")
        for base in dict.fromkeys(_base(r) for r in rows):
            cand = [(results.get(s.index), s) for s in fs if _base(s.row) == base and not s.peer]
            cand = [(r, s) for r, s in cand if ok(r)]
            if not cand:
                lines.append(f"     {base:20s} no setting ran and passed its check")
                continue
            r, s = min(cand, key=lambda t: t[0]["us_cold"])
            vs = [v for v in (_vs(r, defaults.get(base), "default"), _vs(r, peers.get(base), "peer")) if v]
            lines.append(f"     {base:20s} {s.label[len(fam) + 1:]:42s} {r['us_cold']:8.1f} {r['us_hot']:8.1f}"
                         + (f"   ({', '.join(vs)})" if vs else ""))
    return "\n".join(lines)


def parent_main(args, settings: list[Setting], variants: dict[str, list[int]]) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    os.makedirs(args.outdir, exist_ok=True)
    json_path = os.path.join(args.outdir, "sweep.json")
    tmp = tempfile.mkdtemp(prefix="sweep_")
    events_path = os.path.join(tmp, "events.jsonl")
    results: dict[int, dict] = {}
    meta: dict = dict(args=dict(only=args.families, quick=args.quick, budget=args.budget, stall=args.stall,
                                cold=args.cold or (30 if args.quick else 100)),
                      variants=variants, settings=len(settings),
                      estimate_s=round(estimate_s(settings, args.quick), 1), children=[])
    passthrough = ["--only", ",".join(args.families), "--cold", str(args.cold or 0),
                   "--variants", json.dumps(variants)] + (["--quick"] if args.quick else [])

    def save(final_tables: str | None = None):
        doc = dict(meta=meta, wall_s=round(time.time() - t_start, 1),
                   results=[dict(asdict(s), **results.get(s.index, {"error": "not run", "not_run": True}))
                            for s in settings])
        if final_tables is not None:
            doc["tables"] = final_tables
        with open(json_path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(json_path + ".tmp", json_path)

    start, restarts, fatal_msg = 0, 0, None
    while start < len(settings):
        if time.time() > deadline - 15:  # a fresh child needs ~10 s to start
            break
        cmd = [sys.executable, "-P", os.path.abspath(__file__), args.outdir, "--child", "--start", str(start),
               "--results", events_path, "--deadline", str(deadline - 3), *passthrough]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        size, last_change, hung = -1, time.time(), ""
        while proc.poll() is None:
            time.sleep(0.25)
            now = time.time()
            cur = os.path.getsize(events_path) if os.path.exists(events_path) else 0
            if cur != size:
                size, last_change = cur, now
            elif now - last_change > args.stall or now > deadline + 2:  # past it: the tables must still print
                hung = "at the --budget" if now > deadline + 2 else f"after {args.stall:.0f} s without progress"
                proc.kill()  # the child this parent started, by its handle
                proc.wait()
        rc = proc.returncode
        events = read_events(events_path)
        begun = [e["index"] for e in events if e.get("kind") == "begin"]
        for e in events:
            if e.get("kind") == "result":
                idx = e.pop("index")
                e.pop("kind")
                results[idx] = e
            elif e.get("kind") == "info" and "device" in e:
                meta.setdefault("device", {k: e.get(k) for k in ("device", "sms", "torch", "cuda", "fastllm", "variants")})
            elif e.get("kind") == "fatal":
                fatal_msg = e.get("error")
        meta["children"].append(dict(start=start, rc=rc, killed=hung or None, wall_s=round(time.time() - t0, 1)))
        done = any(e.get("kind") == "done" for e in events)
        out_of_time = any(e.get("kind") == "out_of_time" for e in events)
        if fatal_msg or done or out_of_time:
            break
        current = max(begun) if begun else None
        if current is None or current < start:  # no progress at all: the child cannot start
            fatal_msg = f"the child made no progress (rc={rc}{', hung' if hung else ''}); see its stderr above"
            break
        if current not in results:
            why = f"hung: killed {hung}" if hung else f"child died (rc={rc})"
            results[current] = {"error": why, "fatal": True}
        start = current + 1
        restarts += 1
        print(f"sweep: child ended at setting {current} ({results[current]['error']}); "
              f"continuing at {start} (restart {restarts})", file=sys.stderr, flush=True)
        save()
        if restarts > args.max_restarts:
            fatal_msg = f"gave up after {restarts} restarts"
            break
    if fatal_msg:
        meta["fatal"] = fatal_msg
    text = tables(settings, results)
    head = (f"sweep: {len(results)}/{len(settings)} settings in {time.time() - t_start:.0f} s "
            f"(estimate {meta['estimate_s']:.0f} s), device {meta.get('device', {}).get('device', '?')}, "
            f"{variants_text(variants)}")
    if fatal_msg:
        head += f"\nsweep stopped: {fatal_msg}"
    not_run = len(settings) - len(results)
    if not_run:
        head += f"\n{not_run} settings not run (out of --budget {args.budget:.0f} s or stopped)"
    text = head + "\n" + text
    print(text, flush=True)
    save(text)
    print(f"wrote {json_path}", flush=True)
    try:
        os.remove(events_path)
        os.rmdir(tmp)
    except OSError:
        pass
    return 0 if results else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (bench/sweep.py) for the settings and the time.")
    p.add_argument("outdir", help="writes OUTDIR/sweep.json")
    p.add_argument("--only", default=",".join(FAMILIES), help="comma list of decode,int4,int8,sample (default all)")
    p.add_argument("--quick", action="store_true", help="a smaller grid and 30 cold samples: about half the time")
    p.add_argument("--dry-run", action="store_true", help="list the settings and the time estimate; no CUDA")
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep (default 150)")
    p.add_argument("--stall", type=float, default=45.0, help="kill a child after this many seconds without progress")
    p.add_argument("--cold", type=int, default=0, help="cold samples per setting (default 100, 30 with --quick)")
    p.add_argument("--variants", default="auto",
                   help="_variant values of decode_attention / int4 / int8 (where the wrapper takes _variant): "
                        "auto (those its argument check names; default), none (never pass _variant), or a "
                        "list such as 0,1 for each of them")
    p.add_argument("--max-restarts", type=int, default=8, help="fresh children after a crash, at most")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad or not args.families:
        p.error(f"--only takes a comma list of {','.join(FAMILIES)}; got {args.only!r}")
    detected = {f: list(kernel_variants(f)) for f in args.families if f in VARIANT_FUNCS}
    if args.variants == "auto":
        variants = detected
    elif args.variants == "none":
        variants = {f: [] for f in detected}
    elif args.variants.startswith("{"):  # the parent's resolved map, for its children
        variants = {f: [int(v) for v in vs] for f, vs in json.loads(args.variants).items()}
    else:
        try:
            values = [int(v) for v in args.variants.split(",")]
        except ValueError:
            p.error(f"--variants takes auto, none or a comma list of ints; got {args.variants!r}")
        variants = {f: (values if vs else []) for f, vs in detected.items()}  # where the wrapper has _variant
    args.variant_map = variants
    settings = enumerate_settings(args.families, args.quick, variants)
    if args.child:
        return child_main(args, settings)
    if args.dry_run:
        for s in settings:
            print(f"{s.index:4d}  {s.label}")
        by = {f: sum(s.family == f for s in settings) for f in args.families}
        print(f"{len(settings)} settings ({', '.join(f'{f} {n}' for f, n in by.items())}); "
              f"{variants_text(variants)}; "
              f"estimate ~{estimate_s(settings, args.quick):.0f} s on an H200 (budget {args.budget:.0f} s)")
        return 0
    return parent_main(args, settings, variants)


if __name__ == "__main__":
    sys.exit(main())
