"""Runs one named kernel case for Nsight Compute (bench/profile_gpu.sh drives it).

    python3 -P bench/profile_kernels.py CASE [--warmup N]       # one case; ncu profiles its last call
    python3 -P bench/profile_kernels.py --list                   # the case names
    python3 -P bench/profile_kernels.py --kineto CASE...         # no ncu: torch.profiler's kernel lines
    python3 bench/profile_kernels.py --summarize DIR CASE...     # profile_summary.txt from DIR/CASE.*

A case builds its inputs, calls the op ``--warmup`` times (lazy set-up, smem
opt-ins, cuBLAS heuristics), synchronizes, and then makes ONE more call between
``cudaProfilerStart``/``cudaProfilerStop`` (for ``ncu --profile-from-start off``)
inside an NVTX push/pop range ``profile`` (for ``ncu --nvtx --nvtx-include
profile/``, the fallback): only the kernels of that call are profiled, however
many kernels the op launches (split + combine, split-K reduce, cuBLAS).

Cases (shapes as bench/bench_*.py; bf16; decode: 32 q / 8 kv heads, d 128,
16-token pages in random order):
  decode_B<b>x<L>       fastllm decode_attention   suffixes: _s<num_splits> _v<_variant>
  sdpa_B<b>x<L>         torch SDPA (enable_gqa, dense cache), the peer
  int4_M<m>             fastllm int4_linear g128, 4096 -> 14336   suffixes: _<K>x<N> _s<splits> _v<_variant>
  int8_M<m>             fastllm int8_linear, same shapes and suffixes
  linear_bf16_M<m>      torch F.linear bf16, the peer   suffix: _<K>x<N>
  sample_topp_B<b>      fastllm sample, V 128256 fp32, temperature 0.8, top-p 0.9   suffixes: _g<group> _v<_variant>
  sample_topk_B<b>      the same with top-k 50
  sample_greedy_B<b>    temperature 0 (the sampler's argmax)
  sample_argmax_B<b>    fastllm's argmax kernel (cuda_sample.argmax, what all-greedy steps can use)   suffix: _g<group>
  argmax_B<b>           torch.argmax over the same logits, the peer
e.g. decode_B1x4096_s16_v1, int4_M1_14336x4096_s4_v1, sample_topp_B32_g4, sample_topp_B32_v1. Where a
wrapper takes ``_variant`` it is always passed (0 unless _v<N> says otherwise),
so FASTLLM_KERNELS never changes what a case profiles.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import os
import re
import statistics
import sys
import tempfile

HQ, HK, D, BLOCK = 32, 8, 128, 16
VOCAB = 128256
GROUP = 128
DEFAULT_CASES = ["decode_B1x4096", "int4_M1", "sample_topp_B32", "sdpa_B1x4096", "linear_bf16_M1", "int8_M1",
                 "int4_M16", "decode_B32x2048", "sample_greedy_B256", "sample_topp_B32_v1", "sample_argmax_B256"]

_BASE = re.compile(
    r"^(?P<kind>decode|sdpa)_B(?P<b>\d+)x(?P<L>\d+)"
    r"|^(?P<qkind>int4|int8|linear_bf16)_M(?P<m>\d+)"
    r"|^sample_(?P<mode>topp|topk|greedy|argmax)_B(?P<sb>\d+)"
    r"|^argmax_B(?P<ab>\d+)"
)
_SUFFIX = re.compile(r"_(?:s(?P<s>\d+)|v(?P<v>\d+)|g(?P<g>\d+)|(?P<k>\d+)x(?P<n>\d+))")


def parse_case(name: str) -> dict:
    m = _BASE.match(name)
    if not m:
        raise ValueError(f"unknown case {name!r} (see --list)")
    rest = name[m.end():]
    c: dict = {"name": name}
    if m["kind"]:
        c.update(kind=m["kind"], b=int(m["b"]), L=int(m["L"]))
    elif m["qkind"]:
        c.update(kind=m["qkind"], m=int(m["m"]), K=4096, N=14336)
    elif m["mode"]:
        c.update(kind="sample", mode=m["mode"], b=int(m["sb"]))
    else:
        c.update(kind="argmax", b=int(m["ab"]))
    while rest:
        s = _SUFFIX.match(rest)
        if not s:
            raise ValueError(f"case {name!r}: cannot read the suffix {rest!r} (_s<N>, _v<N>, _g<N>, _<K>x<N>)")
        if s["s"]:
            c["splits"] = int(s["s"])
        elif s["v"]:
            c["variant"] = int(s["v"])
        elif s["g"]:
            c["group"] = int(s["g"])
        else:
            c["K"], c["N"] = int(s["k"]), int(s["n"])
        rest = rest[s.end():]
    return c


def _variant_kw(wrapper, c: dict) -> dict:
    """``_variant`` for wrappers that take it, always explicit (their default may follow FASTLLM_KERNELS):
    the case's ``_v<N>``, else 0 (the verified kernel)."""
    if "_variant" in inspect.signature(wrapper).parameters:
        return {"_variant": c.get("variant") or 0}
    if c.get("variant"):
        raise ValueError(f"{c['name']}: this fastllm's {wrapper.__name__} takes no _variant")
    return {}


# --------------------------------------------------------------------------- #
# Building a case: (the call, a line saying what it runs)
# --------------------------------------------------------------------------- #
def build(c: dict):
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    kind = c["kind"]
    if kind in ("decode", "sdpa"):
        b, length = c["b"], c["L"]
        q = torch.randn(b, HQ, D, device=dev, dtype=bf, generator=g)
        if kind == "sdpa":
            k = torch.randn(b, HK, length, D, device=dev, dtype=bf, generator=g)
            v = torch.randn_like(k)
            q4 = q[:, :, None, :]
            return (lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)), \
                f"torch SDPA enable_gqa, dense cache [B={b}, Hk={HK}, L={length}, D={D}]"
        from fastllm.ops import cuda_attention
        from fastllm.ops.cuda_common import DTYPE_CODES, ext

        blocks = -(-length // BLOCK)
        k_cache = torch.randn(b * blocks, BLOCK, HK, D, device=dev, dtype=bf, generator=g)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(b * blocks, device=dev, generator=g).to(torch.int32).view(b, blocks)
        lens = torch.full((b,), length, dtype=torch.int32, device=dev)
        kw: dict = dict(max_seq_len=length, num_splits=c.get("splits"), **_variant_kw(cuda_attention.decode_attention, c))
        variant = kw.get("_variant")
        plan_args = (b, HQ, HK, D, length, 0, c.get("splits") or 0, DTYPE_CODES[bf])
        with torch.cuda.device(dev):
            try:
                plan = ext().decode_attention_plan(*plan_args, *(() if variant is None else (variant,)))
            except TypeError:  # an extension whose plan takes no variant
                plan = ext().decode_attention_plan(*plan_args)
        desc = (f"fastllm decode_attention B={b} L={length}: num_splits={plan[0]} "
                f"({'forced' if c.get('splits') else 'auto'}), workspace {plan[1]} floats, _variant={variant}")
        return (lambda: cuda_attention.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5, **kw)), desc
    if kind in ("int4", "int8", "linear_bf16"):
        m, k, n = c["m"], c["K"], c["N"]
        w = torch.randn(n, k, generator=g, device=dev, dtype=bf) * 0.02
        x = torch.randn(m, k, generator=g, device=dev, dtype=bf)
        if kind == "linear_bf16":
            return (lambda: F.linear(x, w)), f"torch F.linear bf16 M={m} {k}->{n}"
        from fastllm.ops import cuda_quant
        from fastllm.quant import quantize_int4, quantize_int8

        sms = cuda_quant._num_sms(0)
        splits = c.get("splits", 0)
        wrapper = cuda_quant._int4_fused if kind == "int4" else cuda_quant._int8_fused
        vkw = _variant_kw(wrapper, c)
        if kind == "int4":
            q4, s4, z4 = quantize_int4(w, GROUP, bf)
            plan = cuda_quant._int4_plan(m, n, k, GROUP, sms, splits)
            fn = lambda: cuda_quant._int4_fused(x, q4, s4, z4, GROUP, None, splits=splits, **vkw)  # noqa: E731
        else:
            q8, s8 = quantize_int8(w)
            plan = cuda_quant._int8_plan(m, n, k, sms, splits)
            fn = lambda: cuda_quant._int8_fused(x, q8, s8, None, splits=splits, **vkw)  # noqa: E731
        del w
        return fn, (f"fastllm {kind}_linear M={m} {k}->{n}: splits={plan[0]} "
                    f"({'requested ' + str(splits) if splits else 'auto'}), workspace {plan[1]} floats, {sms} SMs, "
                    f"_variant={vkw.get('_variant')}")
    b = c["b"]
    logits = torch.randn(b, VOCAB, generator=g, device=dev) * 3
    if kind == "argmax":
        return (lambda: torch.argmax(logits, dim=-1)), f"torch.argmax B={b} V={VOCAB} fp32"
    from fastllm.ops import cuda_sample

    mode = c["mode"]
    group = c.get("group", 0)
    if mode == "argmax":
        if c.get("variant"):
            raise ValueError(f"{c['name']}: the argmax kernel has no variants")
        if not hasattr(cuda_sample, "argmax"):
            raise ValueError(f"{c['name']}: this fastllm has no cuda_sample.argmax")
        return (lambda: cuda_sample.argmax(logits, check=False, _group=group)), \
            f"fastllm sample_argmax B={b} V={VOCAB} fp32, _group={group or 'auto'}"
    temperature = torch.full((b,), 0.0 if mode == "greedy" else 0.8, device=dev)
    top_k = torch.full((b,), 50 if mode == "topk" else 0, dtype=torch.int32, device=dev)
    top_p = torch.full((b,), 1.0 if mode == "greedy" else 0.9, device=dev)
    min_p = torch.zeros(b, device=dev)
    seeds = torch.arange(b, dtype=torch.int64, device=dev)
    offsets = torch.zeros(b, dtype=torch.int64, device=dev)
    vkw = _variant_kw(cuda_sample.sample, c)
    return (lambda: cuda_sample.sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, check=False,
                                       _group=group, **vkw)), \
        f"fastllm sample {mode} B={b} V={VOCAB} fp32, _group={group or 'auto'}, _variant={vkw.get('_variant')}"


def run_case(name: str, warmup: int) -> int:
    import torch

    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device", file=sys.stderr)
        return 2
    c = parse_case(name)
    fn, desc = build(c)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    print(f"PLAN: {desc}", flush=True)
    started = False
    try:
        torch.cuda.profiler.start()  # cudaProfilerStart: ncu --profile-from-start off starts here
        started = True
    except Exception as e:  # noqa: BLE001 - the NVTX range is the fallback
        print(f"profile_kernels: cudaProfilerStart failed ({e}); the NVTX range 'profile' still marks the call")
    try:
        rng = torch.cuda.nvtx.range("profile")
        rng.__enter__()
    except Exception as e:  # noqa: BLE001
        print(f"profile_kernels: no NVTX ({e})")
        rng = contextlib.nullcontext()
    fn()
    rng.__exit__(None, None, None)
    torch.cuda.synchronize()
    if started:
        torch.cuda.profiler.stop()
    print(f"PROFILED: one call of {name}", flush=True)
    return 0


# --------------------------------------------------------------------------- #
# Fallback without hardware counters: torch.profiler (CUPTI activity records)
# --------------------------------------------------------------------------- #
def kineto(cases: list[str], warmup: int, calls: int = 5) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("kineto: no CUDA device")
        return 0
    print(f"torch.profiler kernel records, {calls} back-to-back calls per case after {warmup} warm-up calls "
          "(inputs warm in L2; 'occ' = CUPTI's estimated occupancy, a theoretical figure)")
    for name in cases:
        try:
            fn, desc = build(parse_case(name))
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "trace.json")
                prof.export_chrome_trace(path)
                with open(path) as f:
                    events = json.load(f).get("traceEvents", [])
            kernels: dict[str, list] = {}
            for e in events:
                if e.get("cat") == "kernel":
                    kernels.setdefault(e.get("name", "?"), []).append(e)
            print(f"\n[{name}] {desc}")
            for kname, evs in kernels.items():
                a = evs[0].get("args", {})
                dur = statistics.median(float(e.get("dur", 0)) for e in evs)
                print(f"  {kname[:110]}\n     {len(evs) // calls or len(evs)}x per call, median {dur:.2f} us, "
                      f"grid {a.get('grid')} block {a.get('block')}, regs {a.get('registers per thread')}, "
                      f"smem {a.get('shared memory')} B, blocks/SM {a.get('blocks per SM')}, warps/SM "
                      f"{a.get('warps per SM')}, occ {a.get('est. achieved occupancy %')}%")
        except Exception as e:  # noqa: BLE001 - one case must not stop the others
            print(f"\n[{name}] failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            torch.cuda.empty_cache()
    return 0


# --------------------------------------------------------------------------- #
# Summaries of ncu reports (stdlib only: runs without torch)
# --------------------------------------------------------------------------- #
TEXT_KEYS = [
    "Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "L1/TEX Hit Rate",
    "L2 Hit Rate", "Mem Busy", "Max Bandwidth", "Achieved Occupancy", "Theoretical Occupancy",
    "Registers Per Thread", "Block Limit Registers", "Block Limit Shared Mem", "Block Limit Warps",
    "Block Limit SM", "Grid Size", "Block Size", "Cluster Size", "Waves Per SM", "Dynamic Shared Memory Per Block",
    "Static Shared Memory Per Block", "Warp Cycles Per Issued Instruction", "Issue Slots Busy",
    "Eligible Warps Per Scheduler", "Active Warps Per Scheduler", "No Eligible",
]
_HEADER = re.compile(r"^\s{0,6}(?P<name>\S.*?) \((?P<grid>\d+, \d+, \d+)\)x\((?P<block>\d+, \d+, \d+)\).*, Context \d+")


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def parse_details(text: str) -> list[dict]:
    """Kernels of an ncu --page details text: header, the TEXT_KEYS values, the OPT/WRN rule lines."""
    kernels: list[dict] = []
    cur: dict | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        h = _HEADER.match(line)
        if h:
            cur = dict(name=h["name"], grid=h["grid"], block=h["block"], values={}, rules=[])
            kernels.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        for key in TEXT_KEYS:
            if s.startswith(key + "  ") and key not in cur["values"]:
                parts = s[len(key):].split()
                cur["values"][key] = (parts[-1], " ".join(parts[:-1]))  # (value, unit)
                break
        if s.startswith(("OPT ", "WRN ")):
            msg = [s]
            for nxt in lines[i + 1:i + 4]:
                t = nxt.strip()
                if not t or t.startswith(("OPT ", "WRN ", "INF ", "Section:", "---")) or _HEADER.match(nxt):
                    break
                msg.append(t)
            cur["rules"].append(re.sub(r"\s+", " ", " ".join(msg))[:330])
    return kernels


def parse_raw_csv(text: str) -> list[dict]:
    """Kernels of ncu --page raw --csv (one row per kernel, a units row) or of a long CSV (one row per metric):
    a list of {metric: (value, unit)} in profiling order."""
    rows = [r for r in csv.reader(io.StringIO("\n".join(ln for ln in text.splitlines() if ln.startswith('"'))))]
    start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if start is None:
        return []
    head, body = rows[start], rows[start + 1:]
    if "Metric Name" in head and "Metric Value" in head:  # long format
        ci, cn, cu, cv = (head.index(x) for x in ("ID", "Metric Name", "Metric Unit", "Metric Value"))
        by: dict[str, dict] = {}
        for r in body:
            if len(r) > max(ci, cn, cu, cv):
                by.setdefault(r[ci], {})[r[cn]] = (r[cv], r[cu])
        return list(by.values())
    units = body[0] if body and (not body[0] or body[0][0] == "") else None
    if units is not None:
        body = body[1:]
    out = []
    for r in body:
        out.append({h: (v, units[j] if units and j < len(units) else "") for j, (h, v) in enumerate(zip(head, r))})
    return out


_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
_BYTES = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "kibyte": 1024, "mibyte": 1 << 20}


def _scaled(value_unit, scale: dict) -> float | None:
    """A (value, unit) report cell in the unit ``scale`` maps to 1 (unknown units: as they are)."""
    if not value_unit:
        return None
    v = _num(value_unit[0])
    return None if v is None else v * scale.get(value_unit[1].lower(), 1)


def stalls(metrics: dict) -> list[tuple[str, float]]:
    """Top warp stall reasons: cycles per issued instruction (WarpStateStats), else sampled shares."""
    pat = re.compile(r"^smsp__average_warps?_(?:issue_stalled|latency_issue_stalled)_(?P<r>\w+?)_per_issue_active\.ratio$")
    out = [(m["r"], _num(v[0])) for k, v in metrics.items() if (m := pat.match(k))]
    out = [(r, v) for r, v in out if v is not None and not r.endswith("not_issued")]
    if not out:
        pat = re.compile(r"^smsp__pcsamp_warps_issue_stalled_(?P<r>\w+)$")
        raw = [(m["r"], _num(v[0])) for k, v in metrics.items() if (m := pat.match(k))]
        raw = [(r, v) for r, v in raw if v is not None and not r.endswith("not_issued")]
        total = sum(v for _, v in raw) or 1.0
        out = [(r, 100.0 * v / total) for r, v in raw]
    return sorted(out, key=lambda t: -t[1])[:5]


def summarize(work: str, cases: list[str], status: str) -> int:
    print(f"ncu: {status}")
    print("per kernel of the one profiled call: ncu replays it with caches flushed (cold) and clocks as they are "
          "(--clock-control none); 'limiter' = the smallest Block Limit (theoretical occupancy)")
    for case in cases:
        base = os.path.join(work, case)
        log = _read(base + ".log")
        plan = next((ln[6:] for ln in log.splitlines() if ln.startswith("PLAN: ")), "")
        print(f"\n[{case}] {plan}")
        details = parse_details(_read(base + ".txt"))
        raw = parse_raw_csv(_read(base + ".raw.csv"))
        if not log:
            print("  not profiled: ncu is missing or cannot profile here (line above), or out of time")
            continue
        if not details and not raw:
            probs = [ln.strip() for ln in log.splitlines()
                     if re.search(r"==ERROR==|==WARNING==|LibraryNotLoaded|ERR_NVGPUCTRPERM|No kernels were profiled|"
                                  r"Error|error|not run|TIMEOUT|Traceback", ln)]
            print("  no report: " + (" | ".join(probs[-6:])[:900] if probs else "(see the case's .log)"))
            continue
        for i in range(max(len(details), len(raw))):
            d = details[i] if i < len(details) else {"name": "?", "grid": "?", "block": "?", "values": {}, "rules": []}
            r = raw[i] if i < len(raw) else {}
            v = d["values"]

            def val(key, metric=None, fmt="{}"):
                if metric and metric in r and _num(r[metric][0]) is not None:
                    return fmt.format(_num(r[metric][0]))
                return v[key][0] if key in v else "n/a"

            name = d["name"] if d["name"] != "?" else r.get("Kernel Name", ("?",))[0]
            dur = _scaled(r.get("gpu__time_duration.sum"), _US)
            dur_s = f"{dur:.2f} us" if dur is not None else (" ".join(v["Duration"]) if "Duration" in v else "n/a")
            limits = {k.replace("Block Limit ", ""): _num(v[k][0]) for k in v if k.startswith("Block Limit")}
            limits = {k: x for k, x in limits.items() if x is not None}
            limiter = ""
            if limits:
                lo = min(limits.values())
                limiter = "/".join(k for k, x in limits.items() if x == lo) + f" ({lo:g} blocks/SM)"
            smem = "+".join(v[k][0] for k in ("Static Shared Memory Per Block", "Dynamic Shared Memory Per Block")
                            if k in v)
            regs = val("Registers Per Thread", "launch__registers_per_thread", "{:g}")
            dram = val("DRAM Throughput", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "{:.1f}")
            sm = val("Compute (SM) Throughput", "sm__throughput.avg.pct_of_peak_sustained_elapsed", "{:.1f}")
            achieved = val("Achieved Occupancy", "sm__warps_active.avg.pct_of_peak_sustained_active", "{:.1f}")
            theoretical = val("Theoretical Occupancy", "sm__maximum_warps_per_active_cycle_pct", "{:.1f}")
            print(f"  {name[:140]}")
            print(f"     grid ({d['grid']}) x block ({d['block']}), regs/thread {regs}, "
                  f"smem static+dynamic {smem or 'n/a'}, waves/SM {val('Waves Per SM')}")
            print(f"     duration {dur_s} | DRAM {dram}% | memory {val('Memory Throughput')}% | SM {sm}% | "
                  f"L2 hit {val('L2 Hit Rate')}% | L1 hit {val('L1/TEX Hit Rate')}% | "
                  f"max bandwidth {val('Max Bandwidth')}% | mem busy {val('Mem Busy')}%")
            moved = [(what, _scaled(r.get(f"dram__bytes_{what}.sum"), _BYTES)) for what in ("read", "write")]
            if any(b is not None for _, b in moved):
                total = sum(b or 0 for _, b in moved)
                rate = f" = {total / (dur * 1e-6) / 1e9:.0f} GB/s over the duration" if dur else ""
                print("     DRAM " + ", ".join(f"{w} {b / 1e6:.2f} MB" for w, b in moved if b is not None) + rate)
            print(f"     occupancy achieved {achieved}% of theoretical {theoretical}%, limiter {limiter or 'n/a'}; "
                  f"issue slots busy {val('Issue Slots Busy')}%, warp cycles/issued instr "
                  f"{val('Warp Cycles Per Issued Instruction')}, eligible warps/scheduler "
                  f"{val('Eligible Warps Per Scheduler')}")
            st = stalls(r)
            if st:
                print("     top stalls: " + ", ".join(f"{k} {x:.1f}" for k, x in st))
            for rule in d["rules"][:6]:
                print(f"     {rule}")
    return 0


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help="case names (default for --kineto/--summarize: the profile_gpu.sh set)")
    p.add_argument("--warmup", type=int, default=5, help="calls before the profiled one (default 5)")
    p.add_argument("--list", action="store_true", help="print the default cases and exit")
    p.add_argument("--kineto", action="store_true", help="torch.profiler kernel lines for the cases (no ncu)")
    p.add_argument("--summarize", metavar="DIR", help="summaries of DIR/CASE.txt, .raw.csv, .log")
    p.add_argument("--status", default="", help="(--summarize) a line about ncu to print first")
    args = p.parse_args(argv)
    if args.list:
        print(" ".join(DEFAULT_CASES))
        return 0
    cases = args.cases or DEFAULT_CASES
    if args.summarize:
        return summarize(args.summarize, cases, args.status)
    for c in cases:
        parse_case(c)  # a typo fails before any GPU work
    if args.kineto:
        return kineto(cases, args.warmup)
    if len(cases) != 1:
        p.error("profile one case per process (ncu's report per case); --kineto takes several")
    return run_case(cases[0], args.warmup)


if __name__ == "__main__":
    sys.exit(main())
