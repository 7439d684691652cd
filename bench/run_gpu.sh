#!/usr/bin/env bash
# One GPU round: build the extension, run every test, run the benchmarks.
# Usage: bash bench/run_gpu.sh OUTDIR [PYTEST_BENCH_ARGS...]
#   logs and bench.json land in OUTDIR (<= 8 files); extra arguments select
#   benchmarks, e.g. `bash bench/run_gpu.sh $OUT bench/bench_rmsnorm.py`.
#   SKIP_TESTS=1 skips the test phase (a second call after a first full one);
#   TESTS="python_tests/test_x.py ..." picks test files; FILE_TIMEOUT (s) limits each file;
#   TEST_JOBS (default 4) test files run at a time (benchmarks always run alone);
#   BENCH_TIMEOUT (s, default 360) limits each benchmark file; FASTLLM_BENCH_8B=1 adds
#   the Llama-3-8B shape to bench_generate.py. Benchmarks run with FASTLLM_KERNELS=$BENCH_KERNELS
#   (default all: generation uses every kernel; name only those that passed their tests).
#   SKIP_E2E=1 skips the closing `fastllm bench` runs on the shipped model.
#   SANITIZE=1 also runs the kernel test files under compute-sanitizer memcheck
#   (out-of-bounds and misaligned accesses; slow: SANITIZE_K="-k expr" narrows them).
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUTDIR [bench files]}
shift
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(bench)
mkdir -p "$out"
cd "$(dirname "$0")/.."
status=0

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

export FASTLLM_CUDA=ON FASTLLM_CUDA_ARCHS=${FASTLLM_CUDA_ARCHS:-90a}
echo "== build (archs $FASTLLM_CUDA_ARCHS)"
if ! python3 -m pip install --no-build-isolation --no-deps -v . > "$out/build.log" 2>&1; then
  echo "BUILD FAILED"; tail -40 "$out/build.log"; exit 1
fi
# from / so that the installed package (with _C) is imported, not this source tree
(cd / && python3 -c "import fastllm, json; print(json.dumps(fastllm.backend_info(), indent=1))") 2>&1 | tee -a "$out/env.txt"
# the wgmma prefill kernels skip their tests where this is False: it must be True on an H100
(cd / && python3 -c "from fastllm.ops.cuda_prefill_attention import wgmma_usable as u; print('wgmma_usable d64/d128:', u(64), u(128))") 2>&1 | tee -a "$out/env.txt"

# Each test and benchmark file runs in its own process under a time limit, so
# a hung kernel or a poisoned CUDA context (illegal address) costs one file,
# not the session. Kernel tests first: they are what a GPU round is for.
limit=${FILE_TIMEOUT:-240}
tmp=$(mktemp -d)
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  jobs_n=${TEST_JOBS:-4}
  echo "== tests (per file, ${limit}s limit, $jobs_n files at a time)"
  : > "$out/tests.log"; : > "$out/test_summary.txt"
  files=${TESTS:-$(ls python_tests/test_*.py | grep -E 'rmsnorm|silu|rotary|decode|sample|prefill|int8|int4'; \
                   ls python_tests/test_*.py | grep -vE 'rmsnorm|silu|rotary|decode|sample|prefill|int8|int4')}
  # Files run side by side (own processes and CUDA contexts; the GPU has room
  # for several), each into its own log; logs and summary lines are then
  # gathered in file order.
  run_file() {  # test file, its index
    local f=$1 i=$2 rc line
    FASTLLM_EXPECT_C=1 timeout -k 10 "$limit" pytest "$f" -q -rs -p no:cacheprovider > "$tmp/test_$i.log" 2>&1
    rc=$?
    line=$(tail -1 "$tmp/test_$i.log")
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && line="TIMEOUT after ${limit}s"
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
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  echo "== compute-sanitizer memcheck (${san:-not found})"
  : > "$out/sanitizer.log"
  if [ -n "$san" ]; then
    # -P: not the source tree first on sys.path (its fastllm has no _C: every GPU test would skip)
    for f in $(ls python_tests/test_*.py | grep -E 'rmsnorm|silu|rotary|decode|sample|prefill|int8|int4'); do
      echo "---- $f" >> "$out/sanitizer.log"
      FASTLLM_EXPECT_C=1 timeout -k 10 "$limit" "$san" --tool memcheck --error-exitcode 99 --print-limit 20 \
        python3 -P -m pytest "$f" -q -x -p no:cacheprovider ${SANITIZE_K:-} >> "$out/sanitizer.log" 2>&1
      rc=$?
      [ $rc -ne 0 ] && status=1
      printf 'sanitize %-36s rc=%s\n' "$f" "$rc" | tee -a "$out/test_summary.txt"
    done
  fi
fi

blimit=${BENCH_TIMEOUT:-360}
echo "== benchmarks (per file, ${blimit}s limit)"
: > "$out/bench.log"
bench_files=()
for a in "${bench_args[@]}"; do
  # kernels first, the whole-loop generation benchmark (the longest) last
  if [ -d "$a" ]; then bench_files+=($(ls "$a"/bench_*.py | grep -v bench_generate) $(ls "$a"/bench_generate.py));
  else bench_files+=("$a"); fi
done
i=0
for f in "${bench_files[@]}"; do
  i=$((i + 1))
  echo "---- $f" >> "$out/bench.log"
  FASTLLM_KERNELS=${BENCH_KERNELS-all} timeout -k 10 "$blimit" pytest "$f" --benchmark-only --benchmark-json="$tmp/bench_$i.json" -s -q \
    -p no:cacheprovider >> "$out/bench.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then status=1; echo "$f: rc=$rc" | tee -a "$out/bench.log"; fi
done
grep -E "^(rmsnorm|generate|linear|int8_linear|int4_linear|prefill_attention|decode_attention|sample|silu|rotary)|passed|failed|error" \
  "$out/bench.log" | tail -200
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
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no benchmark json: {e}")
print(f"{'benchmark':70s} {'us/call':>10s} {'GB/s':>8s} {'TFLOP/s':>8s} {'tok/s':>8s}")
for b in data["benchmarks"]:
    e = b.get("extra_info", {})
    us = e.get("us_per_call", b["stats"]["median"] * 1e6)
    print(f"{b['name'][:70]:70s} {us:10.2f} {e.get('GBps', float('nan')):8.1f} {e.get('TFLOPs', float('nan')):8.1f} "
          f"{e.get('tok_per_s', float('nan')):8.1f}")
PY

# End to end on the shipped model (fastllm bench), bf16: the reference ops,
# every kernel opted in, and kernels + CUDA graphs. Appended to summary.txt.
if [ "${SKIP_E2E:-0}" != 1 ]; then
  echo "== fastllm bench (shipped model, bf16)" | tee -a "$out/summary.txt"
  for mode in reference kernels kernels+graphs; do
    kernels=""; graphs=""
    [ "$mode" != reference ] && kernels=${BENCH_KERNELS-all}
    [ "$mode" = kernels+graphs ] && graphs=--cuda-graphs
    echo "-- $mode" | tee -a "$out/summary.txt"
    # from / so that the installed package (with _C) is imported, not this source tree
    (cd / && FASTLLM_KERNELS=$kernels timeout -k 10 "$limit" python3 -m fastllm.cli bench --device cuda \
      --dtype bfloat16 --input-len 128 --output-len 128 $graphs 2>&1) | tail -4 | tee -a "$out/summary.txt"
  done
fi
exit $status
