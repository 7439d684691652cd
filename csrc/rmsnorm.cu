/*
 * RMSNorm, optionally fused with the residual add that precedes it.
 *
 *   h = x + residual            (rounded to the storage dtype; fused variant only)
 *   y = h * rsqrt(mean(h^2) + eps) * w      (fp32 arithmetic)
 *
 * One thread block per row. Each thread loads its share of the row as 16-byte
 * vectors and keeps it in registers (up to 4 vectors per thread, so rows up to
 * 4096 vectors: 32k bf16 elements), reduces the sum of squares across the
 * block (warp shuffles, then 32 partials in shared memory), and writes y from
 * the registers. Memory traffic is the minimum: x (and residual) read once, y
 * (and h) written once, w read once per row from L2. Rows that are not a whole
 * number of 16-byte vectors, or misaligned pointers, take a scalar path, and
 * rows longer than the register budget a two-pass loop that re-reads the row
 * (from L2) instead of keeping it in registers.
 */
#include "common.cuh"

namespace fastllm {
namespace {

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(1024) rmsnorm_registers(T* __restrict__ out, T* __restrict__ res_out,
                                                          const T* __restrict__ x, const T* __restrict__ res,
                                                          const T* __restrict__ w, int cols, float eps) {
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  const int nvec = cols / VEC;
  Vec<T, VEC> h[ITEMS];
  float ss = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int i = threadIdx.x + it * blockDim.x;
    if (i < nvec) {
      h[it].load(x + offset + i * VEC);
      if (res != nullptr) {
        Vec<T, VEC> r;
        r.load(res + offset + i * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) h[it].v[j] = from_float<T>(to_float(h[it].v[j]) + to_float(r.v[j]));
        h[it].store(res_out + offset + i * VEC);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(h[it].v[j]);
        ss += f * f;
      }
    }
  }
  const float inv = rsqrtf(block_reduce_sum(ss) / cols + eps);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int i = threadIdx.x + it * blockDim.x;
    if (i < nvec) {
      Vec<T, VEC> wv, o;
      wv.load(w + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(to_float(h[it].v[j]) * inv * to_float(wv.v[j]));
      o.store(out + offset + i * VEC);
    }
  }
}

// Any row length, any alignment: scalar accesses, two passes over the row.
template <typename T>
__global__ void __launch_bounds__(1024) rmsnorm_two_pass(T* __restrict__ out, T* __restrict__ res_out,
                                                         const T* __restrict__ x, const T* __restrict__ res,
                                                         const T* __restrict__ w, int cols, float eps) {
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  float ss = 0.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    T v = x[offset + i];
    if (res != nullptr) {
      v = from_float<T>(to_float(v) + to_float(res[offset + i]));
      res_out[offset + i] = v;
    }
    const float f = to_float(v);
    ss += f * f;
  }
  const float inv = rsqrtf(block_reduce_sum(ss) / cols + eps);
  const T* h = res != nullptr ? res_out : x;  // each thread re-reads only what it wrote
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    out[offset + i] = from_float<T>(to_float(h[offset + i]) * inv * to_float(w[i]));
  }
}

inline int threads_for(int64_t work_items) {
  const int64_t t = ceil_div<int64_t>(work_items, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

template <typename T>
const char* launch_typed(T* out, T* res_out, const T* x, const T* res, const T* w, int64_t rows, int cols,
                         float eps, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorised = cols % VEC == 0 && aligned16(out) && aligned16(x) && aligned16(w) &&
                          (res == nullptr || (aligned16(res) && aligned16(res_out)));
  const int64_t nvec = vectorised ? cols / VEC : 0;
  const dim3 grid(static_cast<unsigned>(rows));
  if (vectorised && nvec <= 1024) {
    rmsnorm_registers<T, VEC, 1><<<grid, threads_for(nvec), 0, stream>>>(out, res_out, x, res, w, cols, eps);
  } else if (vectorised && nvec <= 2048) {
    rmsnorm_registers<T, VEC, 2><<<grid, threads_for(ceil_div<int64_t>(nvec, 2)), 0, stream>>>(out, res_out, x, res, w, cols, eps);
  } else if (vectorised && nvec <= 4096) {
    rmsnorm_registers<T, VEC, 4><<<grid, 1024, 0, stream>>>(out, res_out, x, res, w, cols, eps);
  } else if (cols <= 1024) {
    rmsnorm_registers<T, 1, 1><<<grid, threads_for(cols), 0, stream>>>(out, res_out, x, res, w, cols, eps);
  } else {
    rmsnorm_two_pass<T><<<grid, 1024, 0, stream>>>(out, res_out, x, res, w, cols, eps);
  }
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

}  // namespace

const char* launch_rmsnorm(void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                           int64_t rows, int64_t cols, float eps, int dtype, void* stream) {
  if (rows == 0) return nullptr;
  if (cols <= 0 || cols > (1LL << 30)) return "cols out of range";
  if (rows > 0x7fffffffLL) return "too many rows";
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    return launch_typed<scalar_t>(static_cast<scalar_t*>(out), static_cast<scalar_t*>(residual_out),
                                  static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(residual),
                                  static_cast<const scalar_t*>(weight), rows, static_cast<int>(cols), eps,
                                  static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastllm
