/*
 * Variant 1 of the sampling kernel (sample.cu's header describes the
 * algorithm). The same algorithm with the same bins, thresholds, fixed-point
 * masses and draw, so every token is bit-identical to variant 0's; only the
 * schedule changes. Nsight Compute on variant 0 (top-p, B = 32, V = 128256,
 * H200: 4 blocks of 1024 threads per row, one block per SM) shows DRAM 5%
 * busy, issue slots 27% busy and `barrier` as the top stall: the time goes to
 * the synchronisations between the passes and to latency on one warp's
 * chain, not to memory. What changes, and why:
 *
 * 1. A radix level costs 2 group syncs + 1 __syncthreads instead of 2 group
 *    syncs + 9 __syncthreads (the zeroing barrier, two block scans of three
 *    barriers each over all 1024 threads, two broadcasts). The reduce-scatter
 *    of this block's S = 1024 / G bins stays one bin per thread (threads
 *    0..S-1, the G loads of each bin in flight together), but only a warp
 *    reduction follows: each of the W = S / 32 warps publishes the count and
 *    mass of its 32 bins. A level has W * G = 32 such groups of 32 bins
 *    whatever G is, so after the second group sync warp 0 alone finds the
 *    group where the running total from the top crosses the target (one
 *    DSMEM load per lane, one warp scan) and then the bin inside it (one more
 *    load per lane, one more scan), and publishes the bin with the one
 *    __syncthreads. No block-wide scan is left. The histogram buffer of the
 *    next level is zeroed right after the first group sync (its last readers
 *    finished before the previous level's second sync), so no barrier waits
 *    for the zeroing. G == 1 searches its own histogram (no slice copy).
 * 2. The first histogram level of the first select (its window is always
 *    [0, kKeyMax], shift 20) is built in the exp pass (step 2): one pass over
 *    the chunk and its barrier fewer.
 * 3. Histogram masses: variant 0 adds the low word with a returning atomic to
 *    detect the carry, which puts the shared-atomic latency on every
 *    element's dependency chain (and a 64-bit shared atomicAdd compiles to a
 *    CAS loop on sm_90). When chunk <= 65536 the mass (<= 2^40, 41 bits) is
 *    added as three parts of 16, 16 and 9 bits with non-returning 32-bit
 *    atomics: a bin's sum of one part over at most 65536 elements fits 32
 *    bits, and the parts recombine exactly when read. Larger chunks (G = 1
 *    with V > 65536: no clusters, or _group=1) keep variant 0's scheme.
 * 4. Steps 1 and 4: every warp combines the group's G partial results itself
 *    (G lanes, one DSMEM load each) instead of warp 0 doing it and a barrier
 *    broadcasting it; the kept-mass scan is a warp scan, one __syncthreads,
 *    a scan of the 32 warp totals by warp 0, and the group sync; the Philox
 *    number is drawn at the start of the kernel; the exit guard is split
 *    (arrive after the last DSMEM read, wait at the very end) so that the
 *    walk to the token overlaps it. Step 4 goes from 4 __syncthreads + 2
 *    group syncs to 1 + 1 and an overlapped arrive/wait; step 1 from 2 + 1 to
 *    1 + 1 (G == 1: one barrier, no group exchange).
 * 5. Latency inside the passes: step 1 keeps 4 16-byte loads per thread in
 *    flight (variant 0's loop, unrolled twice by the compiler, keeps 2: at
 *    B = 32 a thread's 8 loads take 4 DRAM round trips there, 2 here), and a
 *    histogram pass loads two elements before their atomics (the compiler
 *    does not move a shared load above a shared atomic that may alias it:
 *    variant 0's loop, unrolled 4 times, still loads each element after the
 *    previous element's returning atomic).
 *
 * Each group sync is a cluster barrier with release/acquire semantics, which
 * ptxas implements as MEMBAR.ALL.GPU + UCGABAR_ARV / UCGABAR_WAIT + CCTL.IVALL
 * (both variants). A relaxed arrive needs a fence to order the shared-memory
 * writes before it, and fence.acq_rel.cluster compiles to the same
 * MEMBAR.ALL.GPU (checked with nvcc 13.0), so both are kept as they are.
 *
 * The group-size and cache plan is variant 0's (launch_typed). A wider group
 * at B = 32 (G = 8: 256 blocks of 1024 threads, 64 registers each, so one
 * block per SM on 132 SMs) would not fit in one wave; smaller blocks would
 * change the whole kernel. Left for a measurement.
 */
#pragma once

#include "sample_common.cuh"

namespace fastllm {
namespace {

constexpr int kSplitChunk = 65536;  // chunks up to this size add masses as 16 + 16 + 9 bit parts
constexpr int kLoadsInFlight = 4;   // step 1: 16-byte loads per thread issued before the first is used

// The shift of a window's bins: the smallest s with (whi - wlo) >> s < kBins.
__host__ __device__ constexpr int window_shift(uint32_t width) {
  int s = 0;
  while ((width >> s) >= static_cast<uint32_t>(kBins)) ++s;
  return s;
}
constexpr int kFirstShift = window_shift(kKeyMax);  // the first level: window [0, kKeyMax]
static_assert(kFirstShift == 20, "bits 29..20 of q form the first level's bins");
static_assert((kKeyMax >> kFirstShift) < kBins, "the first level's bins fit");

// What warp 0 found at a radix level, for the whole block.
struct LevelResult {
  int found;     // 0: the crossing is below the window (keep all of it)
  uint32_t bin;  // the bin of the crossing
  uint32_t bc;   // its count
  u64 bm;        // its mass
  u64 ac, am;    // count and mass above the bin (found) or above the window's bottom (not found)
  u64 target;
};

template <int G>
struct alignas(16) SampleSharedV1 {  // 16: zeroed with uint4 stores
  static constexpr int S = kBins / G;        // bins of the group histogram this block owns
  static constexpr int W = S / 32;           // warps holding them (W * G == 32)
  static constexpr int SS = G == 1 ? 1 : S;  // G == 1 searches its own histogram: no slice copy
  // Local histograms, double-buffered by level: [0] count, [1..3] mass parts
  // (16 + 16 + 9 bits) or [1] low and [2] high word of the mass.
  uint32_t hist[2][4][kBins];
  uint32_t scnt[SS];  // this block's slice of the group histogram
  u64 smass[SS];
  uint32_t xc[W];  // count and mass of the 32 bins of each warp of the slice (read by peers)
  u64 xm[W];
  u64 wsum[kWarps];  // step 4: warp totals, then each warp's exclusive prefix
  float redf[kWarps];
  int redi[kWarps];
  float x_max;  // read by peers
  int x_arg;
  int x_nan;
  u64 x_kept;
  u64 rnd;  // the row's Philox number
  LevelResult res;
};

static_assert(sizeof(uint4) * kThreads == sizeof(uint32_t) * 4 * kBins, "one uint4 per thread zeroes a buffer");

// Bin b's mass from a histogram buffer (4 arrays of kBins words).
__device__ __forceinline__ u64 bin_mass(const uint32_t* h, int b, bool split) {
  return split ? static_cast<u64>(h[kBins + b]) + (static_cast<u64>(h[2 * kBins + b]) << 16) +
                     (static_cast<u64>(h[3 * kBins + b]) << 32)
               : static_cast<u64>(h[kBins + b]) + (static_cast<u64>(h[2 * kBins + b]) << 32);
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel_v1(int64_t* __restrict__ out, const T* __restrict__ logits, const float* __restrict__ temperature,
                     const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                     const int64_t* __restrict__ seeds, const int64_t* __restrict__ offsets, int vocab, int chunk,
                     int cache, bool vec_ok) {
  __shared__ SampleSharedV1<G> sm;
  extern __shared__ float4 dyn_smem[];
  float* qbuf = reinterpret_cast<float*>(dyn_smem);
  constexpr int S = SampleSharedV1<G>::S;
  constexpr int W = SampleSharedV1<G>::W;

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
  const bool may_sample = !bad_params && temp != 0.f;
  const bool split = chunk <= kSplitChunk;  // uniform over the group: a kernel argument

  // The first histogram buffer is filled during step 2; the barriers of step 1 order this.
  reinterpret_cast<uint4*>(&sm.hist[0][0][0])[tid] = make_uint4(0u, 0u, 0u, 0u);
  if (tid == kThreads - 1 && may_sample) {  // off the critical path of step 4
    sm.rnd = philox_u64(static_cast<u64>(seeds[row]), static_cast<u64>(offsets[row]), kSampleStream);
  }

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
    // kLoadsInFlight 16-byte loads per thread before the first is used
    // (variant 0's loop has two in flight: at B = 32 four DRAM round trips
    // per thread in a row, here two).
    const int nvec = ncache / VEC;
    for (int v0 = tid; v0 < nvec; v0 += kThreads * kLoadsInFlight) {
      Vec<T, VEC> x[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        if (v0 + u * kThreads < nvec) x[u].load(src + (v0 + u * kThreads) * VEC);
      }
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int v = v0 + u * kThreads;
        if (v < nvec) {
          float f[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            f[j] = to_float(x[u].v[j]);
            visit(f[j], v * VEC + j);
          }
#pragma unroll
          for (int j = 0; j < VEC; j += 4) {
            *reinterpret_cast<float4*>(qbuf + v * VEC + j) = make_float4(f[j], f[j + 1], f[j + 2], f[j + 3]);
          }
        }
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
  // Every warp combines the partial results itself: no broadcast barrier.
  float m;
  int argmax, row_nan;
  if constexpr (G == 1) {
    float v = sm.redf[lane];
    int i = sm.redi[lane];
    warp_argmax(v, i);
    m = v;
    argmax = i;  // start == 0
    row_nan = block_nan;
  } else {
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
    float v = -INFINITY;
    int i = INT_MAX, n = 0;
    if (lane < G) {
      const SampleSharedV1<G>* p = Group<G>::peer(&sm, lane);
      v = p->x_max;
      i = p->x_arg;
      n = p->x_nan;
    }
    warp_argmax(v, i);
    m = v;
    argmax = i;
    row_nan = __any_sync(kFull, n);
  }

  bool sampling = false;
  int64_t code = 0;
  if (bad_params) {
    code = kBadParams;
  } else if (row_nan) {
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
    if constexpr (G > 1) Group<G>::sync();  // no block may exit while its peers can still read its shared memory
    return;
  }

  // ---- 2. q = exp((l - max) / temperature) in place, + the first histogram --
  const float inv_t = fminf(1.f / temp, FLT_MAX);  // a denormal temperature must not make 0 * inf
  const bool posinf = m == INFINITY;
  auto qval = [&](float x) -> float {
    return posinf ? (x == INFINITY ? 1.f : 0.f) : fminf(__expf((x - m) * inv_t), 1.f);
  };
  // Each thread owns a contiguous range (token order matters for the draw);
  // an odd length keeps the 32 lanes of a warp in 32 different banks.
  const int per = ((len + kThreads - 1) / kThreads) | 1;
  const int lo = min(len, tid * per), hi = min(len, lo + per);
  auto q_at = [&](int i) -> float { return i < ncache ? qbuf[i] : qval(to_float(src[i])); };

  // One element into histogram buffer `buf`, bin b. The atomics return nothing
  // the thread waits for, except the carry of variant 0's scheme (chunk > 65536).
  auto hist_add = [&](int buf, int b, float q) {
    uint32_t* h = &sm.hist[buf][0][0];
    atomicAdd(&h[b], 1u);
    const u64 mm = mass_of(q);
    if (split) {
      const uint32_t m0 = static_cast<uint32_t>(mm) & 0xffffu;
      const uint32_t m1 = static_cast<uint32_t>(mm >> 16) & 0xffffu;
      const uint32_t m2 = static_cast<uint32_t>(mm >> 32);  // mm <= 2^40: 9 bits
      if (m0 != 0) atomicAdd(&h[kBins + b], m0);  // no return value: nothing waits for the atomic
      if (m1 != 0) atomicAdd(&h[2 * kBins + b], m1);
      if (m2 != 0) atomicAdd(&h[3 * kBins + b], m2);
    } else {
      const uint32_t ml = static_cast<uint32_t>(mm), mh = static_cast<uint32_t>(mm >> 32);
      uint32_t carry = 0;
      if (ml != 0) {
        const uint32_t old = atomicAdd(&h[kBins + b], ml);
        carry = old + ml < old ? 1u : 0u;  // this add wrapped the low word
      }
      if (mh + carry != 0) atomicAdd(&h[2 * kBins + b], mh + carry);
    }
  };

  // The elements of a histogram level, two at a time: both loads are issued
  // before the first atomic (the compiler cannot move a shared load above a
  // shared atomic it may alias).
  auto hist_level = [&](int buf, uint32_t wlo, uint32_t whi, int s) {
    auto one = [&](float q) {
      const uint32_t key = __float_as_uint(q);
      if (key >= wlo && key <= whi) hist_add(buf, static_cast<int>((key - wlo) >> s), q);
    };
    int i = lo;
    for (; i + 1 < hi; i += 2) {
      const float q0 = q_at(i), q1 = q_at(i + 1);
      one(q0);
      one(q1);
    }
    if (i < hi) one(q_at(i));
  };

  const bool do_k = k > 0 && k < vocab, do_p = tp < 1.f;
  if (do_k || do_p) {
    // The first select's first level (window [0, kKeyMax]): q is in [0, 1], so
    // every key is inside it and its bin is key >> 20.
    auto first = [&](float q) { hist_add(0, static_cast<int>(__float_as_uint(q) >> kFirstShift), q); };
    const int cached_hi = min(hi, ncache);
    int i = lo;
    for (; i + 1 < cached_hi; i += 2) {
      const float q0 = qval(qbuf[i]), q1 = qval(qbuf[i + 1]);
      qbuf[i] = q0;
      qbuf[i + 1] = q1;
      first(q0);
      first(q1);
    }
    if (i < cached_hi) {
      const float q = qval(qbuf[i]);
      qbuf[i] = q;
      first(q);
    }
    for (i = max(lo, ncache); i < hi; ++i) first(qval(to_float(src[i])));
  } else {
    for (int i = lo; i < min(hi, ncache); ++i) qbuf[i] = qval(qbuf[i]);
  }

  // ---- 3. radix select of a threshold key (variant 0's select, rescheduled) --
  int level = 0;
  auto select = [&](bool by_mass, u64 target, uint32_t wlo, bool built) -> Threshold {
    uint32_t whi = kKeyMax;
    u64 above_c = 0, above_m = 0;  // count and mass of keys > whi
    bool first = true;
    for (;;) {
      const int s = window_shift(whi - wlo);
      const int buf = level & 1;
      ++level;
      if (!built) hist_level(buf, wlo, whi, s);
      built = false;
      Group<G>::sync();  // every histogram of the group is complete
      // The next level's buffer: its last readers (the previous level's
      // reduce-scatter) finished before the previous level's second sync.
      reinterpret_cast<uint4*>(&sm.hist[buf ^ 1][0][0])[tid] = make_uint4(0u, 0u, 0u, 0u);

      // Reduce-scatter: thread t < S sums bin rank * S + t over the group; each
      // warp of them publishes the count and mass of its 32 bins.
      if (tid < S) {
        const int b = rank * S + tid;
        uint32_t c = 0;
        u64 mm = 0;
#pragma unroll
        for (int p = 0; p < G; ++p) {
          const uint32_t* h = Group<G>::peer(&sm.hist[buf][0][0], p);
          c += h[b];
          mm += bin_mass(h, b, split);
        }
        if constexpr (G > 1) {
          sm.scnt[tid] = c;
          sm.smass[tid] = mm;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          c += __shfl_xor_sync(kFull, c, o);
          mm += __shfl_xor_sync(kFull, mm, o);
        }
        if (lane == 0) {
          sm.xc[warp] = c;
          sm.xm[warp] = mm;
        }
      }
      Group<G>::sync();  // every slice and its group sums are published

      if (warp == 0) {
        // Group j holds bins [32 j, 32 j + 32) of the level: warp j % W of block
        // j / W. Lane l takes group 31 - l, so lane order runs from the top down.
        const int gi = 31 - lane;
        const uint32_t gc = Group<G>::peer(sm.xc, gi / W)[gi % W];
        const u64 gm = Group<G>::peer(sm.xm, gi / W)[gi % W];
        u64 tgt = target;
        if (by_mass && first) {
          u64 total = gm;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(kFull, total, o);
          tgt = top_p_target(tp, total);
        }
        uint32_t ic = gc;
        u64 im = gm;
        warp_scan(ic, im);
        const u64 incl = by_mass ? above_m + im : above_c + ic;
        const u64 excl = incl - (by_mass ? gm : static_cast<u64>(gc));
        const unsigned hit = __ballot_sync(kFull, excl < tgt && incl >= tgt);
        if (hit == 0) {  // the whole window is needed (top-p below wlo)
          if (lane == 31) {
            sm.res.found = 0;
            sm.res.ac = above_c + ic;
            sm.res.am = above_m + im;
            sm.res.target = tgt;
          }
        } else {
          const int hl = __ffs(hit) - 1;
          const int g = 31 - hl;
          const u64 gac = above_c + __shfl_sync(kFull, ic - gc, hl);
          const u64 gam = above_m + __shfl_sync(kFull, im - gm, hl);
          // The bin of group g where the running total crosses: lane l takes bin 32 g + 31 - l.
          const int bi = 32 * g + 31 - lane;  // bin of the level
          uint32_t bc;
          u64 bm;
          if constexpr (G == 1) {
            const uint32_t* h = &sm.hist[buf][0][0];
            bc = h[bi];
            bm = bin_mass(h, bi, split);
          } else {
            const int owner = bi / S, at = bi % S;
            bc = Group<G>::peer(sm.scnt, owner)[at];
            bm = Group<G>::peer(sm.smass, owner)[at];
          }
          uint32_t bic = bc;
          u64 bim = bm;
          warp_scan(bic, bim);
          const u64 bincl = by_mass ? gam + bim : gac + bic;
          const u64 bexcl = bincl - (by_mass ? bm : static_cast<u64>(bc));
          const unsigned hit2 = __ballot_sync(kFull, bexcl < tgt && bincl >= tgt);
          if (lane == __ffs(hit2) - 1) {  // exactly one lane: the group holds the crossing
            sm.res.found = 1;
            sm.res.bin = static_cast<uint32_t>(bi);
            sm.res.bc = bc;
            sm.res.bm = bm;
            sm.res.ac = gac + bic - bc;
            sm.res.am = gam + bim - bm;
            sm.res.target = tgt;
          }
        }
      }
      __syncthreads();  // the level's result, for the whole block
      const bool found = sm.res.found != 0;
      target = sm.res.target;
      above_c = sm.res.ac;
      above_m = sm.res.am;
      first = false;
      if (!found) return Threshold{wlo, above_m};
      const uint32_t bin_count = sm.res.bc;
      const u64 bin_mass_ = sm.res.bm;
      const uint32_t bin_lo = wlo + (sm.res.bin << s);
      // Done when the bin is one key, or when all of it is kept.
      if (s == 0 || (!by_mass && target - above_c == bin_count) || (by_mass && bin_count == 1)) {
        return Threshold{bin_lo, above_m + bin_mass_};
      }
      wlo = bin_lo;
      whi = min(whi, bin_lo + ((1u << s) - 1u));
    }
  };

  uint32_t t_k = 0, cut = 0;
  if (do_k) t_k = select(false, static_cast<u64>(k), 0u, true).key;
  cut = t_k;
  if (do_p) cut = max(cut, select(true, 0, t_k, !do_k).key);
  if (mp > 0.f) cut = max(cut, __float_as_uint(mp));

  // ---- 4. inverse CDF in token order over {bits(q) >= cut} ----------------
  u64 mine = 0;
  for (int i = lo; i < hi; ++i) {
    const float q = q_at(i);
    if (__float_as_uint(q) >= cut) mine += mass_of(q);
  }
  u64 wincl = mine;  // inclusive prefix within the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(kFull, wincl, o);
    if (lane >= o) wincl += t;
  }
  if (lane == 31) sm.wsum[warp] = wincl;
  __syncthreads();
  if (warp == 0) {
    const u64 v = sm.wsum[lane];
    u64 pre = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 t = __shfl_up_sync(kFull, pre, o);
      if (lane >= o) pre += t;
    }
    sm.wsum[lane] = pre - v;  // each lane rewrites only the slot it read
    if (lane == 31) sm.x_kept = pre;
  }
  Group<G>::sync();
  // Every warp finds the block holding the uniform's target (no broadcast barrier).
  const u64 km = lane < G ? Group<G>::peer(&sm, lane)->x_kept : 0;
  if constexpr (G > 1) Group<G>::arrive();  // the exit guard: this thread reads no peer any more
  u64 pre = km;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(kFull, pre, o);
    if (lane >= o) pre += t;
  }
  const u64 total = __shfl_sync(kFull, pre, 31);
  const u64 target = __umul64hi(sm.rnd, total);  // uniform in [0, total)
  const unsigned hit = __ballot_sync(kFull, lane < G && km > 0 && pre - km <= target && target < pre);
  const int owner = hit ? __ffs(hit) - 1 : -1;
  const u64 before = __shfl_sync(kFull, pre - km, owner < 0 ? 0 : owner);
  if (owner < 0) {
    if (rank == 0 && tid == 0) out[row] = argmax;  // no kept mass: cannot happen (q of the argmax is 1)
  } else if (rank == owner) {
    const u64 t = target - before;
    const u64 incl = sm.wsum[warp] + wincl;
    const u64 excl = incl - mine;
    if (excl <= t && t < incl) {
      u64 cum = excl;
      int token = hi - 1;
      for (int i = lo; i < hi; ++i) {
        const float q = q_at(i);
        if (__float_as_uint(q) >= cut) {
          cum += mass_of(q);
          if (cum > t) {
            token = i;
            break;
          }
        }
      }
      out[row] = start + token;
    }
  }
  if constexpr (G > 1) Group<G>::wait();  // no block may exit while its peers can still read its shared memory
}

}  // namespace
}  // namespace fastllm
