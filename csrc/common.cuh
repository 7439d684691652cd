/*
 * Shared device helpers for fastllm's kernels: dtype dispatch (fp32/fp16/bf16),
 * 16-byte vector loads and stores, warp and block reductions, ceil_div, and the
 * error-return convention of the launchers (nullptr = success).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fastllm {

// Returns the CUDA error string from a launcher if `expr` failed.
#define FASTLLM_RETURN_IF_ERROR(expr)                         \
  do {                                                         \
    cudaError_t _err = (expr);                                 \
    if (_err != cudaSuccess) return cudaGetErrorString(_err);  \
  } while (0)

// Checks the launch just made (bad configuration, no device, ...).
#define FASTLLM_CHECK_LAUNCH() FASTLLM_RETURN_IF_ERROR(cudaGetLastError())

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Runs `body` with `scalar_t` bound to the C++ type of `dtype`; returns an error
// string for an unknown dtype.
#define FASTLLM_DISPATCH_FLOAT(dtype, ...)                                  \
  [&]() -> const char* {                                                    \
    switch (static_cast<DType>(dtype)) {                                    \
      case DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); } \
      case DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); } \
      case DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                       \
    return "unsupported dtype code";                                        \
  }()

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
};

__device__ __forceinline__ float warp_reduce_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a
// multiple of 32 (at most 1024). Uses 32 floats of shared memory.
__device__ __forceinline__ float block_reduce_sum(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_reduce_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  x = lane < nwarps ? partial[lane] : 0.f;
  x = warp_reduce_sum(x);
  __syncthreads();  // partial[] may be reused by a later reduction
  return x;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Kernels with more than 48 KB of dynamic shared memory must opt in, once per device.
template <auto Kernel>
const char* opt_in_smem(int bytes) {
  if (bytes <= 48 * 1024) return nullptr;
  constexpr int kMaxDevices = 64;
  static bool done[kMaxDevices] = {};
  int dev = 0;
  FASTLLM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kMaxDevices && done[dev]) return nullptr;
  FASTLLM_RETURN_IF_ERROR(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (dev >= 0 && dev < kMaxDevices) done[dev] = true;
  return nullptr;
}

// Whether Kernel, compiled for sm_90a, runs on the current device: sm_90a code
// runs on compute capability 9.0 only, and the device must load the sm_90a
// binary (not a JIT of older PTX, whose body the sm_90a guards leave empty).
// Cached per device once the device answered.
template <auto Kernel>
bool sm90a_loadable() {
  constexpr int kMaxDevices = 64;
  static int usable[kMaxDevices];  // 0 = not asked yet, 1 = yes, 2 = no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  if (usable[dev] == 0) {
    int major = 0, minor = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, Kernel) == cudaSuccess;
    if (!ok) {
      cudaGetLastError();
      return false;  // not cached: asked again next time
    }
    usable[dev] = major == 9 && minor == 0 && attr.binaryVersion == 90 ? 1 : 2;
  }
  return usable[dev] == 1;
}

}  // namespace fastllm
