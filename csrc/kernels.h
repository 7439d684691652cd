// Host-side declarations of every kernel launcher: plain C++ types only, so
// that bindings.cpp compiles with the host compiler and no CUDA headers.
// Each launcher returns nullptr on success or a static error string.
#pragma once
#include <cstdint>

namespace fastllm {

// Element types the kernels accept; the values are shared with fastllm/ops/cuda.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = rmsnorm(x) * w over rows of length `cols`. With `residual` non-null:
// h = x + residual (rounded to the dtype) is written to `residual_out` and y is
// the rmsnorm of h. `stream` is a cudaStream_t.
const char* launch_rmsnorm(void* out, void* residual_out, const void* x, const void* residual,
                           const void* weight, int64_t rows, int64_t cols, float eps, int dtype,
                           void* stream);

}  // namespace fastllm
