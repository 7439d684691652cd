/*
 * Token sampling: temperature, top-k, top-p, min-p and a seeded draw, one
 * token per row of logits [B, V] (fp32/fp16/bf16) -> int64 [B].
 *
 * What it computes (reference.sample / reference.sampling_mask):
 *   q_i = exp((l_i - max l) / temperature)          (fp32; q of the argmax is 1)
 *   top-k keeps q >= the k-th largest q; top-p keeps token i iff the mass
 *   strictly above q_i is < top_p times the mass top-k kept (a fraction that
 *   rounds to top_p in fp32 reaches it, as in the fp32 reference); min-p keeps
 *   q >= min_p (= min_p * max, since max q is 1). Each filter keeps ties, so
 *   each keeps an upper set {q >= t} and the support is {q >= T} with
 *   T = max(t_k, t_p, min_p). The token is drawn by inverse CDF in token order
 *   with a 64-bit uniform from Philox4x32-10(key = seed, counter = offset).
 *   temperature 0 -> argmax (lowest id on ties). +inf logits share the mass
 *   equally. Rows with NaN, with every logit -inf, or with parameters out of
 *   range get a negative status code instead of a token (kNaN, kAllNegInf,
 *   kBadParams) for the Python wrapper to turn into a ValueError.
 *
 * Algorithm (no sort): a row is split over a group of G thread blocks of 1024
 * threads (a thread-block cluster on sm_90, G = 1..16, chosen so that B * G
 * fills the GPU and each block's chunk fits in shared memory). Each block
 *   1. reads its chunk of logits once (16-byte loads) into shared memory and
 *      reduces max / argmax / NaN; the group combines them through distributed
 *      shared memory (DSMEM);
 *   2. turns its chunk into q in place;
 *   3. finds t_k and t_p by a radix select on the bit pattern of q (a positive
 *      float, so its bits order like its value): per level a 1024-bin histogram
 *      of count and mass over the candidate key window (shared-memory atomics),
 *      reduce-scattered over the group through DSMEM, the bin where the
 *      running count (top-k) or mass (top-p) from the top crosses the target
 *      is found, and the window narrows to that bin: bits 29..20, 19..10, 9..0,
 *      at most three levels, usually one or two (a level stops early when the
 *      whole bin is kept). top-p searches only keys >= t_k, and its target
 *      top_p * (mass >= t_k) (at fp32 resolution of top_p) comes from its
 *      first histogram;
 *   4. sums the kept mass of a contiguous range per thread, scans it across the
 *      block and the group, and the block and thread holding the uniform's
 *      target walk their range to the token.
 * Masses are fixed point (q * 2^40 as uint64), so every sum is exact and
 * independent of the order of the atomics and of G: a row's token depends only
 * on its logits, parameters, seed and offset, bit for bit.
 *
 * Memory traffic: the logits are read from HBM once (B * V * sizeof(T)); every
 * further pass runs over shared memory. Chunks larger than the cache (only
 * without clusters, or V > 655k) re-read and recompute their tail from global
 * memory on each pass. Cost per row at V = 128k on an H100 (G = 16): one
 * HBM read spread over 16 SMs, ~6 group barriers and a few passes over ~8k
 * elements per block, i.e. some microseconds instead of a sort of V.
 *
 * Variants (launch_sample's `variant`): 0 is this file's kernel, verified on
 * an H200 and the default; 1 (sample_v1.cuh) is the same algorithm with the
 * same bins, thresholds, masses and draw, rescheduled to cut the barriers
 * between the passes (bit-identical tokens). Both share sample_common.cuh and
 * this file's launch plan. Greedy steps have their own kernel,
 * sample_argmax.cu.
 */
#include "sample_common.cuh"
#include "sample_v1.cuh"

namespace fastllm {
namespace {

constexpr int kDefaultCache = 40960;             // q values cached per block (160 KiB of shared memory)
constexpr int kMinChunk = 4096;                  // below this a bigger group only adds barriers

template <int G>
struct SampleShared {
  static constexpr int S = kBins / G;  // bins of the group histogram this block owns
  // Local histograms of the current radix level, double-buffered so that a
  // level can start while peers still read the previous one.
  uint32_t cnt[2][kBins];
  uint32_t mlo[2][kBins];  // mass = mhi * 2^32 + mlo, kept exact with 32-bit atomics
  uint32_t mhi[2][kBins];
  uint32_t scnt[S];  // this block's slice of the group histogram
  u64 smass[S];
  ScanScratch scan;
  float redf[kWarps];
  int redi[kWarps];
  // Read by the other blocks of the group.
  float x_max;
  int x_arg;
  int x_nan;
  uint32_t x_scnt;
  u64 x_smass;
  u64 x_kept;
  // Block-wide broadcasts.
  float row_max;
  int row_arg;
  int row_nan;
  int b_owner;
  u64 b_target, b_ac, b_am;
  int b_bin;
  uint32_t b_bc;
  u64 b_bm, b_ac2, b_am2;
  int s_owner;
  u64 s_target;
};

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(int64_t* __restrict__ out, const T* __restrict__ logits, const float* __restrict__ temperature,
                  const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                  const int64_t* __restrict__ seeds, const int64_t* __restrict__ offsets, int vocab, int chunk,
                  int cache, bool vec_ok) {
  __shared__ SampleShared<G> sm;
  extern __shared__ float4 dyn_smem[];
  float* qbuf = reinterpret_cast<float*>(dyn_smem);
  constexpr int S = SampleShared<G>::S;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rank = G == 1 ? 0 : static_cast<int>(blockIdx.x);
  const int row = blockIdx.y;
  const int start = rank * chunk;
  const int len = max(0, min(vocab - start, chunk));
  const int ncache = min(len, cache);
  const T* src = logits + static_cast<int64_t>(row) * vocab + start;

  const float temp = temperature[row];
  const int k = top_k[row];
  const float tp = top_p[row], mp = min_p[row];
  const bool bad_params = !(temp >= 0.f && temp <= FLT_MAX) || k < 0 || !(tp > 0.f && tp <= 1.f) ||
                          !(mp >= 0.f && mp <= 1.f);

  // ---- 1. read the chunk (cache it as fp32), max / argmax / NaN -------------
  float vmax = -INFINITY;
  int imax = INT_MAX;
  bool nan = false;
  auto visit = [&](float v, int i) {
    if (v != v) {
      nan = true;
    } else {
      argmax_merge(vmax, imax, v, i);
    }
  };
  constexpr int VEC = 16 / sizeof(T);
  int scalar_from = 0;
  if (vec_ok) {
    const int nvec = ncache / VEC;
    for (int v = tid; v < nvec; v += kThreads) {
      Vec<T, VEC> x;
      x.load(src + v * VEC);
      float f[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        f[j] = to_float(x.v[j]);
        visit(f[j], v * VEC + j);
      }
#pragma unroll
      for (int j = 0; j < VEC; j += 4) {
        *reinterpret_cast<float4*>(qbuf + v * VEC + j) = make_float4(f[j], f[j + 1], f[j + 2], f[j + 3]);
      }
    }
    scalar_from = nvec * VEC;
  }
  for (int i = scalar_from + tid; i < ncache; i += kThreads) {
    const float f = to_float(src[i]);
    visit(f, i);
    qbuf[i] = f;
  }
  for (int i = ncache + tid; i < len; i += kThreads) visit(to_float(src[i]), i);

  warp_argmax(vmax, imax);
  if (lane == 0) {
    sm.redf[warp] = vmax;
    sm.redi[warp] = imax;
  }
  const int block_nan = __syncthreads_or(nan);
  if (warp == 0) {
    vmax = sm.redf[lane];
    imax = sm.redi[lane];
    warp_argmax(vmax, imax);
    if (lane == 0) {
      sm.x_max = vmax;
      sm.x_arg = imax == INT_MAX ? INT_MAX : start + imax;
      sm.x_nan = block_nan;
    }
  }
  Group<G>::sync();
  if (warp == 0) {
    float v = -INFINITY;
    int i = INT_MAX, n = 0;
    if (lane < G) {
      const SampleShared<G>* p = Group<G>::peer(&sm, lane);
      v = p->x_max;
      i = p->x_arg;
      n = p->x_nan;
    }
    warp_argmax(v, i);
    n = __any_sync(kFull, n);
    if (lane == 0) {
      sm.row_max = v;
      sm.row_arg = i;
      sm.row_nan = n;
    }
  }
  __syncthreads();
  const float m = sm.row_max;
  const int argmax = sm.row_arg;

  bool sampling = false;
  int64_t code = 0;
  if (bad_params) {
    code = kBadParams;
  } else if (sm.row_nan) {
    code = kNaN;
  } else if (m == -INFINITY) {
    code = kAllNegInf;
  } else if (temp == 0.f) {
    code = argmax;
  } else {
    sampling = true;
  }

  if (!sampling) {
    if (rank == 0 && tid == 0) out[row] = code;
  } else {
    // ---- 2. q = exp((l - max) / temperature) in place ------------------------
    const float inv_t = fminf(1.f / temp, FLT_MAX);  // a denormal temperature must not make 0 * inf
    const bool posinf = m == INFINITY;
    auto qval = [&](float x) -> float {
      return posinf ? (x == INFINITY ? 1.f : 0.f) : fminf(__expf((x - m) * inv_t), 1.f);
    };
    // Each thread owns a contiguous range (token order matters for the draw);
    // an odd length keeps the 32 lanes of a warp in 32 different banks.
    const int per = ((len + kThreads - 1) / kThreads) | 1;
    const int lo = min(len, tid * per), hi = min(len, lo + per);
    for (int i = lo; i < min(hi, ncache); ++i) qbuf[i] = qval(qbuf[i]);
    auto q_at = [&](int i) -> float { return i < ncache ? qbuf[i] : qval(to_float(src[i])); };

    // ---- 3. radix select of a threshold key ---------------------------------
    // by_mass == false: the key t with count(q > t) < target <= count(q >= t);
    // by_mass == true: the same with masses and target = ceil(edge * mass of
    // the initial window), edge = top_p less half an fp32 ulp. Searches keys in
    // [wlo, kKeyMax]; returns a key t (or the lower edge of a bin) such that
    // {bits(q) >= t} is the kept set.
    int level = 0;
    auto select = [&](bool by_mass, u64 target, uint32_t wlo) -> Threshold {
      uint32_t whi = kKeyMax;
      u64 above_c = 0, above_m = 0;  // count and mass of keys > whi
      bool first = true;
      for (;;) {
        int s = 0;
        while (((whi - wlo) >> s) >= static_cast<uint32_t>(kBins)) ++s;
        const int buf = level & 1;
        ++level;
        uint32_t* cnt = sm.cnt[buf];
        uint32_t* mlo = sm.mlo[buf];
        uint32_t* mhi = sm.mhi[buf];
        for (int b = tid; b < kBins; b += kThreads) {
          cnt[b] = 0;
          mlo[b] = 0;
          mhi[b] = 0;
        }
        __syncthreads();
        for (int i = lo; i < hi; ++i) {
          const float q = q_at(i);
          const uint32_t key = __float_as_uint(q);
          if (key >= wlo && key <= whi) {
            const int b = static_cast<int>((key - wlo) >> s);
            atomicAdd(&cnt[b], 1u);
            const u64 mm = mass_of(q);
            const uint32_t ml = static_cast<uint32_t>(mm), mh = static_cast<uint32_t>(mm >> 32);
            uint32_t carry = 0;
            if (ml != 0) {
              const uint32_t old = atomicAdd(&mlo[b], ml);
              carry = old + ml < old ? 1u : 0u;  // this add wrapped the low word
            }
            if (mh + carry != 0) atomicAdd(&mhi[b], mh + carry);
          }
        }
        Group<G>::sync();

        // Reduce-scatter: this block sums bins [rank * S, (rank + 1) * S) over the group.
        uint32_t c = 0;
        u64 mm = 0;
        if (tid < S) {
          const int b = rank * S + tid;
#pragma unroll 4
          for (int p = 0; p < G; ++p) {
            c += Group<G>::peer(cnt, p)[b];
            mm += (static_cast<u64>(Group<G>::peer(mhi, p)[b]) << 32) + Group<G>::peer(mlo, p)[b];
          }
          sm.scnt[tid] = c;
          sm.smass[tid] = mm;
        }
        uint32_t tot_c;
        u64 tot_m;
        block_scan(c, mm, sm.scan, tot_c, tot_m);
        if (tid == 0) {
          sm.x_scnt = tot_c;
          sm.x_smass = tot_m;
        }
        Group<G>::sync();

        // The slice (block) whose bins hold the crossing, from the top down.
        if (warp == 0) {
          uint32_t sc = 0;
          u64 smm = 0;
          if (lane < G) {
            const SampleShared<G>* p = Group<G>::peer(&sm, lane);
            sc = p->x_scnt;
            smm = p->x_smass;
          }
          u64 tgt = target;
          if (by_mass && first) {
            u64 total = smm;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(kFull, total, o);
            tgt = top_p_target(tp, total);
          }
          int owner = -1;
          u64 ac = above_c, am = above_m;
          for (int o = G - 1; o >= 0; --o) {
            const uint32_t oc = __shfl_sync(kFull, sc, o);
            const u64 om = __shfl_sync(kFull, smm, o);
            if (owner < 0) {
              if ((by_mass ? am + om : ac + oc) >= tgt) {
                owner = o;
              } else {
                ac += oc;
                am += om;
              }
            }
          }
          if (lane == 0) {
            sm.b_owner = owner;
            sm.b_target = tgt;
            sm.b_ac = ac;
            sm.b_am = am;
          }
        }
        __syncthreads();
        const int owner = sm.b_owner;
        target = sm.b_target;
        above_c = sm.b_ac;
        above_m = sm.b_am;
        first = false;
        if (owner < 0) return Threshold{wlo, above_m};  // the whole window is needed (top-p below wlo)

        // The bin of the owner's slice where the running total crosses the
        // target; thread j holds bin S - 1 - j so that thread order is descending.
        uint32_t bc = 0;
        u64 bm = 0;
        if (tid < S) {
          bc = Group<G>::peer(sm.scnt, owner)[S - 1 - tid];
          bm = Group<G>::peer(sm.smass, owner)[S - 1 - tid];
        }
        uint32_t ic = bc;
        u64 im = bm;
        block_scan(ic, im, sm.scan, tot_c, tot_m);
        if (tid < S) {
          const u64 incl = by_mass ? above_m + im : above_c + ic;
          const u64 excl = by_mass ? incl - bm : incl - bc;
          if (excl < target && incl >= target) {
            sm.b_bin = owner * S + (S - 1 - tid);
            sm.b_bc = bc;
            sm.b_bm = bm;
            sm.b_ac2 = above_c + ic - bc;
            sm.b_am2 = above_m + im - bm;
          }
        }
        __syncthreads();
        const uint32_t bin = static_cast<uint32_t>(sm.b_bin);
        const uint32_t bin_count = sm.b_bc;
        const u64 bin_mass = sm.b_bm;
        above_c = sm.b_ac2;
        above_m = sm.b_am2;
        const uint32_t bin_lo = wlo + (bin << s);
        // Done when the bin is one key, or when all of it is kept.
        if (s == 0 || (!by_mass && target - above_c == bin_count) || (by_mass && bin_count == 1)) {
          return Threshold{bin_lo, above_m + bin_mass};
        }
        wlo = bin_lo;
        whi = min(whi, bin_lo + ((1u << s) - 1u));
      }
    };

    uint32_t t_k = 0, cut = 0;
    if (k > 0 && k < vocab) t_k = select(false, static_cast<u64>(k), 0u).key;
    cut = t_k;
    if (tp < 1.f) cut = max(cut, select(true, 0, t_k).key);
    if (mp > 0.f) cut = max(cut, __float_as_uint(mp));

    // ---- 4. inverse CDF in token order over {bits(q) >= cut} ----------------
    u64 mine = 0;
    for (int i = lo; i < hi; ++i) {
      const float q = q_at(i);
      if (__float_as_uint(q) >= cut) mine += mass_of(q);
    }
    uint32_t unused_c = 0, unused_tc;
    u64 incl = mine, kept;
    block_scan(unused_c, incl, sm.scan, unused_tc, kept);
    if (tid == 0) sm.x_kept = kept;
    Group<G>::sync();
    if (warp == 0) {
      const u64 km = lane < G ? Group<G>::peer(&sm, lane)->x_kept : 0;
      u64 pre = km;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(kFull, pre, o);
        if (lane >= o) pre += t;
      }
      const u64 total = __shfl_sync(kFull, pre, 31);
      const u64 r = philox_u64(static_cast<u64>(seeds[row]), static_cast<u64>(offsets[row]), kSampleStream);
      const u64 target = __umul64hi(r, total);  // uniform in [0, total)
      const unsigned hit = __ballot_sync(kFull, lane < G && km > 0 && pre - km <= target && target < pre);
      const int owner = hit ? __ffs(hit) - 1 : -1;
      const u64 before = __shfl_sync(kFull, pre - km, owner < 0 ? 0 : owner);
      if (lane == 0) {
        sm.s_owner = owner;
        sm.s_target = target - before;
      }
    }
    __syncthreads();
    const int owner = sm.s_owner;
    if (owner < 0) {
      if (rank == 0 && tid == 0) out[row] = argmax;  // no kept mass: cannot happen (q of the argmax is 1)
    } else if (rank == owner) {
      const u64 target = sm.s_target;
      const u64 excl = incl - mine;
      if (excl <= target && target < incl) {
        u64 cum = excl;
        int token = hi - 1;
        for (int i = lo; i < hi; ++i) {
          const float q = q_at(i);
          if (__float_as_uint(q) >= cut) {
            cum += mass_of(q);
            if (cum > target) {
              token = i;
              break;
            }
          }
        }
        out[row] = start + token;
      }
    }
  }
  Group<G>::sync();  // no block may exit while its peers can still read its shared memory
}

struct DeviceInfo {
  bool known = false;
  int sms = 0;
  int major = 0;
  // Per variant (0, 1) and dtype code.
  bool cluster16[2][3] = {};
  bool cluster16_known[2][3] = {};
  bool smem_set[2][3][5] = {};
  int smem_optin = 0;              // cudaDevAttrMaxSharedMemoryPerBlockOptin (bytes)
  int cache_capacity[2][3] = {};   // q values a block can cache on this device
  int cluster_code[3] = {-1, -1, -1};  // cluster kernels usable on this device, per dtype code (-1: not asked yet)
};

constexpr int kMaxDevices = 64;

DeviceInfo* device_info(int dev) {
  static DeviceInfo infos[kMaxDevices];
  if (dev < 0 || dev >= kMaxDevices) return nullptr;
  DeviceInfo& d = infos[dev];
  if (!d.known) {
    if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return nullptr;
    if (cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return nullptr;
    if (cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      return nullptr;
    d.known = true;
  }
  return &d;
}

int group_index(int g) { return g == 1 ? 0 : g == 2 ? 1 : g == 4 ? 2 : g == 8 ? 3 : 4; }

// The kernel of variant V for dtype T and group G.
template <typename T, int G, int V>
constexpr auto kernel_of() {
  if constexpr (V == 0) {
    return sample_kernel<T, G>;
  } else {
    return sample_kernel_v1<T, G>;
  }
}

// Static shared memory of variant V's largest instantiation (variant 0: G = 1;
// variant 1: G = 2, as its G = 1 keeps no slice copy); 0 if unknown.
template <typename T, int V>
int64_t static_smem() {
  int64_t most = 0;
  auto take = [&](auto kernel) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
      most = most > static_cast<int64_t>(attr.sharedSizeBytes) ? most : static_cast<int64_t>(attr.sharedSizeBytes);
    } else {
      cudaGetLastError();
    }
  };
  take(kernel_of<T, 1, V>());
  if constexpr (V == 1) take(kernel_of<T, 2, V>());
  return most;
}

// The q values a block can cache in dynamic shared memory on this device:
// kDefaultCache (160 KiB) on an H100 (227 KiB per block), less where the
// opt-in limit is smaller (A100: 163 KiB, sm_89: 99 KiB), always leaving room
// for the static shared memory of the largest instantiation.
template <typename T, int V>
int cache_capacity(DeviceInfo& info, int dtype) {
  if (info.cache_capacity[V][dtype] > 0) return info.cache_capacity[V][dtype];
  const int64_t fixed = static_smem<T, V>();
  int64_t floats = fixed > 0 ? (static_cast<int64_t>(info.smem_optin) - fixed) / static_cast<int64_t>(sizeof(float))
                             : 0;
  floats = floats < kDefaultCache ? floats : kDefaultCache;
  floats = floats < 8 ? 8 : floats / 8 * 8;  // at least one 8-value row keeps the code paths uniform
  info.cache_capacity[V][dtype] = static_cast<int>(floats);
  return info.cache_capacity[V][dtype];
}

template <typename T, int G, int V>
const char* launch_group(DeviceInfo& info, int dtype, int64_t* out, const T* logits, const float* temperature,
                         const int* top_k, const float* top_p, const float* min_p, const int64_t* seeds,
                         const int64_t* offsets, int rows, int vocab, int chunk, int cache, bool vec_ok,
                         cudaStream_t stream) {
  auto kernel = kernel_of<T, G, V>();
  bool& smem_set = info.smem_set[V][dtype][group_index(G)];
  if (!smem_set) {
    FASTLLM_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 cache_capacity<T, V>(info, dtype) * static_cast<int>(sizeof(float))));
    if (G > 8) FASTLLM_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    smem_set = true;
  }
  const size_t smem = static_cast<size_t>(min(chunk, cache)) * sizeof(float);
  if (G == 1) {
    kernel<<<dim3(1, rows), kThreads, smem, stream>>>(out, logits, temperature, top_k, top_p, min_p, seeds, offsets,
                                                       vocab, chunk, cache, vec_ok);
    FASTLLM_CHECK_LAUNCH();
    return nullptr;
  }
  const ClusterLaunch launch(G, rows, kThreads, smem, stream);
  FASTLLM_RETURN_IF_ERROR(cudaLaunchKernelEx(&launch.config, kernel, out, logits, temperature, top_k, top_p, min_p, seeds,
                                             offsets, vocab, chunk, cache, vec_ok));
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

// Whether a cluster of 16 of these blocks can be resident on this device.
template <typename T, int V>
bool cluster16_fits(DeviceInfo& info, int dtype, int cache) {
  if (info.cluster16_known[V][dtype]) return info.cluster16[V][dtype];
  auto kernel = kernel_of<T, 16, V>();
  bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 cache_capacity<T, V>(info, dtype) * static_cast<int>(sizeof(float))) == cudaSuccess &&
            cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  if (ok) {
    const ClusterLaunch launch(16, 1, kThreads, static_cast<size_t>(cache) * sizeof(float), nullptr);
    int clusters = 0;
    ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) == cudaSuccess && clusters > 0;
  }
  cudaGetLastError();  // a refused query must not linger as the launch error
  info.cluster16[V][dtype] = ok;
  info.cluster16_known[V][dtype] = true;
  return ok;
}

// Whether the kernels in this binary were compiled for sm_90+ (clusters), not
// JIT-compiled from older PTX. Asked once per device and dtype (a function
// attribute query on every call costs host time in the decode loop).
template <typename T>
bool cluster_code(DeviceInfo& info, int dtype) {
  if (info.cluster_code[dtype] >= 0) return info.cluster_code[dtype] != 0;
  const int code = cluster_code_of(sample_kernel<T, 2>);
  if (code < 0) return false;  // not cached: asked again next time
  info.cluster_code[dtype] = code;
  return code == 1;
}

// The plan (group size, chunk, cache) is the same for both variants; only the
// cache capacity follows each variant's static shared memory.
template <typename T, int V>
const char* launch_typed(int64_t* out, const T* logits, const float* temperature, const int* top_k,
                         const float* top_p, const float* min_p, const int64_t* seeds, const int64_t* offsets,
                         int rows, int vocab, int dtype, int force_group, int64_t cache_limit, cudaStream_t stream) {
  int dev = 0;
  FASTLLM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  DeviceInfo* info = device_info(dev);
  if (info == nullptr) return "cannot query the CUDA device";
  const bool clusters = info->major >= 9 && cluster_code<T>(*info, dtype);
  int cache = cache_capacity<T, V>(*info, dtype);
  if (cache_limit >= 0 && cache_limit < cache) cache = static_cast<int>(cache_limit / 8 * 8);

  int group = 1;
  if (force_group != 0) {
    if (force_group != 1 && force_group != 2 && force_group != 4 && force_group != 8 && force_group != 16) {
      return "group size must be 1, 2, 4, 8 or 16";
    }
    if (force_group > 1 && !clusters) return "groups of more than one block need thread-block clusters (sm_90+)";
    if (force_group == 16 && !cluster16_fits<T, V>(*info, dtype, cache)) return "a cluster of 16 blocks does not fit";
    group = force_group;
  } else if (clusters) {
    // The smallest group whose chunks fit the cache, then wider while the
    // grid leaves SMs idle and chunks stay large enough to pay for barriers.
    while (group < kMaxGroup && static_cast<int64_t>(group) * cache < vocab) group *= 2;
    while (group < kMaxGroup && static_cast<int64_t>(rows) * group * 2 <= info->sms &&
           vocab / (group * 2) >= kMinChunk) {
      group *= 2;
    }
    if (group == 16 && !cluster16_fits<T, V>(*info, dtype, cache)) group = 8;
  }
  const int chunk = static_cast<int>(ceil_div<int64_t>(ceil_div<int64_t>(vocab, group), 8) * 8);
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = vocab % VEC == 0 && aligned16(logits);
  switch (group) {
    case 1:
      return launch_group<T, 1, V>(*info, dtype, out, logits, temperature, top_k, top_p, min_p, seeds, offsets, rows,
                                   vocab, chunk, cache, vec_ok, stream);
    case 2:
      return launch_group<T, 2, V>(*info, dtype, out, logits, temperature, top_k, top_p, min_p, seeds, offsets, rows,
                                   vocab, chunk, cache, vec_ok, stream);
    case 4:
      return launch_group<T, 4, V>(*info, dtype, out, logits, temperature, top_k, top_p, min_p, seeds, offsets, rows,
                                   vocab, chunk, cache, vec_ok, stream);
    case 8:
      return launch_group<T, 8, V>(*info, dtype, out, logits, temperature, top_k, top_p, min_p, seeds, offsets, rows,
                                   vocab, chunk, cache, vec_ok, stream);
    default:
      return launch_group<T, 16, V>(*info, dtype, out, logits, temperature, top_k, top_p, min_p, seeds, offsets,
                                    rows, vocab, chunk, cache, vec_ok, stream);
  }
}

}  // namespace

const char* launch_sample(void* out, const void* logits, const void* temperature, const void* top_k,
                          const void* top_p, const void* min_p, const void* seeds, const void* offsets, int64_t rows,
                          int64_t vocab, int dtype, int force_group, int64_t cache_limit, int variant, void* stream) {
  if (rows == 0) return nullptr;
  if (rows < 0 || rows > 65535) return "rows out of range (at most 65535)";
  if (vocab < 1 || vocab >= (1LL << 24)) return "vocabulary size out of range (1 .. 2^24 - 1)";
  if (dtype < 0 || dtype > 2) return "unsupported dtype code";
  if (variant != 0 && variant != 1) return "variant must be 0 or 1";
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    auto launch = variant == 0 ? launch_typed<scalar_t, 0> : launch_typed<scalar_t, 1>;
    return launch(static_cast<int64_t*>(out), static_cast<const scalar_t*>(logits),
                  static_cast<const float*>(temperature), static_cast<const int*>(top_k),
                  static_cast<const float*>(top_p), static_cast<const float*>(min_p),
                  static_cast<const int64_t*>(seeds), static_cast<const int64_t*>(offsets), static_cast<int>(rows),
                  static_cast<int>(vocab), dtype, force_group, cache_limit, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastllm
