/*
 * Greedy decoding: the argmax of each row of logits [B, V] (fp32/fp16/bf16)
 * -> int64 [B], the lowest id on ties (reference.sample at temperature 0 and
 * torch.argmax). A row with NaN gets kNaN (-1), a row whose logits are all
 * -inf kAllNegInf (-2): sample's status codes, checked in the same order. No
 * sampling parameter is read: a caller routes rows here because their
 * temperature is 0, and the reference does not check the other parameters of
 * greedy rows either (so kBadParams never comes from this kernel).
 *
 * Why a separate kernel: for all-greedy steps the sampler still sizes a group
 * of 1024-thread blocks per row and caches the row in shared memory (one
 * block per SM), which is far from the bandwidth a plain reduction reaches
 * (H200, V = 128256 fp32, B = 256: 84 us against torch.argmax's 51 us; the
 * read itself is 131 MB, ~30 us at 4.4 TB/s).
 *
 * Algorithm: a row is split over G blocks of 512 threads (a thread-block
 * cluster on sm_90, G = 1, 2, 4, 8, the smallest with B * G >= twice the SM
 * count, keeping chunks of at least 4096 values; one block per row without
 * clusters). Each thread keeps 4 16-byte loads in flight and reduces each
 * batch of 4 vectors to its max with a NaN-propagating max (one instruction
 * per fp32 value, one per two fp16/bf16 values: a read at full bandwidth
 * leaves about one instruction per value); only when that max is not <= the
 * thread's running max (a new max, or a NaN) does it visit the batch value by
 * value. Threads visit their values in increasing index order, so a strict >
 * keeps the lowest index, and the merges across threads, warps and blocks
 * break ties by index. The G blocks combine through distributed shared
 * memory. Memory traffic: one read of the logits, no shared-memory cache, no
 * workspace.
 */
#include "sample_common.cuh"

namespace fastllm {
namespace {

constexpr int kArgmaxThreads = 512;
constexpr int kArgmaxWarps = kArgmaxThreads / 32;
constexpr int kArgmaxInFlight = 4;  // 16-byte loads per thread issued before the first is used
constexpr int kArgmaxMaxGroup = 8;  // the portable cluster size
constexpr int kArgmaxMinChunk = 4096;

struct ArgmaxShared {
  float v[kArgmaxWarps];
  int i[kArgmaxWarps];
  float x_v;  // this block's result, read by the group's first block
  int x_i;
  int x_nan;
};

// max that returns NaN when either input is NaN (sm_80+).
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The max of a batch of kArgmaxInFlight 16-byte vectors, NaN if any value is
// NaN: one max per value for fp32, one per two values for fp16/bf16 (packed).
__device__ __forceinline__ float batch_max_nan(const Vec<float, 4> (&x)[kArgmaxInFlight]) {
  float m[kArgmaxInFlight];
#pragma unroll
  for (int u = 0; u < kArgmaxInFlight; ++u) {
    m[u] = fmax_nan(fmax_nan(x[u].v[0], x[u].v[1]), fmax_nan(x[u].v[2], x[u].v[3]));
  }
#pragma unroll
  for (int w = kArgmaxInFlight / 2; w > 0; w /= 2) {
#pragma unroll
    for (int u = 0; u < w; ++u) m[u] = fmax_nan(m[u], m[u + w]);
  }
  return m[0];
}

template <typename T, typename T2>
__device__ __forceinline__ float batch_max_nan_16(const Vec<T, 8> (&x)[kArgmaxInFlight]) {
  T2 m[kArgmaxInFlight];
#pragma unroll
  for (int u = 0; u < kArgmaxInFlight; ++u) {
    const T2* p = reinterpret_cast<const T2*>(x[u].v);
    m[u] = __hmax2_nan(__hmax2_nan(p[0], p[1]), __hmax2_nan(p[2], p[3]));
  }
#pragma unroll
  for (int w = kArgmaxInFlight / 2; w > 0; w /= 2) {
#pragma unroll
    for (int u = 0; u < w; ++u) m[u] = __hmax2_nan(m[u], m[u + w]);
  }
  return fmax_nan(to_float(m[0].x), to_float(m[0].y));
}
__device__ __forceinline__ float batch_max_nan(const Vec<__half, 8> (&x)[kArgmaxInFlight]) {
  return batch_max_nan_16<__half, __half2>(x);
}
__device__ __forceinline__ float batch_max_nan(const Vec<__nv_bfloat16, 8> (&x)[kArgmaxInFlight]) {
  return batch_max_nan_16<__nv_bfloat16, __nv_bfloat162>(x);
}

template <typename T, int G>
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(int64_t* __restrict__ out, const T* __restrict__ logits, int vocab, int chunk, bool vec_ok) {
  __shared__ ArgmaxShared sm;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rank = G == 1 ? 0 : static_cast<int>(blockIdx.x);
  const int row = blockIdx.y;
  const int start = rank * chunk;
  const int len = max(0, min(vocab - start, chunk));
  const T* src = logits + static_cast<int64_t>(row) * vocab + start;

  // Each thread visits its values in increasing index order, so a strict >
  // keeps the lowest index of its maximum.
  float vmax = -INFINITY;
  int imax = INT_MAX;
  bool nan = false;
  auto visit = [&](float f, int i) {
    if (f > vmax) {
      vmax = f;
      imax = i;
    } else if (f != f) {
      nan = true;
    }
  };
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kStride = kArgmaxThreads * kArgmaxInFlight;
  int scalar_from = 0;
  if (vec_ok) {  // start is a multiple of 8 values and the row is 16-byte aligned
    const int nvec = len / VEC;
    int v0 = tid;
    // Full batches: the batch's max alone (NaN-propagating) decides whether
    // any of its values can change (vmax, imax) or is NaN; usually none does.
    for (; v0 + (kArgmaxInFlight - 1) * kArgmaxThreads < nvec; v0 += kStride) {
      Vec<T, VEC> x[kArgmaxInFlight];
#pragma unroll
      for (int u = 0; u < kArgmaxInFlight; ++u) x[u].load(src + (v0 + u * kArgmaxThreads) * VEC);
      if (!(batch_max_nan(x) <= vmax)) {
#pragma unroll
        for (int u = 0; u < kArgmaxInFlight; ++u) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) visit(to_float(x[u].v[j]), (v0 + u * kArgmaxThreads) * VEC + j);
        }
      }
    }
    for (int v = v0; v < nvec; v += kArgmaxThreads) {  // fewer than kArgmaxInFlight vectors left
      Vec<T, VEC> x;
      x.load(src + v * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) visit(to_float(x.v[j]), v * VEC + j);
    }
    scalar_from = nvec * VEC;
  }
  for (int i = scalar_from + tid; i < len; i += kArgmaxThreads) visit(to_float(src[i]), i);  // higher indices

  warp_argmax(vmax, imax);
  if (lane == 0) {
    sm.v[warp] = vmax;
    sm.i[warp] = imax;
  }
  const int block_nan = __syncthreads_or(nan);
  if (warp == 0) {
    float v = lane < kArgmaxWarps ? sm.v[lane] : -INFINITY;
    int i = lane < kArgmaxWarps ? sm.i[lane] : INT_MAX;
    warp_argmax(v, i);
    i = i == INT_MAX ? INT_MAX : start + i;
    if constexpr (G == 1) {
      if (lane == 0) out[row] = block_nan ? kNaN : v == -INFINITY ? kAllNegInf : static_cast<int64_t>(i);
    } else if (lane == 0) {
      sm.x_v = v;
      sm.x_i = i;
      sm.x_nan = block_nan;
    }
  }
  if constexpr (G > 1) {
    Group<G>::sync();
    if (rank == 0 && warp == 0) {
      float v = -INFINITY;
      int i = INT_MAX, n = 0;
      if (lane < G) {
        const ArgmaxShared* p = Group<G>::peer(&sm, lane);
        v = p->x_v;
        i = p->x_i;
        n = p->x_nan;
      }
      warp_argmax(v, i);
      n = __any_sync(kFull, n);
      if (lane == 0) out[row] = n ? kNaN : v == -INFINITY ? kAllNegInf : static_cast<int64_t>(i);
    }
    Group<G>::sync();  // no block may exit while the first one can still read its shared memory
  }
}

struct ArgmaxDevice {
  bool known = false;
  int sms = 0;
  int major = 0;
  int cluster_code[3] = {-1, -1, -1};  // per dtype code; -1: not asked yet
};

constexpr int kArgmaxMaxDevices = 64;

// Whether this binary holds sm_90+ code of the cluster kernels (not a JIT of
// older PTX); asked once per device and dtype.
template <typename T>
bool argmax_cluster_code(ArgmaxDevice& d, int dtype) {
  if (d.cluster_code[dtype] >= 0) return d.cluster_code[dtype] != 0;
  const int code = cluster_code_of(argmax_kernel<T, 2>);
  if (code < 0) return false;  // not cached: asked again next time
  d.cluster_code[dtype] = code;
  return code == 1;
}

template <typename T, int G>
const char* launch_argmax_group(int64_t* out, const T* logits, int rows, int vocab, int chunk, bool vec_ok,
                                cudaStream_t stream) {
  if (G == 1) {
    argmax_kernel<T, 1><<<dim3(1, rows), kArgmaxThreads, 0, stream>>>(out, logits, vocab, chunk, vec_ok);
    FASTLLM_CHECK_LAUNCH();
    return nullptr;
  }
  const ClusterLaunch launch(G, rows, kArgmaxThreads, 0, stream);
  FASTLLM_RETURN_IF_ERROR(cudaLaunchKernelEx(&launch.config, argmax_kernel<T, G>, out, logits, vocab, chunk, vec_ok));
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* launch_argmax_typed(int64_t* out, const T* logits, int rows, int vocab, int dtype, int force_group,
                                cudaStream_t stream) {
  static ArgmaxDevice devices[kArgmaxMaxDevices];
  int dev = 0;
  FASTLLM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kArgmaxMaxDevices) return "cannot query the CUDA device";
  ArgmaxDevice& d = devices[dev];
  if (!d.known) {
    FASTLLM_RETURN_IF_ERROR(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    FASTLLM_RETURN_IF_ERROR(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
    d.known = true;
  }
  const bool clusters = d.major >= 9 && argmax_cluster_code<T>(d, dtype);
  int group = 1;
  if (force_group != 0) {
    if (force_group != 1 && force_group != 2 && force_group != 4 && force_group != 8) {
      return "group size must be 1, 2, 4 or 8";
    }
    if (force_group > 1 && !clusters) return "groups of more than one block need thread-block clusters (sm_90+)";
    group = force_group;
  } else if (clusters) {
    // Blocks for about two waves of SMs (several 512-thread blocks fit per SM),
    // chunks large enough to pay for the cluster exchange.
    while (group < kArgmaxMaxGroup && static_cast<int64_t>(rows) * group < 2LL * d.sms &&
           vocab / (group * 2) >= kArgmaxMinChunk) {
      group *= 2;
    }
  }
  const int chunk = static_cast<int>(ceil_div<int64_t>(ceil_div<int64_t>(vocab, group), 8) * 8);
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = vocab % VEC == 0 && aligned16(logits);
  switch (group) {
    case 1:
      return launch_argmax_group<T, 1>(out, logits, rows, vocab, chunk, vec_ok, stream);
    case 2:
      return launch_argmax_group<T, 2>(out, logits, rows, vocab, chunk, vec_ok, stream);
    case 4:
      return launch_argmax_group<T, 4>(out, logits, rows, vocab, chunk, vec_ok, stream);
    default:
      return launch_argmax_group<T, 8>(out, logits, rows, vocab, chunk, vec_ok, stream);
  }
}

}  // namespace

const char* launch_sample_argmax(void* out, const void* logits, int64_t rows, int64_t vocab, int dtype,
                                 int force_group, void* stream) {
  if (rows == 0) return nullptr;
  if (rows < 0 || rows > 65535) return "rows out of range (at most 65535)";
  if (vocab < 1 || vocab >= (1LL << 24)) return "vocabulary size out of range (1 .. 2^24 - 1)";
  if (dtype < 0 || dtype > 2) return "unsupported dtype code";
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    return launch_argmax_typed<scalar_t>(static_cast<int64_t*>(out), static_cast<const scalar_t*>(logits),
                                         static_cast<int>(rows), static_cast<int>(vocab), dtype, force_group,
                                         static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastllm
