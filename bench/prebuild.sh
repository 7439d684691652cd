#!/usr/bin/env bash
# Build fastllm._C here for the GPU host's Python, so that a GPU round spends
# no device time compiling (about 80 s of nvcc on 16 cores, minutes on 2).
# Usage: bash bench/prebuild.sh [PYTHON]   (default: a python3.12, the GPU host's)
# Writes gpu_prebuilt/ (git-ignored): the extension module, stamp.txt (a hash
# of csrc/ and CMakeLists.txt) and commit.txt. Then carry it:
#   device run: command "bash bench/run_gpu.sh $OUT", carry ["gpu_prebuilt"]
# run_gpu.sh uses the module only if its stamp matches the sources it was
# sent and it imports there (another glibc or Python ABI: it builds instead).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-$(command -v python3.12 || true)}
[ -n "$py" ] || { echo "no python3.12 here: pass the interpreter matching the GPU host's Python"; exit 2; }
"$py" -c "import pybind11" 2>/dev/null || "$py" -m pip install -q pybind11
archs=${FASTLLM_CUDA_ARCHS:-90a}
build=${BUILD_DIR:-/tmp/fastllm-prebuild-$("$py" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON -DFASTLLM_CUDA_ARCHS="$archs" \
  -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" > /dev/null
cmake --build "$build" -j "$(nproc)"
rm -rf gpu_prebuilt && mkdir gpu_prebuilt
cp "$build"/_C*.so gpu_prebuilt/
bash bench/source_stamp.sh "$archs" > gpu_prebuilt/stamp.txt
echo "$(git rev-parse HEAD) $(git status --porcelain -- csrc CMakeLists.txt | grep -q . && echo '(csrc dirty)')" > gpu_prebuilt/commit.txt
ls -la gpu_prebuilt
