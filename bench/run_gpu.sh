#!/usr/bin/env bash
# One GPU round: install the extension, run the GPU tests, run the benchmarks,
# all inside a time budget, so that one device call of 600 s always ends with
# its logs and summary written.
# Usage: bash bench/run_gpu.sh OUTDIR [BENCH_FILES...]
#   OUTDIR gets env.txt, build.log, test_summary.txt (read it first), tests.log,
#   sanitizer.log, bench.log, bench.json, summary.txt, and with the opt-in
#   phases below sweep.json, sweep.log, profile_summary.txt, profile.tar.gz
#   (at most 8 files once packed: see the end of this block).
#   Extra arguments pick benchmark files, e.g. `bash bench/run_gpu.sh $OUT bench/bench_rmsnorm.py`.
# The extension: if gpu_prebuilt/ (bench/prebuild.sh, carried with the call)
#   holds a module built from these very sources that imports here, it is
#   installed as is (seconds); else the sources are compiled here (~2 min).
# Budget: BUDGET (s, default 540) counts from the start; each phase gets what
#   is left (a phase that does not fit is skipped and says so), each test file
#   at most FILE_TIMEOUT (240), each benchmark file BENCH_TIMEOUT (240).
# Tests: the tests marked `cuda` (those that skip without a GPU; conftest.py),
#   kernel files first, TEST_JOBS (6) files at a time; ALL_TESTS=1 runs every
#   test; TESTS="python_tests/test_x.py ..." picks files; SKIP_TESTS=1 none.
#   PYTEST_ARGS (e.g. "-k bf16 -x") goes to every test file.
# Benchmarks (alone, after the tests; kernels first, bench_generate last) run
#   with FASTLLM_KERNELS=$BENCH_KERNELS (default empty: the verified kernels,
#   backend.VERIFIED_KERNELS; "all" adds any experimental kernel to the
#   whole-loop numbers; the kernel benchmarks name their variants
#   themselves); SKIP_BENCH=1 skips them, FASTLLM_BENCH_8B=1 adds the
#   Llama-3-8B shape to bench_generate.py. SKIP_E2E=1 skips the closing
#   `fastllm bench` runs on the shipped model.
# SANITIZE=1 also runs the kernel test files under compute-sanitizer memcheck
#   (SANITIZE_K="-k expr" narrows them: it is slow).
# Opt-in phases after the benchmarks, before `fastllm bench`, each within the
#   budget (skipped with a note when under 40 s are left):
#   SWEEP=1 runs bench/sweep.py: every knob setting of decode_attention
#   (num_splits x _variant), int4/int8_linear (split-K) and sample (_group),
#   cold/hot us beside the torch peers, ~30-60 s. SWEEP_ARGS go to it (e.g.
#   "--quick", "--only decode,int4", "--variants 0,1"); SWEEP_TIMEOUT (150 s)
#   bounds it. Its tables go to summary.txt, every number to sweep.json, its
#   progress and errors to sweep.log.
#   PROFILE=1 runs bench/profile_gpu.sh: Nsight Compute on the kernels of one
#   call per case (~15-25 s a case), cases PROFILE_CASES (default its 9, e.g.
#   "decode_B1x4096 decode_B1x4096_v1 int4_M1_s4"), PROFILE_TIMEOUT (240 s) for
#   all of them, PROFILE_CASE_TIMEOUT (60 s) each (other PROFILE_* variables:
#   profile_gpu.sh). Writes profile_summary.txt and profile.tar.gz.
# OUTDIR at the end: empty files and a bench.json without benchmarks are
#   removed; if more than 8 files are left, the *.log files go into logs.tar.gz
#   (the device tool returns 8 files at most).
set -uo pipefail
start=$SECONDS
budget=${BUDGET:-540}
left() { echo $((budget - (SECONDS - start))); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }  # min(limit, time left)
out=${1:?usage: bash bench/run_gpu.sh OUTDIR [bench files]}
shift
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(bench)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
status=0
kernel_re='rmsnorm|silu|rotary|decode|sample|prefill|int8|int4'
export FASTLLM_CUDA_ARCHS=${FASTLLM_CUDA_ARCHS:-90a}

commit=$(git rev-parse HEAD 2>/dev/null) && { git status --porcelain 2>/dev/null | grep -q . && commit="$commit (dirty)"; }
[ -n "$commit" ] || commit="$(cat gpu_prebuilt/commit.txt 2>/dev/null || echo "${COMMIT:-unknown}") (no git here: from gpu_prebuilt/commit.txt or \$COMMIT)"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# ------------------------------------------------------------------ extension
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
prebuilt=gpu_prebuilt/_C$suffix
: > "$out/build.log"
installed=0
if [ -f "$prebuilt" ] && [ "$(cat gpu_prebuilt/stamp.txt 2>/dev/null)" = "$(bash bench/source_stamp.sh "$FASTLLM_CUDA_ARCHS")" ]; then
  echo "== install with the prebuilt extension ($prebuilt, built $(cat gpu_prebuilt/commit.txt 2>/dev/null))"
  if FASTLLM_CUDA=OFF python3 -m pip install --no-build-isolation --no-deps . >> "$out/build.log" 2>&1 &&
     cp "$prebuilt" "$site/fastllm/" &&
     (cd / && python3 -c "import fastllm._C") >> "$out/build.log" 2>&1; then
    installed=1
  else
    echo "the prebuilt extension does not import here (see build.log): building it"
    rm -f "$site/fastllm/_C$suffix"
  fi
else
  [ -d gpu_prebuilt ] && echo "gpu_prebuilt/ does not match these sources or this Python ($suffix): building"
fi
if [ $installed = 0 ]; then
  echo "== build (archs $FASTLLM_CUDA_ARCHS)"
  if ! FASTLLM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install --no-build-isolation --no-deps -v . \
      >> "$out/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -40 "$out/build.log"; exit 1
  fi
fi
echo "extension ready after $((SECONDS - start)) s" | tee -a "$out/env.txt"
# from / so that the installed package (with _C) is imported, not this source tree
(cd / && python3 -c "import fastllm, json; print(json.dumps(fastllm.backend_info(), indent=1))") 2>&1 | tee -a "$out/env.txt"
# the wgmma prefill kernels skip their tests where this is False: it must be True on an H100/H200
(cd / && python3 -c "from fastllm.ops.cuda_prefill_attention import wgmma_usable as u; print('wgmma_usable d64/d128:', u(64), u(128))") 2>&1 | tee -a "$out/env.txt"

# ---------------------------------------------------------------------- tests
# Each test file runs in its own process under a time limit, so a hung kernel
# or a poisoned CUDA context (illegal address) costs one file, not the round.
limit=${FILE_TIMEOUT:-240}
tmp=$(mktemp -d)
: > "$out/tests.log"; : > "$out/test_summary.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  jobs_n=${TEST_JOBS:-6}
  select=(-m cuda); [ "${ALL_TESTS:-0}" = 1 ] && select=()
  files=${TESTS:-$(ls python_tests/test_*.py | grep -E "$kernel_re"; ls python_tests/test_*.py | grep -vE "$kernel_re")}
  echo "== tests (${select[*]:-all}; per file ${limit}s at most, $jobs_n files at a time, $(left)s left)"
  run_file() {  # test file, its index
    local f=$1 i=$2 rc line t
    t=$(cap "$limit")
    if [ "$t" -lt 20 ]; then
      echo "not run: out of time" > "$tmp/test_$i.log"; rc=125
    else
      FASTLLM_EXPECT_C=1 timeout -k 10 "$t" python3 -P -m pytest "$f" -q -rs -p no:cacheprovider "${select[@]}" \
        ${PYTEST_ARGS:-} > "$tmp/test_$i.log" 2>&1
      rc=$?
    fi
    line=$(tail -1 "$tmp/test_$i.log")
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && line="TIMEOUT after ${t}s"
    [ $rc -eq 5 ] && rc=0  # every test deselected (no GPU test in the file)
    printf '%-45s rc=%-3s %s\n' "$f" "$rc" "$line" > "$tmp/summary_$i.txt"
    echo "$rc" > "$tmp/rc_$i"
    cat "$tmp/summary_$i.txt"
  }
  i=0
  for f in $files; do
    i=$((i + 1))
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_n" ]; do sleep 1; done
    run_file "$f" "$i" &
  done
  wait
  i=0
  for f in $files; do
    i=$((i + 1))
    { echo "---- $f"; cat "$tmp/test_$i.log"; } >> "$out/tests.log"
    cat "$tmp/summary_$i.txt" >> "$out/test_summary.txt"
    [ "$(cat "$tmp/rc_$i" 2>/dev/null || echo 1)" != 0 ] && status=1
  done
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -60
  echo "tests done after $((SECONDS - start)) s" | tee -a "$out/test_summary.txt"
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  echo "== compute-sanitizer memcheck (${san:-not found})"
  : > "$out/sanitizer.log"
  if [ -n "$san" ]; then
    # -P: not the source tree first on sys.path (its fastllm has no _C: every GPU test would skip)
    for f in ${TESTS:-$(ls python_tests/test_*.py | grep -E "$kernel_re")}; do
      t=$(cap "$limit")
      if [ "$t" -lt 20 ]; then echo "sanitize $f: out of time" | tee -a "$out/test_summary.txt"; continue; fi
      echo "---- $f" >> "$out/sanitizer.log"
      FASTLLM_EXPECT_C=1 timeout -k 10 "$t" "$san" --tool memcheck --error-exitcode 99 --print-limit 20 \
        python3 -P -m pytest "$f" -q -x -p no:cacheprovider -m cuda ${SANITIZE_K:-} >> "$out/sanitizer.log" 2>&1
      rc=$?
      [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
      printf 'sanitize %-36s rc=%s\n' "$f" "$rc" | tee -a "$out/test_summary.txt"
    done
  fi
fi

# ----------------------------------------------------------------- benchmarks
blimit=${BENCH_TIMEOUT:-240}
: > "$out/bench.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks (per file ${blimit}s at most, $(left)s left)"
  bench_files=()
  for a in "${bench_args[@]}"; do
    # kernels first, the whole-loop generation benchmark (the longest) last
    if [ -d "$a" ]; then bench_files+=($(ls "$a"/bench_*.py | grep -v bench_generate) $(ls "$a"/bench_generate.py));
    else bench_files+=("$a"); fi
  done
  i=0
  for f in "${bench_files[@]}"; do
    i=$((i + 1))
    t=$(cap "$blimit")
    if [ "$t" -lt 30 ]; then echo "$f: not run, out of time" | tee -a "$out/bench.log"; status=1; continue; fi
    echo "---- $f" >> "$out/bench.log"
    FASTLLM_KERNELS=${BENCH_KERNELS-} timeout -k 10 "$t" python3 -P -m pytest "$f" --benchmark-only \
      --benchmark-json="$tmp/bench_$i.json" -s -q -p no:cacheprovider >> "$out/bench.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then status=1; echo "$f: rc=$rc" | tee -a "$out/bench.log"; fi
  done
  grep -E "^(rmsnorm|generate|linear|int8_linear|int4_linear|prefill_attention|decode_attention|sample|silu|rotary)|passed|failed|error" \
    "$out/bench.log" | tail -200
fi
python3 - "$tmp" "$out/bench.json" <<'PY'
import glob, json, sys
merged = {"benchmarks": []}
for path in sorted(glob.glob(sys.argv[1] + "/bench_*.json")):
    try:
        data = json.load(open(path))
    except Exception:
        continue
    merged.setdefault("machine_info", data.get("machine_info"))
    merged.setdefault("commit_info", data.get("commit_info"))
    merged["benchmarks"] += data.get("benchmarks", [])
json.dump(merged, open(sys.argv[2], "w"), indent=1)
PY
rm -rf "$tmp"

python3 - "$out/bench.json" <<'PY' | tee "$out/summary.txt"
import json, sys
data = json.load(open(sys.argv[1]))
if not data["benchmarks"]:
    sys.exit("no benchmark ran")
# us/call: cold L2, from a graph (bench/conftest.py); hot: back-to-back in a graph;
# eager: back-to-back Python calls; GB/s and TFLOP/s from us/call
nan = float("nan")
print(f"{'benchmark':64s} {'us/call':>9s} {'hot':>8s} {'eager':>8s} {'GB/s':>7s} {'TFLOP/s':>7s} {'tok/s':>7s}")
for b in data["benchmarks"]:
    e = b.get("extra_info", {})
    us = e.get("us_per_call", b["stats"]["median"] * 1e6)
    print(f"{b['name'][:64]:64s} {us:9.2f} {e.get('us_hot', nan):8.2f} {e.get('us_eager', nan):8.2f} "
          f"{e.get('GBps', nan):7.0f} {e.get('TFLOPs', nan):7.1f} {e.get('tok_per_s', nan):7.1f}")
PY

# ------------------------------------------------------- opt-in: sweep, profile
# -P / bench/ scripts: the installed fastllm (with _C) is imported, not this
# source tree (sys.path gets the script's folder, bench/, which holds no fastllm).
if [ "${SWEEP:-0}" = 1 ]; then
  t=$(cap "${SWEEP_TIMEOUT:-150}")
  if [ "$t" -lt 40 ]; then
    echo "== sweep: not run, out of time ($(left)s left)" | tee -a "$out/summary.txt"; status=1
  else
    echo "== sweep (${t}s at most, $(left)s left)"
    # the sweep stops itself at its --budget; timeout is the backstop
    timeout -k 10 $((t + 5)) python3 -P bench/sweep.py "$out" --budget $((t - 10)) ${SWEEP_ARGS:-} \
      2> "$out/sweep.log" | tee -a "$out/summary.txt"
    rc=$?
    [ $rc -ne 0 ] && { status=1; echo "sweep: rc=$rc (sweep.log)" | tee -a "$out/summary.txt"; tail -5 "$out/sweep.log"; }
  fi
fi
if [ "${PROFILE:-0}" = 1 ]; then
  t=$(cap "${PROFILE_TIMEOUT:-240}")
  if [ "$t" -lt 40 ]; then
    echo "== profile: not run, out of time ($(left)s left)" | tee -a "$out/summary.txt"
  else
    echo "== profile (${t}s at most, $(left)s left)"
    # it keeps to PROFILE_BUDGET and writes its summary; timeout is the backstop
    PROFILE_BUDGET=$((t - 5)) timeout -k 10 $((t + 10)) bash bench/profile_gpu.sh "$out" ${PROFILE_CASES:-}
  fi
fi

# End to end on the shipped model (fastllm bench), bf16: the reference ops
# (FASTLLM_BACKEND=torch), the kernels decoding eagerly, and the default (kernels
# + CUDA graphs), the last two with FASTLLM_KERNELS=$BENCH_KERNELS. Appended to summary.txt.
if [ "${SKIP_E2E:-0}" != 1 ]; then
  echo "== fastllm bench (shipped model, bf16, $(left)s left)" | tee -a "$out/summary.txt"
  for mode in reference kernels kernels+graphs; do
    t=$(cap 120)
    if [ "$t" -lt 30 ]; then echo "-- $mode: not run, out of time" | tee -a "$out/summary.txt"; continue; fi
    backend=""; graphs=--no-cuda-graphs
    [ "$mode" = reference ] && backend=torch
    [ "$mode" = kernels+graphs ] && graphs=--cuda-graphs
    echo "-- $mode" | tee -a "$out/summary.txt"
    # from / so that the installed package (with _C) is imported, not this source tree
    (cd / && FASTLLM_BACKEND=$backend FASTLLM_KERNELS=${BENCH_KERNELS-} timeout -k 10 "$t" python3 -m fastllm.cli \
      bench --device cuda --dtype bfloat16 --input-len 128 --output-len 128 $graphs 2>&1) | tail -4 |
      tee -a "$out/summary.txt"
  done
fi
echo "round done after $((SECONDS - start)) s (budget ${budget}s), status $status" | tee -a "$out/summary.txt"

# what the device tool returns: 8 files at most, no deeper than two folders
find "$out" -maxdepth 1 -type f -empty -delete
python3 -c "import json, sys; sys.exit(1 if json.load(open(sys.argv[1]))['benchmarks'] else 0)" "$out/bench.json" \
  2>/dev/null && rm -f "$out/bench.json"
for d in "$out"/*/; do [ -d "$d" ] && tar -czf "${d%/}.tar.gz" -C "$out" "$(basename "$d")" && rm -rf "$d"; done
if [ "$(find "$out" -maxdepth 1 -type f | wc -l)" -gt 8 ] && ls "$out"/*.log > /dev/null 2>&1; then
  (cd "$out" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
  echo "more than 8 files: the logs are in logs.tar.gz"
fi
ls "$out"
exit $status
