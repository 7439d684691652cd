/*
 * SwiGLU gate: out[m, i] = silu(x[m, i]) * x[m, d + i] for x [M, 2d] -> out [M, d].
 *
 * Elementwise and memory bound: each element of x is read once and each output
 * written once (3 * M * d elements moved). Grid: (rows, column chunks); each
 * thread handles one 16-byte vector of the gate half and the matching vector
 * of the up half. fp32 arithmetic with the accurate expf (the kernel is bound
 * by memory, not by the exponential). Rows whose d is not a whole number of
 * vectors, or misaligned pointers, take the scalar path.
 */
#include "common.cuh"

namespace fastllm {
namespace {

__device__ __forceinline__ float silu(float a) { return a / (1.f + expf(-a)); }

template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int d) {
  const int64_t row = blockIdx.x;
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= d) return;
  const T* gate = x + row * 2 * d;
  const T* up = gate + d;
  Vec<T, VEC> g, u, o;
  g.load(gate + i);
  u.load(up + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(silu(to_float(g.v[j])) * to_float(u.v[j]));
  o.store(out + row * d + i);
}

template <typename T>
const char* launch_typed(T* out, const T* x, int64_t rows, int d, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int threads = 256;
  if (d % VEC == 0 && aligned16(out) && aligned16(x)) {
    const dim3 grid(static_cast<unsigned>(rows), ceil_div(d / VEC, threads));
    silu_and_mul_kernel<T, VEC><<<grid, threads, 0, stream>>>(out, x, d);
  } else {
    const dim3 grid(static_cast<unsigned>(rows), ceil_div(d, threads));
    silu_and_mul_kernel<T, 1><<<grid, threads, 0, stream>>>(out, x, d);
  }
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

}  // namespace

const char* launch_silu_and_mul(void* out, const void* x, int64_t rows, int64_t d, int dtype, void* stream) {
  if (rows == 0 || d == 0) return nullptr;
  if (d < 0 || d > (1LL << 30)) return "d out of range";
  if (rows < 0 || rows > 0x7fffffffLL) return "rows out of range";
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    return launch_typed<scalar_t>(static_cast<scalar_t*>(out), static_cast<const scalar_t*>(x), rows,
                                  static_cast<int>(d), static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastllm
