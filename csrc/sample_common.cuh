/*
 * Device pieces shared by the sampling kernels (sample.cu: variant 0,
 * sample_v1.cuh: variant 1, sample_argmax.cu): constants, the status codes,
 * the group of blocks that samples one row (a thread-block cluster on sm_90),
 * block scan, argmax merge and the fixed-point mass; on the host, the cluster
 * launch configuration and the sm_90-code query. Included by .cu files
 * only; everything is internal to each translation unit.
 */
#pragma once

#include <cooperative_groups.h>

#include <cfloat>
#include <climits>

#include "common.cuh"
#include "philox.cuh"

namespace fastllm {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 1024;                      // histogram bins per radix level (10 bits)
constexpr int kMaxGroup = 16;
constexpr uint32_t kKeyMax = 0x3F800000u;        // bit pattern of 1.0f, the largest q
constexpr float kMassScale = 1099511627776.0f;  // 2^40: fixed-point scale of a mass
constexpr uint32_t kSampleStream = 0x73616d70u;  // Philox counter word that names this use ("samp")
constexpr unsigned kFull = 0xffffffffu;

constexpr int64_t kNaN = -1, kAllNegInf = -2, kBadParams = -3;

using u64 = unsigned long long;

// The blocks sampling one row. G == 1 is a plain block (any architecture);
// G > 1 is a thread-block cluster (sm_90+, launched only there).
template <int G>
struct Group {
  static __device__ __forceinline__ void sync() {
    if constexpr (G == 1) {
      __syncthreads();
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cg::this_cluster().sync();
#else
      __trap();
#endif
    }
  }
  // sync() in two halves (G > 1): arrive once this thread's accesses to its
  // peers are done, wait before what must follow every arrival (the exit).
  static __device__ __forceinline__ void arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (G > 1) __cluster_barrier_arrive();
#else
    if constexpr (G > 1) __trap();
#endif
  }
  static __device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (G > 1) __cluster_barrier_wait();
#else
    if constexpr (G > 1) __trap();
#endif
  }
  // The same shared-memory object in block `rank` of the group.
  template <typename P>
  static __device__ __forceinline__ P* peer(P* p, int rank) {
    if constexpr (G == 1) {
      return p;
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      return cg::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
#else
      __trap();
      return p;
#endif
    }
  }
};

struct ScanScratch {
  uint32_t c[kWarps + 1];
  u64 m[kWarps + 1];
};

// Inclusive scan over the warp's lanes in lane order.
__device__ __forceinline__ void warp_scan(uint32_t& c, u64& m) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t c2 = __shfl_up_sync(kFull, c, o);
    const u64 m2 = __shfl_up_sync(kFull, m, o);
    if (lane >= o) {
      c += c2;
      m += m2;
    }
  }
}

// Inclusive scan of (c, m) over the block in thread order; totals to *tc, *tm.
// Every thread of the block must call it.
__device__ __forceinline__ void block_scan(uint32_t& c, u64& m, ScanScratch& s, uint32_t& tc, u64& tm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_scan(c, m);
  if (lane == 31) {
    s.c[warp] = c;
    s.m[warp] = m;
  }
  __syncthreads();
  if (warp == 0) {
    const uint32_t c0 = s.c[lane];
    const u64 m0 = s.m[lane];
    uint32_t wc = c0;
    u64 wm = m0;
    // warp_scan's loop, written out: calling it here changes variant 0's SASS
    // (GPU-verified), which a change without a GPU keeps as it is.
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t c2 = __shfl_up_sync(kFull, wc, o);
      const u64 m2 = __shfl_up_sync(kFull, wm, o);
      if (lane >= o) {
        wc += c2;
        wm += m2;
      }
    }
    s.c[lane] = wc - c0;
    s.m[lane] = wm - m0;
    if (lane == 31) {
      s.c[kWarps] = wc;
      s.m[kWarps] = wm;
    }
  }
  __syncthreads();
  c += s.c[warp];
  m += s.m[warp];
  tc = s.c[kWarps];
  tm = s.m[kWarps];
  __syncthreads();  // s is free again
}

// (value, index) max with the lowest index on ties.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) argmax_merge(v, i, __shfl_xor_sync(kFull, v, o), __shfl_xor_sync(kFull, i, o));
}

__device__ __forceinline__ u64 mass_of(float q) { return __float2ull_rn(q * kMassScale); }

// top-p's target mass, out of `total` (the mass top-k kept), at fp32
// resolution of top_p, as the reference compares fp32 probabilities: a mass
// above q_i whose fraction of the total rounds to top_p in fp32 reaches top_p.
// Without this, probs 0.4 / 0.2 / 0.2 / 0.2 and top_p = 0.4 (0.4f > 0.4) keep
// all four tokens when __expf gives the 0.2 tokens q = 0.5 exactly, and only
// the first one when it rounds to 0.49999997. The edge is the midpoint between
// top_p and the float below it (exact in double), so the test is
// fl32(above / total) < top_p. At least 1, at most total.
__device__ __forceinline__ u64 top_p_target(float tp, u64 total) {
  const double edge = 0.5 * (static_cast<double>(tp) + static_cast<double>(nextafterf(tp, 0.f)));
  const double want = ceil(edge * static_cast<double>(total));
  const u64 tgt = want >= static_cast<double>(total) ? total : static_cast<u64>(want);
  return tgt < 1 ? 1 : tgt;
}

struct Threshold {
  uint32_t key;  // keep q with bits(q) >= key
  u64 mass;      // total mass kept by this filter alone
};

// ---- host side --------------------------------------------------------------
// A launch of `rows` rows of `group` blocks, each row one thread-block cluster
// along x, for cudaLaunchKernelEx / cudaOccupancyMaxActiveClusters. Not
// copyable: config.attrs points at attr.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1] = {};
  ClusterLaunch(int group, int rows, int threads, size_t smem, cudaStream_t stream) {
    config.gridDim = dim3(group, rows);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = group;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Whether `kernel` in this binary is sm_90+ code (it can run as clusters), not
// a JIT of older PTX: 1 or 0, or -1 when the query failed (ask again later).
template <typename K>
int cluster_code_of(K kernel) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attr.binaryVersion >= 90 && (attr.ptxVersion == 0 || attr.ptxVersion >= 90) ? 1 : 0;
}

}  // namespace
}  // namespace fastllm
