#!/usr/bin/env bash
# Nsight Compute on the kernels of one call per case (bench/profile_kernels.py).
# Usage: bash bench/profile_gpu.sh OUTDIR [CASES...]
#   (default cases: `python3 bench/profile_kernels.py --list`; names like
#   decode_B1x4096_s16_v1 or int4_M1_14336x4096_s4 pick knobs, see its docstring)
# Writes OUTDIR/profile_summary.txt (per kernel: duration, DRAM / SM throughput,
# achieved and theoretical occupancy and its limiter, registers, top warp
# stalls, ncu's OPT/WRN advice) and OUTDIR/profile.tar.gz (per case: CASE.txt,
# ncu's --page details; CASE.raw.csv, --page raw; CASE.log, the run; CASE.ncu-rep
# when under PROFILE_MAX_REP_KB, default 2048). Two files: the device tool
# returns 8 at most.
# ncu runs with --clock-control none, --target-processes all, kernel replay
# with caches flushed before each pass (ncu's default: cold, as the benchmarks'
# us/call), --profile-from-start off (the driver brackets the profiled call with
# cudaProfilerStart/Stop; if that profiles nothing it retries with the NVTX
# range `profile/`). Sections: PROFILE_SECTIONS (default below), those that this
# ncu lists. PROFILE_CASE_TIMEOUT (60 s) per case; PROFILE_BUDGET (s, default 900)
# for the whole script: cases that do not fit are listed as not run.
# Without ncu, or where it cannot read the counters (gVisor: LibraryNotLoaded;
# ERR_NVGPUCTRPERM), the summary says so and, if torch sees a GPU, holds
# torch.profiler's kernel lines instead (grid, block, registers, shared memory,
# estimated occupancy, durations). PROFILE_KINETO=1 adds them in any case.
# Always exits 0.
set -uo pipefail
start=$SECONDS
out=${1:?usage: bash bench/profile_gpu.sh OUTDIR [cases...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
driver=$PWD/bench/profile_kernels.py
budget=${PROFILE_BUDGET:-900}
case_limit=${PROFILE_CASE_TIMEOUT:-60}
max_kb=${PROFILE_MAX_REP_KB:-2048}
left() { echo $((budget - (SECONDS - start))); }
cases=("$@")
[ ${#cases[@]} -eq 0 ] && read -r -a cases <<< "$(python3 "$driver" --list)"
work=$out/profile
rm -rf "$work"
mkdir -p "$work"
summary=$out/profile_summary.txt

ncu=$(command -v ncu || true)
if [ -z "$ncu" ]; then
  ncu=$(ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu /usr/local/cuda*/nsight-compute*/ncu 2>/dev/null \
        | sort -V | tail -1)
fi
status=""
usable=0
if [ -z "$ncu" ] || [ ! -x "$ncu" ]; then
  status="not found (PATH, /opt/nvidia/nsight-compute/*/ncu, /usr/local/cuda*/bin/ncu): no hardware counters"
elif ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  status="$ncu is here, but no GPU (nvidia-smi fails or is missing): nothing profiled"
else
  usable=1
  status="$("$ncu" --version 2>&1 | tail -1) at $ncu"
fi
echo "== profile: ncu: $status; cases: ${cases[*]}"

if [ $usable = 1 ]; then
  help=$("$ncu" --help 2>&1)
  listed=$("$ncu" --list-sections 2>&1)
  sec_args=()
  for s in ${PROFILE_SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables ComputeWorkloadAnalysis LaunchStats Occupancy SchedulerStats WarpStateStats SourceCounters}; do
    if grep -Eq "(^|[[:space:]])$s([[:space:]]|$)" <<< "$listed"; then sec_args+=(--section "$s");
    else echo "profile: section $s is not in this ncu's --list-sections: left out"; fi
  done
  [ ${#sec_args[@]} -eq 0 ] && sec_args=(--section SpeedOfLight)  # --list-sections failed: ncu says why below
  details=(); grep -q -- "--print-details" <<< "$help" && details=(--print-details all)
  units=(); grep -q -- "--print-units" <<< "$help" && units=(--print-units base)
  mode=start  # cudaProfilerStart/Stop; nvtx once that profiles nothing
  for c in "${cases[@]}"; do
    t=$case_limit; [ "$(left)" -lt $((t + 10)) ] && t=$(( $(left) - 10 ))
    if [ "$t" -lt 15 ]; then echo "not run: out of time (PROFILE_BUDGET ${budget}s)" > "$work/$c.log"; echo "profile $c: out of time"; continue; fi
    for attempt in 1 2; do
      if [ $mode = start ]; then filt=(--profile-from-start off); else filt=(--nvtx --nvtx-include "profile/"); fi
      rm -f "$work/$c.ncu-rep"
      t0=$SECONDS
      timeout -k 5 "$t" "$ncu" --clock-control none --target-processes all "${filt[@]}" "${sec_args[@]}" \
        -f -o "$work/$c" python3 -P "$driver" "$c" > "$work/$c.log" 2>&1
      rc=$?
      { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo "TIMEOUT after ${t}s (PROFILE_CASE_TIMEOUT)" >> "$work/$c.log"
      echo "profile $c: rc=$rc in $((SECONDS - t0))s (filter: $mode)"
      if [ ! -f "$work/$c.ncu-rep" ] && [ $mode = start ] && [ $attempt = 1 ] && grep -q "^PROFILED:" "$work/$c.log" \
         && grep -q "No kernels were profiled" "$work/$c.log"; then
        echo "profile: cudaProfilerStart profiled nothing: the NVTX range from now on"; mode=nvtx; continue
      fi
      break
    done
    if grep -Eq "LibraryNotLoaded|ERR_NVGPUCTRPERM|Failed to initialize the profiler|not supported on this" "$work/$c.log"; then
      usable=0
      status="$status; it cannot profile here: $(grep -Eo "[^=]*(LibraryNotLoaded|ERR_NVGPUCTRPERM|Failed to initialize the profiler|not supported on this)[^.]*" "$work/$c.log" | head -1)"
      echo "profile: $status"
      break
    fi
    if [ -f "$work/$c.ncu-rep" ]; then
      "$ncu" --import "$work/$c.ncu-rep" --print-summary none --page details "${details[@]}" > "$work/$c.txt" 2>&1
      "$ncu" --import "$work/$c.ncu-rep" --page raw --csv "${units[@]}" > "$work/$c.raw.csv" 2>&1
      kb=$(( $(stat -c %s "$work/$c.ncu-rep") / 1024 ))
      if [ "$kb" -gt "$max_kb" ]; then rm -f "$work/$c.ncu-rep"; echo "($c.ncu-rep: ${kb} KB > ${max_kb}: deleted, the text kept)" >> "$work/$c.log"; fi
    fi
  done
fi

# torch.profiler's kernel records where ncu gave nothing (or on request)
if [ $usable = 0 ] || [ "${PROFILE_KINETO:-0}" = 1 ]; then
  t=$(( $(left) - 10 )); [ "$t" -gt 120 ] && t=120
  if [ "$t" -ge 20 ] && python3 -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "== profile: torch.profiler kernel lines (${t}s at most)"
    timeout -k 5 "$t" python3 -P "$driver" --kineto "${cases[@]}" > "$work/kineto.txt" 2>&1
  else
    echo "no GPU visible to torch (or out of time): no torch.profiler lines either" > "$work/kineto.txt"
  fi
fi

{
  echo "profile_gpu.sh $(date -u +%FT%TZ), $((SECONDS - start)) s"
  python3 "$driver" --summarize "$work" --status "$status" "${cases[@]}" 2>&1
  if [ -f "$work/kineto.txt" ]; then echo; echo "== torch.profiler (no hardware counters)"; cat "$work/kineto.txt"; fi
} > "$summary"
cat "$summary"

# one archive: the device tool returns 8 files at most (16 MiB each)
if [ -n "$(ls -A "$work")" ]; then
  tar -czf "$out/profile.tar.gz" -C "$out" profile 2>/dev/null
  if [ "$(stat -c %s "$out/profile.tar.gz" 2>/dev/null || echo 0)" -gt $((15 << 20)) ]; then
    tar -czf "$out/profile.tar.gz" -C "$out" --exclude='*.ncu-rep' profile 2>/dev/null
    echo "(profile.tar.gz without the .ncu-rep files: over 15 MB with them)" | tee -a "$summary"
  fi
fi
rm -rf "$work"
echo "profile done in $((SECONDS - start)) s: $summary, $out/profile.tar.gz"
exit 0
