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

// out [rows, d] = silu(x[:, :d]) * x[:, d:] for x [rows, 2d], both contiguous.
const char* launch_silu_and_mul(void* out, const void* x, int64_t rows, int64_t d, int dtype, void* stream);

// In-place NeoX rotary embedding of q [tokens, Hq, D] and k [tokens, Hk, D]
// (element strides given; last dim contiguous) from an fp32 cos/sin table
// [max_pos, D] at int64 positions [tokens].
const char* launch_rotary_embedding(void* q, void* k, const void* positions, const void* cos_sin_cache,
                                    int64_t num_tokens, int64_t q_token_stride, int64_t q_head_stride,
                                    int64_t k_token_stride, int64_t k_head_stride, int64_t num_q_heads,
                                    int64_t num_k_heads, int64_t head_dim, int64_t max_pos, int dtype, void* stream);

}  // namespace fastllm
