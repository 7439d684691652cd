/*
 * Rotary position embedding (NeoX layout, as Llama), applied in place to the
 * query and key heads of each token:
 *   x = [x1, x2] (halves of a head vector),  c, s = cos/sin(pos * inv_freq)
 *   x1' = x1 c - x2 s,   x2' = x2 c + x1 s
 * The angles come from a precomputed fp32 table [max_pos, D] (cos for the D/2
 * frequencies, then sin), indexed by each token's position read from device
 * memory (so the launch can be captured in a CUDA graph).
 *
 * One block per token; its threads walk the (head, frequency) pairs of q and
 * then k. Each element of q and k is read and written once, the table row once
 * per token (from L2 after the first head). q and k may be strided views of a
 * fused qkv projection: any token stride, head stride and contiguous last dim.
 * A position outside [0, max_pos) leaves that token unrotated (the model never
 * produces one; the reference raises).
 */
#include "common.cuh"

namespace fastllm {
namespace {

template <typename T>
__device__ __forceinline__ void rotate_heads(T* base, int64_t head_stride, int heads, int half, const float* cs,
                                             int tid, int nthreads) {
  for (int idx = tid; idx < heads * half; idx += nthreads) {
    const int h = idx / half, i = idx - h * half;
    T* x = base + h * head_stride;
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float c = cs[i], s = cs[half + i];
    x[i] = from_float<T>(x1 * c - x2 * s);
    x[i + half] = from_float<T>(x2 * c + x1 * s);
  }
}

template <typename T>
__global__ void rotary_kernel(T* q, T* k, const int64_t* __restrict__ positions, const float* __restrict__ table,
                              int64_t q_token_stride, int64_t q_head_stride, int64_t k_token_stride,
                              int64_t k_head_stride, int hq, int hk, int head_dim, int64_t max_pos) {
  const int64_t token = blockIdx.x;
  const int64_t pos = positions[token];
  if (pos < 0 || pos >= max_pos) return;
  const float* cs = table + pos * head_dim;
  const int half = head_dim / 2;
  rotate_heads(q + token * q_token_stride, q_head_stride, hq, half, cs, threadIdx.x, blockDim.x);
  rotate_heads(k + token * k_token_stride, k_head_stride, hk, half, cs, threadIdx.x, blockDim.x);
}

}  // namespace

const char* launch_rotary_embedding(void* q, void* k, const void* positions, const void* cos_sin_cache,
                                    int64_t num_tokens, int64_t q_token_stride, int64_t q_head_stride,
                                    int64_t k_token_stride, int64_t k_head_stride, int64_t num_q_heads,
                                    int64_t num_k_heads, int64_t head_dim, int64_t max_pos, int dtype, void* stream) {
  if (num_tokens == 0) return nullptr;
  if (head_dim <= 0 || head_dim % 2 || head_dim > 4096) return "head_dim must be even and in (0, 4096]";
  if (num_tokens > 0x7fffffffLL) return "too many tokens";
  const int64_t pairs = (num_q_heads > num_k_heads ? num_q_heads : num_k_heads) * (head_dim / 2);
  const int threads = pairs >= 512 ? 512 : static_cast<int>(ceil_div<int64_t>(pairs, 32) * 32);
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    rotary_kernel<scalar_t><<<static_cast<unsigned>(num_tokens), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<scalar_t*>(q), static_cast<scalar_t*>(k), static_cast<const int64_t*>(positions),
        static_cast<const float*>(cos_sin_cache), q_token_stride, q_head_stride, k_token_stride, k_head_stride,
        static_cast<int>(num_q_heads), static_cast<int>(num_k_heads), static_cast<int>(head_dim), max_pos);
    FASTLLM_CHECK_LAUNCH();
    return static_cast<const char*>(nullptr);
  });
}

}  // namespace fastllm
