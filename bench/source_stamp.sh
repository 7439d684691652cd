#!/usr/bin/env bash
# A stamp of what fastllm._C is built from: the CUDA architectures (argument 1)
# and a hash of csrc/ and CMakeLists.txt. bench/prebuild.sh writes it beside a
# prebuilt module; bench/run_gpu.sh uses that module only if the stamps match.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "archs=${1:?usage: source_stamp.sh ARCHS}"
find csrc CMakeLists.txt -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
