#!/usr/bin/env bash
# One GPU round: build the extension, run every test, run the benchmarks.
# Usage: bash bench/run_gpu.sh OUTDIR [PYTEST_BENCH_ARGS...]
#   logs and bench.json land in OUTDIR (<= 8 files); extra arguments select
#   benchmarks, e.g. `bash bench/run_gpu.sh $OUT bench/bench_rmsnorm.py`.
#   SKIP_TESTS=1 skips the test phase (a second call after a first full one).
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
python3 -c "import fastllm, json; print(json.dumps(fastllm.backend_info(), indent=1))" | tee -a "$out/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests"
  FASTLLM_EXPECT_C=1 pytest python_tests -q -rs --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1 || status=1
  grep -E "FAILED|ERROR" "$out/tests.log" | head -40
  tail -3 "$out/tests.log"
fi

echo "== benchmarks"
pytest "${bench_args[@]}" --benchmark-only --benchmark-json="$out/bench.json" -s > "$out/bench.log" 2>&1 || status=1
grep -E "^(rmsnorm|generate|linear|int8_linear|int4_linear|prefill_attention)|passed|failed|error" "$out/bench.log" | tail -160

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
exit $status
