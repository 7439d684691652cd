/*
 * Paged KV cache kernels: writing new keys/values into the cache, and decode
 * attention (one new query token per sequence) over it.
 *
 * Cache layout: k_cache, v_cache [num_blocks, block_size, Hk, D], contiguous;
 * token p of sequence b lives in slot block_tables[b][p / block_size] *
 * block_size + p % block_size.
 *
 * reshape_and_cache: k_cache[slot[n]] = k[n], v_cache[slot[n]] = v[n] for
 * k, v [N, Hk, D] (any token and head strides, contiguous last dim: views of a
 * fused qkv projection). One block per token, 16-byte vectors when the sizes,
 * strides and pointers allow: every element read once and written once.
 * Slots outside [0, num_slots) are skipped (-1 marks a padding token).
 *
 * decode_attention: for each sequence b and query head h (KV head h / G, G =
 * Hq / Hk), over the keys j in [start, L) with L = seq_lens[b] and start =
 * max(0, L - window) (0 without a sliding window):
 *   out[b, h] = sum_j softmax_j(q[b, h] . k_j * scale) v_j     (fp32 inside)
 *
 * Algorithm (flash-decoding, split-KV):
 *  - Grid (num_splits, Hk * head_groups, B). A CTA owns one sequence, one KV
 *    head and up to 8 of its query heads, and one contiguous chunk of the key
 *    range. The chunk is computed on the device from seq_lens (which stays in
 *    device memory, so the launch can be captured in a CUDA graph): the range
 *    [start, L) is cut into num_splits chunks rounded up to whole tiles; CTAs
 *    past the end of their sequence exit at once. num_splits only sizes the
 *    grid, so any length is handled correctly whatever num_splits is. A length
 *    past the block table (max_blocks * block_size) is clamped to it, and a
 *    block id outside [0, num_blocks) reads zeros: garbage metadata never
 *    faults.
 *  - Two split kernels share that plan and the workspace layout:
 *    decode_split_tc_kernel (variant 0, the default for head dims 64, 128,
 *    256 and caches under 2^31 slots) runs Q K^T and P V on tensor cores; see
 *    its comment below. decode_split_kernel (variant 1: head dims 80 and 96,
 *    bigger caches, or when asked for) runs on CUDA cores:
 *  - 128 threads. A "row group" of TPK = pow2ceil(D / 8) lanes covers one key
 *    row, each lane one 16-byte chunk (8 elements); 128 / TPK row groups work
 *    on different rows. A thread keeps the 8 query elements of its chunk for
 *    every query head of the group in registers (fp32, pre-scaled by
 *    scale * log2 e), so each K and V element is loaded from memory once and
 *    used for all G heads (GQA/MQA).
 *  - Each thread copies exactly the K/V chunks it will consume with cp.async
 *    (16 bytes, zero-filled past the end of the chunk) into a private slot of
 *    a 3-stage shared-memory ring. Only its own cp.async.wait_group orders the
 *    copy before the read: no barrier in the main loop, warps run freely and
 *    two tiles stay in flight per thread while the third is computed.
 *  - Per tile a row group handles 4 rows: dot products reduced across its
 *    lanes with xor shuffles (every lane gets the identical sum), an fp32
 *    online softmax in base 2 (running max m, sum l, one rescale per tile) and
 *    the P.V accumulation into 8 fp32 outputs per head per lane.
 *  - Epilogue (both kernels): the row groups' (or warps') (m, l, acc) are
 *    merged through shared memory (log-sum-exp). A sequence whose range fits
 *    in one chunk writes the normalised output directly; otherwise each CTA
 *    writes its partial (m, l, acc) to the workspace, and
 *    decode_combine_kernel (one CTA per sequence and query head, every
 *    partial in flight at once, launched with programmatic dependent launch
 *    on sm_90) merges the splits with log-sum-exp weights. (A variant 2 that
 *    fused this combine into the tensor-core split kernel's launch, with
 *    arrival counters, was removed: on an H200 it was no faster.)
 *
 * Measured on an H200 (bench/RESULTS.md, 2026-12-04): the tensor-core kernel
 * with this combine took B=1 x 4096 from 21.2 to 13.5 us and B=32 x 2048
 * from 83 to 67 us (3.99 TB/s), level with torch SDPA (flash) throughout.
 *
 * Memory traffic: each K and V row of the attended range is read exactly once
 * (B * L * Hk * D * 2 elements, 16-byte coalesced accesses, ~256 KB per 4096
 * tokens per KV head at d=128 bf16); q is read once per CTA; the workspace
 * adds B * Hq * splits * (D + 2) fp32 written and read once, which the split
 * policy (one wave of CTAs, at least two tiles per split) keeps to a few
 * percent of the KV bytes. The aim is HBM bandwidth: ~3 TB/s on an H100.
 */
#include "common.cuh"
#include "mma.cuh"

#include <climits>
#include <cmath>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "attention.cu needs sm_80 or newer (cp.async)"
#endif

namespace fastllm {
namespace {

// --------------------------------------------------------------------------- //
// reshape_and_cache
// --------------------------------------------------------------------------- //
template <typename T, int VEC>
__global__ void reshape_and_cache_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                                         const T* __restrict__ v, const int64_t* __restrict__ slots,
                                         int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                                         int64_t v_head_stride, int heads, int head_dim, int64_t num_slots) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slots[token];
  if (slot < 0 || slot >= num_slots) return;
  const int vecs_per_head = head_dim / VEC;
  const int n = heads * vecs_per_head;
  const int64_t row = slot * heads * head_dim;
  const T* k_row = k + token * k_token_stride;
  const T* v_row = v + token * v_token_stride;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / vecs_per_head;
    const int e = (i - h * vecs_per_head) * VEC;
    Vec<T, VEC> x;
    x.load(k_row + h * k_head_stride + e);
    x.store(k_cache + row + h * head_dim + e);
    x.load(v_row + h * v_head_stride + e);
    x.store(v_cache + row + h * head_dim + e);
  }
}

template <typename T>
const char* reshape_and_cache_typed(T* k_cache, T* v_cache, const T* k, const T* v, const int64_t* slots,
                                    int64_t tokens, int heads, int head_dim, int64_t kts, int64_t khs, int64_t vts,
                                    int64_t vhs, int64_t num_slots, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorised = head_dim % VEC == 0 && kts % VEC == 0 && khs % VEC == 0 && vts % VEC == 0 &&
                          vhs % VEC == 0 && aligned16(k_cache) && aligned16(v_cache) && aligned16(k) &&
                          aligned16(v);
  const int64_t work = static_cast<int64_t>(heads) * (vectorised ? head_dim / VEC : head_dim);
  const int threads = static_cast<int>(work >= 256 ? 256 : ceil_div<int64_t>(work, 32) * 32);
  const dim3 grid(static_cast<unsigned>(tokens));
  if (vectorised) {
    reshape_and_cache_kernel<T, VEC><<<grid, threads, 0, stream>>>(k_cache, v_cache, k, v, slots, kts, khs, vts, vhs,
                                                                   heads, head_dim, num_slots);
  } else {
    reshape_and_cache_kernel<T, 1><<<grid, threads, 0, stream>>>(k_cache, v_cache, k, v, slots, kts, khs, vts, vhs,
                                                                 heads, head_dim, num_slots);
  }
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

// --------------------------------------------------------------------------- //
// decode_attention
// --------------------------------------------------------------------------- //
constexpr int kThreads = 128;       // threads per CTA of the split kernel
constexpr int kVec = 8;             // elements per 16-byte chunk (fp16/bf16)
constexpr int kRowsPerGroup = 4;    // key rows per row group per tile
constexpr int kStages = 3;          // shared-memory ring depth (tiles)
constexpr int kMaxHeadsPerCta = 8;  // query heads of one KV head handled by one CTA
constexpr int kMaxSplits = 256;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}
__host__ __device__ constexpr int lanes_per_row(int head_dim) { return pow2_ceil(head_dim / kVec); }
__host__ __device__ constexpr int row_groups(int head_dim) { return kThreads / lanes_per_row(head_dim); }
// Key rows per tile: every row group takes kRowsPerGroup rows.
__host__ __device__ constexpr int tile_rows(int head_dim) { return row_groups(head_dim) * kRowsPerGroup; }

constexpr int kStageBytes = 2 * kRowsPerGroup * kThreads * 16;  // K and V chunks of one tile

// Longest key range the kernels index (the launcher clamps max_len to it): row
// indices up to end + TILE stay far below INT_MAX even when seq_lens (device
// data, never checked on the host) holds garbage.
constexpr int kMaxKeys = INT_MAX - (1 << 20);

// The key range of one split: [begin, end), and how many splits the sequence
// uses. Shared by both kernels so that they agree on the partition. 64-bit
// arithmetic: len + chunk and split * chunk may pass INT_MAX for lengths near it.
struct SplitRange {
  int begin, end, n_active;
};

__device__ __forceinline__ SplitRange split_range(int seq_len, int max_len, int window, int num_splits, int tile,
                                                  int split) {
  seq_len = min(max(seq_len, 0), max_len);
  const int start = window > 0 ? max(0, seq_len - window) : 0;
  const int64_t len = seq_len - start;
  const int64_t chunk = max(int64_t{tile}, ceil_div<int64_t>(ceil_div<int64_t>(len, num_splits), tile) * tile);
  SplitRange r;
  r.n_active = len > 0 ? static_cast<int>(ceil_div<int64_t>(len, chunk)) : 1;
  const int64_t begin = min(start + split * chunk, int64_t{seq_len});  // past the end: an empty range
  r.begin = static_cast<int>(begin);
  r.end = static_cast<int>(min(int64_t{seq_len}, begin + chunk));
  return r;
}

template <typename T>
struct DecodeParams {
  T* out;            // [B, Hq, D]
  float* ws_acc;     // [B, Hq, num_splits, D]   (num_splits > 1 only)
  float* ws_ml;      // [B, Hq, num_splits, 2]   running max (base 2) and sum
  const T* q;        // [B, Hq, D] with strides q_token_stride, q_head_stride
  const T* k_cache;  // [num_blocks, block_size, Hk, D]
  const T* v_cache;
  const int32_t* block_tables;  // [B, max_blocks]
  const int32_t* seq_lens;      // [B]
  int64_t q_token_stride, q_head_stride;
  int64_t kv_slot_stride;  // Hk * D
  int num_q_heads, group, head_groups, heads_per_cta;
  int max_blocks, log2_block, num_blocks, max_len, window, num_splits;
  float scale_log2;
  int trigger;  // on sm_90: let the PDL-launched combine start once every CTA is past its main loop
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = fill ? 16 : 0;  // 0: write 16 zero bytes, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x in one MUFU instruction (relative error ~2^-22; 2^-inf = 0). exp2f
// adds a range fix-up that the softmax does not need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and when the kernel
// was not launched with the attribute). wait: block until the preceding kernel
// has completed and its writes are visible; launch_dependents: allow the next
// kernel (if PDL-launched) to be scheduled once every CTA has called it or exited.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[kVec]);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&f)[kVec]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a 16-bit shift; element 2i is the low half
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&f)[kVec]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// The end of both split kernels: NG parts of the CTA (row groups, or warps)
// each hold a partial online-softmax state (m, l, acc) for up to ROWS query
// heads; they are merged by log-sum-exp in shared memory (the idle ring), and
// the CTA writes the normalised output (its sequence fits one split) or its
// split's partial (m, l, acc) for the combine kernel.
template <int D, int NG, int ROWS>
struct MergeArea {
  static constexpr int kBytes = (NG * ROWS * D + 3 * NG * ROWS + 2 * ROWS) * 4;
  float* acc;    // [NG][ROWS][D]
  float* m;      // [NG][ROWS] running max (base 2)
  float* l;      // [NG][ROWS] running sum
  float* w;      // [NG][ROWS] weights 2^(m - M)
  float* big_l;  // [ROWS] merged sum
  float* big_m;  // [ROWS] merged max

  __device__ explicit MergeArea(void* base)
      : acc(static_cast<float*>(base)),
        m(acc + NG * ROWS * D),
        l(m + NG * ROWS),
        w(l + NG * ROWS),
        big_l(w + NG * ROWS),
        big_m(big_l + ROWS) {}

  // Call once every part has written its acc, m and l and the CTA passed a
  // barrier. THREADS: the CTA's threads; heads h0.. of sequence b, split
  // ``split`` of ``n_active``.
  template <int THREADS, typename T>
  __device__ void finish(const DecodeParams<T>& p, int tid, int nheads, int b, int h0, int split,
                         int n_active) const {
    static_assert(ROWS <= THREADS, "one thread per head merges the maxima");
    if (tid < ROWS) {
      const int h = tid;
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < NG; ++i) mx = fmaxf(mx, m[i * ROWS + h]);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < NG; ++i) {
        const float mi = m[i * ROWS + h];
        const float wi = mi == -INFINITY ? 0.f : fast_exp2(mi - mx);
        w[i * ROWS + h] = wi;
        sum = fmaf(wi, l[i * ROWS + h], sum);
      }
      big_l[h] = sum;
      big_m[h] = mx;
    }
    __syncthreads();
    for (int idx = tid; idx < nheads * D; idx += THREADS) {
      const int h = idx / D, d = idx - h * D;
      float a = 0.f;
#pragma unroll
      for (int i = 0; i < NG; ++i) a = fmaf(w[i * ROWS + h], acc[(i * ROWS + h) * D + d], a);
      const int64_t head_row = static_cast<int64_t>(b) * p.num_q_heads + h0 + h;
      if (n_active == 1) {
        p.out[head_row * D + d] = from_float<T>(big_l[h] > 0.f ? a / big_l[h] : 0.f);
      } else {
        const int64_t part = head_row * p.num_splits + split;
        p.ws_acc[part * D + d] = a;
        if (d == 0) {
          p.ws_ml[part * 2] = big_m[h];
          p.ws_ml[part * 2 + 1] = big_l[h];
        }
      }
    }
  }
};

// Dynamic shared memory of the CUDA-core split kernel: its ring, reused for the merge.
template <int D, int GMAX>
constexpr int decode_smem_bytes() {
  constexpr int ring = kStages * kStageBytes;
  constexpr int merge = MergeArea<D, row_groups(D), GMAX>::kBytes;
  return ring > merge ? ring : merge;
}

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams<T> p) {
  constexpr int NV = D / kVec;             // active lanes per row
  constexpr int TPK = lanes_per_row(D);    // lanes per row group
  constexpr int NG = kThreads / TPK;       // row groups
  constexpr int KB = kRowsPerGroup;
  constexpr int TILE = NG * KB;
  static_assert(D % kVec == 0 && TPK <= 32 && NV <= TPK, "unsupported head_dim");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4* ring = reinterpret_cast<uint4*>(smem_raw);  // [kStages][2][KB][kThreads] 16-byte chunks

  const int tid = threadIdx.x;
  const int grp = tid / TPK, lane = tid % TPK;
  const bool active = lane < NV;
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / p.head_groups;
  const int hg = blockIdx.y - kvh * p.head_groups;
  const int h0 = kvh * p.group + hg * p.heads_per_cta;
  const int nheads = min(p.heads_per_cta, p.group - hg * p.heads_per_cta);

  const SplitRange r = split_range(__ldg(p.seq_lens + b), p.max_len, p.window, p.num_splits, TILE, split);
  if (split >= r.n_active) return;  // uniform over the CTA
  const int begin = r.begin, end = r.end;
  const int ntiles = end > begin ? ceil_div(end - begin, TILE) : 0;

  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks;
  const T* k_base = p.k_cache + kvh * D + lane * kVec;
  const T* v_base = p.v_cache + kvh * D + lane * kVec;
  const int in_block = (1 << p.log2_block) - 1;

  // Row r of a tile for this row group is begin + tile * TILE + r * NG + grp:
  // at each r, the row groups of a warp read consecutive slots.
  auto load_tile = [&](int tile) {
    uint4* dst = ring + (tile % kStages) * (2 * KB * kThreads) + tid;
#pragma unroll
    for (int rr = 0; rr < KB; ++rr) {
      const int j = begin + tile * TILE + rr * NG + grp;
      bool ok = active && j < end;
      int64_t offset = 0;
      if (ok) {
        const int blk = __ldg(table + (j >> p.log2_block));
        ok = static_cast<unsigned>(blk) < static_cast<unsigned>(p.num_blocks);  // never fault on a bad id
        offset = ((static_cast<int64_t>(blk) << p.log2_block) + (j & in_block)) * p.kv_slot_stride;
      }
      if (!ok) offset = 0;
      cp_async_16(dst + rr * kThreads, k_base + offset, ok);
      cp_async_16(dst + (KB + rr) * kThreads, v_base + offset, ok);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();  // empty groups keep the group count uniform
  }

  // The query chunk of every head of the group, pre-scaled so that the
  // softmax runs in base 2. Loaded after the first tiles were requested.
  float q[GMAX][kVec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < nheads && active) {
      Vec<T, kVec> x;
      x.load(p.q + b * p.q_token_stride + (h0 + g) * p.q_head_stride + lane * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] = to_float(x.v[e]) * p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[g][e] = 0.f;
    }
  }

  float m[GMAX], l[GMAX], acc[GMAX][kVec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  for (int t = 0; t < ntiles; ++t) {
    if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this thread's copies of tile t have landed
    const uint4* src = ring + (t % kStages) * (2 * KB * kThreads) + tid;

    float s[KB][GMAX];
#pragma unroll
    for (int rr = 0; rr < KB; ++rr) {
      float kf[kVec];
      unpack8<T>(src[rr * kThreads], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][e], kf[e], dot);
        s[rr][g] = dot;
      }
    }
#pragma unroll
    for (int rr = 0; rr < KB; ++rr) {
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
#pragma unroll
        for (int o = TPK / 2; o > 0; o >>= 1) s[rr][g] += __shfl_xor_sync(0xffffffffu, s[rr][g], o);
      }
      const int j = begin + t * TILE + rr * NG + grp;
      if (j >= end) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) s[rr][g] = -INFINITY;
      }
    }

    // Online softmax, one rescale per tile. s becomes p = 2^(s - m).
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mt = s[0][g];
#pragma unroll
      for (int rr = 1; rr < KB; ++rr) mt = fmaxf(mt, s[rr][g]);
      const float m_new = fmaxf(m[g], mt);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: avoid inf - inf
      const float alpha = fast_exp2(m[g] - base);
      float psum = 0.f;
#pragma unroll
      for (int rr = 0; rr < KB; ++rr) {
        s[rr][g] = fast_exp2(s[rr][g] - base);
        psum += s[rr][g];
      }
      l[g] = fmaf(l[g], alpha, psum);
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= alpha;
    }

#pragma unroll
    for (int rr = 0; rr < KB; ++rr) {
      float vf[kVec];
      unpack8<T>(src[(KB + rr) * kThreads], vf);  // zero past the end: 0 * 0, never 0 * NaN
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(s[rr][g], vf[e], acc[g][e]);
      }
    }
  }

  if (p.trigger) grid_dependency_launch();  // uniform over the CTA

  // Merge the row groups: the ring becomes the reduction area.
  cp_async_wait<0>();
  __syncthreads();
  const MergeArea<D, NG, GMAX> red(smem_raw);
  if (active) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float4* dst = reinterpret_cast<float4*>(red.acc + (grp * GMAX + g) * D + lane * kVec);
      dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      red.m[grp * GMAX + g] = m[g];
      red.l[grp * GMAX + g] = l[g];
    }
  }
  __syncthreads();
  red.template finish<kThreads>(p, tid, nheads, b, h0, split, r.n_active);
}

// --------------------------------------------------------------------------- //
// decode_attention variant 0 (the default where it applies): the split
// kernel on tensor cores.
//
// Why: the kernel above spends ~780 instructions per warp on every 4 KB of
// K/V (SASS, D = 128, 4 heads per KV head): 256 FMAs, 64 shuffles and their
// adds to reduce each dot product over 16 lanes, and a softmax repeated on all
// of them. That is close to the issue rate of an SM at HBM speed. Here Q K^T
// and P V run as mma.sync m16n8k16 (the query heads of one KV head are the 16
// rows of A, at most 8 of them real): 362 instructions per 8 KB (SASS, sm_90a).
//
// Layout: 4 warps per CTA, each on its own 16 keys of every 64-key tile, with
// its own cp.async ring of K/V rows (swizzled, ldmatrix-ready) and its own
// online-softmax state; no barrier in the main loop. A lane (g, t) holds the
// scores of head g for keys 2t, 2t+1 and 8+2t, 9+2t, and the output of head g
// at d = 8j + 2t, +1. The warps' (m, l, O) merge in shared memory at the end
// exactly as the row groups do above, and the partials go to the same
// workspace, so the one combine kernel serves both (with this kernel's tile).
// Head dims 64, 128, 256 (rows of a multiple of 128 bytes); the others run
// the kernel above.
// --------------------------------------------------------------------------- //
constexpr int kTcWarps = 4;
constexpr int kTcKeys = 16;                  // keys per warp per tile
constexpr int kTcTile = kTcWarps * kTcKeys;  // keys per CTA tile: split_range's unit here
constexpr int kTcRows = 8;                   // real rows of A: a CTA has at most kMaxHeadsPerCta heads
static_assert(kMaxHeadsPerCta <= kTcRows, "the heads of a CTA are rows g < 8 of the mma");

__host__ __device__ constexpr bool tc_head_dim(int d) { return d == 64 || d == 128 || d == 256; }
template <int D>
constexpr int tc_stages() {
  return D >= 256 ? 2 : D >= 128 ? 3 : 4;
}
template <int D>
constexpr int tc_stage_bytes() {
  return 2 * kTcKeys * D * 2;  // K and V rows of one warp's 16 keys
}
template <int D>
constexpr int tc_smem_bytes() {
  constexpr int ring = kTcWarps * tc_stages<D>() * tc_stage_bytes<D>();
  constexpr int merge = MergeArea<D, kTcWarps, kTcRows>::kBytes;
  return ring > merge ? ring : merge;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTcWarps * 32) decode_split_tc_kernel(const DecodeParams<T> p) {
  constexpr int KS = D / 16;                 // k-steps of Q K^T
  constexpr int NT = D / 8;                  // n-tiles (8 columns of d) of P V
  constexpr int STAGES = tc_stages<D>();
  constexpr int ROW = D * 2;                 // bytes of a K/V row in shared memory
  constexpr int CH = D / 8;                  // 16-byte chunks per row
  constexpr int LPR = CH < 32 ? CH : 32;     // lanes per row of a copy
  constexpr int RPI = 32 / LPR;              // rows per copy step
  constexpr int STAGE = tc_stage_bytes<D>();
  static_assert(ROW % 128 == 0 && CH == LPR, "rows of 128, 256 or 512 bytes: one chunk per lane per row");
  extern __shared__ __align__(16) unsigned char smem_raw[];  // 16-byte chunks; the swizzle needs no more

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / p.head_groups;
  const int hg = blockIdx.y - kvh * p.head_groups;
  const int h0 = kvh * p.group + hg * p.heads_per_cta;
  const int nheads = min(p.heads_per_cta, p.group - hg * p.heads_per_cta);

  const SplitRange r = split_range(__ldg(p.seq_lens + b), p.max_len, p.window, p.num_splits, kTcTile, split);
  if (split >= r.n_active) return;  // uniform over the CTA
  const int begin = r.begin, end = r.end;
  const int ntiles = end > begin ? ceil_div(end - begin, kTcTile) : 0;

  const uint32_t ring = mma::smem_u32(smem_raw) + warp * STAGES * STAGE;  // this warp's ring: [slot][K rows, V rows]
  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks;
  const int in_block = (1 << p.log2_block) - 1;
  const int chunk = lane % LPR;
  const T* k_base = p.k_cache + kvh * D + chunk * 8;
  const T* v_base = p.v_cache + kvh * D + chunk * 8;

  const uint32_t slot_bytes = static_cast<uint32_t>(p.kv_slot_stride) * sizeof(T);  // Hk * D * 2 < 2^29
  const unsigned char* k_bytes = reinterpret_cast<const unsigned char*>(k_base);
  const unsigned char* v_bytes = reinterpret_cast<const unsigned char*>(v_base);

  // Lane r < 16 looks up the cache slot of key r of this warp's 16 (lanes
  // 16-31 repeat it; -1: past the end, or a block id outside the cache, which
  // reads zeros and never faults). Lane L then copies chunk L % LPR of rows
  // L / LPR + RPI * i, their slots shuffled from the lanes that found them.
  // Slots fit an int: the launcher runs this kernel only for caches of fewer
  // than 2^31 slots.
  auto load_tile = [&](int tile) {
    const uint32_t stage = ring + (tile % STAGES) * STAGE;
    const int j = begin + tile * kTcTile + warp * kTcKeys + (lane & 15);
    const int jc = min(j, end - 1);  // a valid table index even past the end (end > begin here)
    const int blk = __ldg(table + (jc >> p.log2_block));
    const bool found = j < end && static_cast<unsigned>(blk) < static_cast<unsigned>(p.num_blocks);
    const int my_slot = found ? (blk << p.log2_block) | (jc & in_block) : -1;
#pragma unroll
    for (int i = 0; i < kTcKeys / RPI; ++i) {
      const int row = lane / LPR + RPI * i;
      const int slot = __shfl_sync(0xffffffffu, my_slot, row);
      const bool ok = slot >= 0;
      const uint64_t offset = static_cast<uint64_t>(static_cast<uint32_t>(ok ? slot : 0)) * slot_bytes;
      const uint32_t dst = stage + mma::swizzle(row, chunk, ROW);
      mma::cp_async_16(dst, k_bytes + offset, ok);  // zero past the end: 0 * 0, never 0 * NaN
      mma::cp_async_16(dst + kTcKeys * ROW, v_bytes + offset, ok);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_tile(s);
    mma::cp_async_commit();  // empty groups keep the group count uniform
  }

  // A of Q K^T: row g = query head h0 + g (zero past nheads), rows g + 8 zero.
  uint32_t qa[KS][2];  // (a0, a2) per k-step; a1 = a3 = 0
  {
    const T* qrow = p.q + b * p.q_token_stride + (h0 + min(g, nheads - 1)) * p.q_head_stride + 2 * t;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qa[ks][0] = g < nheads ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks) : 0u;
      qa[ks][1] = g < nheads ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks + 8) : 0u;
    }
  }

  float m = -INFINITY, l = 0.f;  // head g's running max (base 2, scaled) and this lane's share of the sum
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  for (int tile = 0; tile < ntiles; ++tile) {
    __syncwarp();  // every lane is done reading the slot refilled next
    if (tile + STAGES - 1 < ntiles) load_tile(tile + STAGES - 1);
    mma::cp_async_commit();
    mma::cp_async_wait<STAGES - 1>();  // this lane's copies of `tile` landed
    __syncwarp();                      // and every other lane's
    const uint32_t k_tile = ring + (tile % STAGES) * STAGE;
    const uint32_t v_tile = k_tile + kTcKeys * ROW;

    // S = Q K^T for keys 0-7 (n-tile 0) and 8-15 (n-tile 1) of this warp.
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kp = 0; kp < KS / 2; ++kp) {
        uint32_t bk[4];  // b0, b1 of k-steps 2kp and 2kp + 1
        mma::ldmatrix_x4(bk, k_tile + mma::swizzle(8 * nt + (lane & 7), 4 * kp + (lane >> 3), ROW));
        const uint32_t a0[4] = {qa[2 * kp][0], 0u, qa[2 * kp][1], 0u};
        const uint32_t a1[4] = {qa[2 * kp + 1][0], 0u, qa[2 * kp + 1][1], 0u};
        mma::mma_16816<T>(s[nt], a0, bk[0], bk[1]);
        mma::mma_16816<T>(s[nt], a1, bk[2], bk[3]);
      }
    }

    // Online softmax of head g over the 16 keys (4 per lane, 4 lanes per head).
    const int key0 = begin + tile * kTcTile + warp * kTcKeys + 2 * t;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = key0 + (i >> 1) * 8 + (i & 1);
      x[i] = key < end ? s[i >> 1][i & 1] * p.scale_log2 : -INFINITY;
    }
    float mt = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
    const float m_new = fmaxf(m, mt);
    const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: avoid inf - inf
    const float alpha = fast_exp2(m - base);
    float pr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[i] = fast_exp2(x[i] - base);
    l = fmaf(l, alpha, (pr[0] + pr[1]) + (pr[2] + pr[3]));
    m = m_new;
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // rows g + 8 (c2, c3) stay zero: no rescale
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }

    // O += P V: A = P (row g: keys 2t, 2t+1 | 8+2t, 9+2t), B = V by ldmatrix.trans.
    const uint32_t pa[4] = {mma::pack2<T>(pr[0], pr[1]), 0u, mma::pack2<T>(pr[2], pr[3]), 0u};
#pragma unroll
    for (int jp = 0; jp < NT / 2; ++jp) {
      uint32_t bv[4];  // (keys 0-7 | 8-15) x (d chunk 2jp | 2jp + 1)
      mma::ldmatrix_x4_trans(bv, v_tile + mma::swizzle(((lane >> 3) & 1) * 8 + (lane & 7), 2 * jp + (lane >> 4), ROW));
      mma::mma_16816<T>(o[2 * jp], pa, bv[0], bv[1]);
      mma::mma_16816<T>(o[2 * jp + 1], pa, bv[2], bv[3]);
    }
  }
  if (p.trigger) grid_dependency_launch();  // uniform over the CTA

  // Merge the warps (log-sum-exp), as the row groups of the kernel above.
  mma::cp_async_wait<0>();
  __syncthreads();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  const MergeArea<D, kTcWarps, kTcRows> red(smem_raw);
  {
    float* row = red.acc + (warp * kTcRows + g) * D + 2 * t;
#pragma unroll
    for (int j = 0; j < NT; ++j) *reinterpret_cast<float2*>(row + 8 * j) = make_float2(o[j][0], o[j][1]);
    if (t == 0) {
      red.m[warp * kTcRows + g] = m;
      red.l[warp * kTcRows + g] = l;
    }
  }
  __syncthreads();
  red.template finish<kTcWarps * 32>(p, tid, nheads, b, h0, split, r.n_active);
}

// The combine: out = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m)
// over the splits of one (sequence, query head), with every partial in flight
// at once: warp w takes splits w, w + 8, ... and a lane a float4 of the row,
// so up to 64 splits are one L2 round trip, issued before the weights are
// computed. (A loop over the splits with 4 loads in flight, the first
// version, waited on n / 4 dependent round trips: 16 at B = 1 x 4096, ~4 us.)
// Launched with programmatic dependent launch on sm_90 (its CTAs are scheduled
// while the split kernel's last CTAs finish); every CTA waits for the split
// kernel before anything else, so its completion still implies the split
// kernel's (the next kernel in the stream may read out at once).
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombinePerPass = 8;  // splits per warp per pass: partial rows in flight per thread
static_assert(kCombineThreads >= kMaxSplits, "one (m, l) pair per thread");

// The combine's arithmetic (decode_combine_kernel below): split s has weight
// w_s = 2^(m_s - max m) (0 for an empty split), its row adds into chain
// s % kCombineWarps (a warp of the combine) in increasing s, the chains are
// summed in order 0, 1, ..., and sum_s w_s l_s is a butterfly sum over each
// group of 32 consecutive splits, the groups added in order.
__device__ __forceinline__ float combine_weight(bool valid, float m, float mx) {
  return valid && m != -INFINITY ? fast_exp2(m - mx) : 0.f;
}
__device__ __forceinline__ void fma4(float4& a, float w, const float4& v) {
  a.x = fmaf(w, v.x, a.x);
  a.y = fmaf(w, v.y, a.y);
  a.z = fmaf(w, v.z, a.z);
  a.w = fmaf(w, v.w, a.w);
}
__device__ __forceinline__ void add4(float4& t, const float4& x) {
  t.x += x.x;
  t.y += x.y;
  t.z += x.z;
  t.w += x.w;
}
__device__ __forceinline__ float combine_inv(float total) { return total > 0.f ? 1.f / total : 0.f; }
template <typename T>
__device__ __forceinline__ void store4_scaled(T* dst, const float4& t, float inv) {
  Vec<T, 4> o;
  o.v[0] = from_float<T>(t.x * inv);
  o.v[1] = from_float<T>(t.y * inv);
  o.v[2] = from_float<T>(t.z * inv);
  o.v[3] = from_float<T>(t.w * inv);
  o.store(dst);
}

template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(T* __restrict__ out, const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                           const int32_t* __restrict__ seq_lens, int num_q_heads, int num_splits, int tile,
                           int max_len, int window) {
  constexpr int W = kCombineWarps;
  constexpr int C4 = D / 4;            // float4 chunks of a row
  constexpr int NL = (C4 + 31) / 32;   // chunks per lane (2 for D = 256)
  constexpr int PER = kCombinePerPass;
  static_assert(D % 4 == 0, "rows are read as float4");
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[2][W];
  __shared__ float4 s_acc[W][C4];

  grid_dependency_wait();  // first, before any early exit (see above)
  const int h = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const SplitRange r = split_range(__ldg(seq_lens + b), max_len, window, num_splits, tile, 0);
  if (r.n_active <= 1) return;  // the split kernel wrote this output directly
  const int n = r.n_active;
  const int64_t part0 = (static_cast<int64_t>(b) * num_q_heads + h) * num_splits;
  const float4* acc4 = reinterpret_cast<const float4*>(ws_acc + part0 * D);

  float4 v[PER][NL];
  auto load_pass = [&](int pass) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int s = (pass * PER + i) * W + warp;
#pragma unroll
      for (int c = 0; c < NL; ++c) {
        const int chunk = lane + 32 * c;
        v[i][c] = s < n && chunk < C4 ? acc4[static_cast<int64_t>(s) * C4 + chunk] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  };
  load_pass(0);  // in flight while the weights are computed

  float ms = -INFINITY, ls = 0.f;
  if (tid < n) {
    const float2 ml = reinterpret_cast<const float2*>(ws_ml)[part0 + tid];
    ms = ml.x;
    ls = ml.y;
  }
  float mx = ms;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_red[0][warp] = mx;
  __syncthreads();
  mx = s_red[0][0];
#pragma unroll
  for (int i = 1; i < W; ++i) mx = fmaxf(mx, s_red[0][i]);
  const float w = combine_weight(tid < n, ms, mx);
  if (tid < n) s_w[tid] = w;
  const float part_sum = warp_reduce_sum(w * ls);
  if (lane == 0) s_red[1][warp] = part_sum;
  __syncthreads();  // s_w and s_red[1] complete
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < W; ++i) total += s_red[1][i];

  float4 a[NL];
#pragma unroll
  for (int c = 0; c < NL; ++c) a[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int pass = 0; pass * PER * W < n; ++pass) {
    if (pass > 0) load_pass(pass);
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int s = (pass * PER + i) * W + warp;
      if (s < n) {
        const float ws = s_w[s];
#pragma unroll
        for (int c = 0; c < NL; ++c) fma4(a[c], ws, v[i][c]);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < NL; ++c) {
    const int chunk = lane + 32 * c;
    if (chunk < C4) s_acc[warp][chunk] = a[c];
  }
  __syncthreads();
  const float inv = combine_inv(total);
  T* const dst = out + (static_cast<int64_t>(b) * num_q_heads + h) * D;
  for (int chunk = tid; chunk < C4; chunk += kCombineThreads) {
    float4 t = s_acc[0][chunk];
#pragma unroll
    for (int i = 1; i < W; ++i) add4(t, s_acc[i][chunk]);  // a fixed order: the result does not depend on timing
    store4_scaled<T>(dst + 4 * chunk, t, inv);
  }
}

// Calls f(integral_constant<D>, integral_constant<GMAX>) for a supported
// (head_dim, heads per CTA rounded up to a power of two).
template <int V>
struct IntC {
  static constexpr int value = V;
};

template <int D, typename F>
const char* dispatch_gmax(int gmax, F&& f) {
  switch (gmax) {
    case 1: return f(IntC<D>{}, IntC<1>{});
    case 2: return f(IntC<D>{}, IntC<2>{});
    case 4: return f(IntC<D>{}, IntC<4>{});
    case 8: return f(IntC<D>{}, IntC<8>{});
  }
  return "internal error: unsupported heads per CTA";
}

template <typename F>
const char* dispatch_decode(int64_t head_dim, int gmax, F&& f) {
  switch (head_dim) {
    case 64: return dispatch_gmax<64>(gmax, f);
    case 80: return dispatch_gmax<80>(gmax, f);
    case 96: return dispatch_gmax<96>(gmax, f);
    case 128: return dispatch_gmax<128>(gmax, f);
    case 256: return dispatch_gmax<256>(gmax, f);
  }
  return "head_dim must be 64, 80, 96, 128 or 256";
}

constexpr const char* kVariantError =
    "variant must be 0 (default: tensor cores where the head dim allows) or 1 (CUDA cores)";

// How the query heads of one KV head are spread over CTAs.
struct HeadSplit {
  int head_groups, heads_per_cta, gmax;
};

HeadSplit head_split(int64_t group) {
  HeadSplit s;
  s.head_groups = static_cast<int>(ceil_div<int64_t>(group, kMaxHeadsPerCta));
  s.heads_per_cta = static_cast<int>(ceil_div<int64_t>(group, s.head_groups));
  s.gmax = pow2_ceil(s.heads_per_cta);
  return s;
}

const char* check_decode_shapes(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                int dtype) {
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "dtype must be float16 or bfloat16";
  if (head_dim != 64 && head_dim != 80 && head_dim != 96 && head_dim != 128 && head_dim != 256)
    return "head_dim must be 64, 80, 96, 128 or 256";
  if (num_kv_heads <= 0 || num_q_heads <= 0 || num_q_heads % num_kv_heads != 0)
    return "num_q_heads must be a positive multiple of num_kv_heads";
  if (batch < 0 || batch > 65535) return "batch must be in [0, 65535]";
  if (num_q_heads > (1 << 20)) return "too many heads";
  const HeadSplit hs = head_split(num_q_heads / num_kv_heads);
  if (num_kv_heads * hs.head_groups > 65535) return "too many KV heads";
  return nullptr;
}

int device_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  static int cached[64] = {};
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
  if (dev >= 0 && dev < 64) cached[dev] = sms;
  return sms;
}

// Blocks of Kernel resident per SM with `threads` threads and `smem` bytes of
// dynamic shared memory (opted in first), asked once per device; `fallback`
// when the query fails.
template <auto Kernel>
int cached_occupancy(int threads, int smem, int fallback) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  static int cached[64] = {};
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int blocks = 0;
  if (opt_in_smem<Kernel>(smem) != nullptr ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, smem) != cudaSuccess || blocks <= 0) {
    cudaGetLastError();  // a failed query must not be reported by the next launch check
    blocks = fallback;
  }
  if (dev >= 0 && dev < 64) cached[dev] = blocks;
  return blocks;
}

// Whether the tensor-core split kernel (variant 0) covers this head dim.
bool uses_tc(int variant, int64_t head_dim) { return variant == 0 && tc_head_dim(static_cast<int>(head_dim)); }

template <typename T>
const char* num_splits_typed(int64_t* splits, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t max_seq_len, int64_t sliding_window, int variant) {
  const HeadSplit hs = head_split(num_q_heads / num_kv_heads);
  return dispatch_decode(head_dim, hs.gmax, [&](auto d, auto g) -> const char* {
    constexpr int D = decltype(d)::value, GMAX = decltype(g)::value;
    const int64_t ctas_per_split = batch * num_kv_heads * hs.head_groups;
    int occupancy = 0, tile = tile_rows(D);
    if constexpr (tc_head_dim(D)) {
      if (uses_tc(variant, D)) {
        occupancy = cached_occupancy<decode_split_tc_kernel<T, D>>(kTcWarps * 32, tc_smem_bytes<D>(), 1);
        tile = kTcTile;
      }
    }
    if (occupancy == 0)
      occupancy = cached_occupancy<decode_split_kernel<T, D, GMAX>>(kThreads, decode_smem_bytes<D, GMAX>(), 2);
    const int64_t wave = static_cast<int64_t>(device_sm_count()) * occupancy;
    int64_t n = ctas_per_split > 0 ? wave / ctas_per_split : 1;  // fill one wave, never more
    int64_t keys = max_seq_len;
    if (sliding_window > 0 && sliding_window < keys) keys = sliding_window;
    const int64_t by_length = keys / (2 * tile);  // at least two tiles per split
    if (n > by_length) n = by_length;
    if (n > kMaxSplits) n = kMaxSplits;
    *splits = n < 1 ? 1 : n;
    return nullptr;
  });
}

// Whether the current device takes programmatic dependent launch (sm_90+).
bool device_has_pdl() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  if (dev >= 0 && dev < 64 && cached[dev] != 0) return cached[dev] == 2;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    major = 0;
  }
  if (dev >= 0 && dev < 64) cached[dev] = major >= 9 ? 2 : 1;
  return major >= 9;
}

template <typename T, int D>
const char* launch_combine(const DecodeParams<T>& p, int64_t batch, int tile, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.num_q_heads), static_cast<unsigned>(batch));
  cfg.blockDim = dim3(kCombineThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  FASTLLM_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, decode_combine_kernel<T, D>, p.out,
                                             static_cast<const float*>(p.ws_acc), static_cast<const float*>(p.ws_ml),
                                             p.seq_lens, p.num_q_heads, p.num_splits, tile, p.max_len, p.window));
  return nullptr;
}

template <typename T>
const char* decode_typed(const DecodeParams<T>& p, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int gmax,
                         int variant, bool pdl, cudaStream_t stream) {
  return dispatch_decode(head_dim, gmax, [&](auto d, auto g) -> const char* {
    constexpr int D = decltype(d)::value, GMAX = decltype(g)::value;
    const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(num_kv_heads * p.head_groups),
                    static_cast<unsigned>(batch));
    if constexpr (tc_head_dim(D)) {
      if (uses_tc(variant, D)) {  // variant 0: tensor cores
        // more than the default 48 KB of dynamic shared memory: opted in once per device
        if (const char* err = opt_in_smem<decode_split_tc_kernel<T, D>>(tc_smem_bytes<D>())) return err;
        decode_split_tc_kernel<T, D><<<grid, kTcWarps * 32, tc_smem_bytes<D>(), stream>>>(p);
        FASTLLM_CHECK_LAUNCH();
        return p.num_splits > 1 ? launch_combine<T, D>(p, batch, kTcTile, pdl, stream) : nullptr;
      }
    }
    decode_split_kernel<T, D, GMAX><<<grid, kThreads, decode_smem_bytes<D, GMAX>(), stream>>>(p);
    FASTLLM_CHECK_LAUNCH();
    return p.num_splits > 1 ? launch_combine<T, D>(p, batch, tile_rows(D), pdl, stream) : nullptr;
  });
}

static_assert(decode_smem_bytes<64, 8>() <= 48 * 1024 && decode_smem_bytes<256, 8>() <= 48 * 1024 &&
                  decode_smem_bytes<128, 8>() <= 48 * 1024,
              "the split kernel must fit the default 48 KB of dynamic shared memory");

}  // namespace

const char* launch_reshape_and_cache(void* k_cache, void* v_cache, const void* k, const void* v,
                                     const void* slot_mapping, int64_t num_tokens, int64_t num_heads,
                                     int64_t head_dim, int64_t k_token_stride, int64_t k_head_stride,
                                     int64_t v_token_stride, int64_t v_head_stride, int64_t num_slots, int dtype,
                                     void* stream) {
  if (num_tokens == 0) return nullptr;
  if (num_tokens < 0 || num_tokens > 0x7fffffffLL) return "num_tokens out of range";
  if (num_heads <= 0 || head_dim <= 0 || num_heads * head_dim > (1LL << 30)) return "heads * head_dim out of range";
  return FASTLLM_DISPATCH_FLOAT(dtype, [&] {
    return reshape_and_cache_typed<scalar_t>(
        static_cast<scalar_t*>(k_cache), static_cast<scalar_t*>(v_cache), static_cast<const scalar_t*>(k),
        static_cast<const scalar_t*>(v), static_cast<const int64_t*>(slot_mapping), num_tokens,
        static_cast<int>(num_heads), static_cast<int>(head_dim), k_token_stride, k_head_stride, v_token_stride,
        v_head_stride, num_slots, static_cast<cudaStream_t>(stream));
  });
}

const char* decode_attention_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t batch,
                                  int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_seq_len,
                                  int64_t sliding_window, int64_t requested_splits, int64_t variant, int dtype) {
  *num_splits = 1;
  *workspace_floats = 0;
  if (const char* err = check_decode_shapes(batch, num_q_heads, num_kv_heads, head_dim, dtype)) return err;
  if (requested_splits < 0 || requested_splits > kMaxSplits) return "num_splits must be in [1, 256] (0 = automatic)";
  if (variant != 0 && variant != 1) return kVariantError;
  if (batch == 0) return nullptr;
  if (requested_splits > 0) {
    *num_splits = requested_splits;
  } else if (const char* err = dtype == static_cast<int>(DType::kFloat16)
                                   ? num_splits_typed<__half>(num_splits, batch, num_q_heads, num_kv_heads, head_dim,
                                                              max_seq_len, sliding_window, static_cast<int>(variant))
                                   : num_splits_typed<__nv_bfloat16>(num_splits, batch, num_q_heads, num_kv_heads,
                                                                     head_dim, max_seq_len, sliding_window,
                                                                     static_cast<int>(variant))) {
    return err;
  }
  *workspace_floats = *num_splits > 1 ? batch * num_q_heads * *num_splits * (head_dim + 2) : 0;
  return nullptr;
}

const char* launch_decode_attention(void* out, void* workspace, const void* q, const void* k_cache,
                                    const void* v_cache, const void* block_tables, const void* seq_lens,
                                    int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t q_token_stride, int64_t q_head_stride, int64_t num_blocks,
                                    int64_t block_size, int64_t max_blocks, float scale, int64_t sliding_window,
                                    int64_t num_splits, int64_t variant, int dtype, void* stream) {
  if (const char* err = check_decode_shapes(batch, num_q_heads, num_kv_heads, head_dim, dtype)) return err;
  if (variant != 0 && variant != 1) return kVariantError;
  if (batch == 0) return nullptr;
  if (block_size <= 0 || (block_size & (block_size - 1)) != 0 || block_size > (1 << 20))
    return "block_size must be a power of two in [1, 2^20]";
  if (num_blocks < 0 || num_blocks > INT_MAX) return "num_blocks out of range";
  if (max_blocks < 0 || max_blocks > INT_MAX) return "max_blocks out of range";
  if (sliding_window < 0 || sliding_window > INT_MAX) return "sliding_window out of range (0 = none)";
  if (num_splits < 1 || num_splits > kMaxSplits) return "num_splits must be in [1, 256]";
  if (num_splits > 1 && workspace == nullptr) return "num_splits > 1 needs a workspace";
  if (!std::isfinite(scale)) return "scale must be finite";
  if (q_token_stride % kVec || q_head_stride % kVec) return "q strides must be multiples of 8 elements";
  if (!aligned16(out) || !aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache) ||
      (workspace != nullptr && !aligned16(workspace)))
    return "out, q, caches and workspace must be 16-byte aligned";

  // The tensor-core kernel keeps cache slots in an int: bigger caches run variant 1 (same plan, any split count
  // works).
  if (variant == 0 && num_blocks * block_size > INT_MAX) variant = 1;
  const HeadSplit hs = head_split(num_q_heads / num_kv_heads);
  int log2_block = 0;
  while ((int64_t{1} << log2_block) < block_size) ++log2_block;
  const int64_t max_len = max_blocks * block_size;

  auto fill = [&](auto* typed_out) {
    using T = std::remove_pointer_t<decltype(typed_out)>;
    DecodeParams<T> p;
    p.out = typed_out;
    p.ws_acc = static_cast<float*>(workspace);
    p.ws_ml = num_splits > 1 ? p.ws_acc + batch * num_q_heads * num_splits * head_dim : nullptr;
    p.q = static_cast<const T*>(q);
    p.k_cache = static_cast<const T*>(k_cache);
    p.v_cache = static_cast<const T*>(v_cache);
    p.block_tables = static_cast<const int32_t*>(block_tables);
    p.seq_lens = static_cast<const int32_t*>(seq_lens);
    p.q_token_stride = q_token_stride;
    p.q_head_stride = q_head_stride;
    p.kv_slot_stride = num_kv_heads * head_dim;
    p.num_q_heads = static_cast<int>(num_q_heads);
    p.group = static_cast<int>(num_q_heads / num_kv_heads);
    p.head_groups = hs.head_groups;
    p.heads_per_cta = hs.heads_per_cta;
    p.max_blocks = static_cast<int>(max_blocks);
    p.log2_block = log2_block;
    p.num_blocks = static_cast<int>(num_blocks);
    p.max_len = static_cast<int>(max_len < kMaxKeys ? max_len : kMaxKeys);
    p.window = static_cast<int>(sliding_window);
    p.num_splits = static_cast<int>(num_splits);
    p.scale_log2 = scale * kLog2e;
    const bool pdl = num_splits > 1 && device_has_pdl();
    p.trigger = pdl ? 1 : 0;
    return decode_typed<T>(p, batch, num_kv_heads, head_dim, hs.gmax, static_cast<int>(variant), pdl,
                           static_cast<cudaStream_t>(stream));
  };
  if (dtype == static_cast<int>(DType::kFloat16)) return fill(static_cast<__half*>(out));
  return fill(static_cast<__nv_bfloat16*>(out));
}

}  // namespace fastllm
