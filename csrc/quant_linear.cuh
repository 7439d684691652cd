/*
 * Shared pieces of the weight-only quantized linear kernels (int8_linear.cu,
 * int4_linear.cu): cp.async and mma.sync wrappers, the shared-memory swizzle of
 * the weight tile, the split-K reduction, the tile-size choice by token count
 * and the launch plan.
 *
 * The idea both kernels rest on (why the canonical row-major weights need no
 * offline repacking for tensor cores): y^T = W x^T, so the weights are the mma
 * A operand (16 output features per m16n8k16 tile) and the tokens the B operand
 * (8 per tile; decode batches waste at most the B side). An mma sums over its
 * 16 "logical" k; lane (g, t) (g = lane / 4, t = lane % 4) supplies A rows g and
 * g + 8 and B column g at the logical k {2t, 2t+1, 2t+8, 2t+9} only. So any
 * per-t bijection between logical k and physical columns of W and x gives the
 * same dot product, as long as A and B use the same one. Each lane therefore
 * takes a contiguous 16-byte run of its two weight rows (one LDS.128 each) and
 * feeds its values to successive mmas; it reads the matching x columns for
 * its B fragment. Marlin gets the same effect by permuting the weights offline.
 *
 * Launch plan: token tiles TT = ceil(M / 8) rounded to 1, 2, 4, 8 (M > 64 loops
 * over 64-token blocks in grid.z); CTAs own BN weight rows and, when there are
 * too few row tiles to occupy the GPU, a 1/S share of K (split-K). Split-K
 * partial sums go to an fp32 workspace [S, M, N] and a second kernel adds them
 * in a fixed order (deterministic, no atomics) with the bias.
 */
#pragma once

#include "common.cuh"

namespace fastllm {
namespace qlinear {

constexpr int kMaxTokensPerCta = 64;      // 8 token tiles of 8
constexpr int kMaxSplits = 16;

// Token tiles of 8 per CTA for M tokens: 1, 2, 4 or 8.
inline int token_tiles(int64_t m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

// CTAs of a kernel with `smem` bytes of dynamic shared memory that fit on one
// SM of the current device (1 KB reserved per CTA; 228 KB per SM, Hopper's,
// without a device), at most 4.
inline int ctas_per_sm(int smem) {
  int dev = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
      per_sm <= 0) {
    cudaGetLastError();  // no device: not an error for the next launch check to report
    per_sm = 228 * 1024;
  }
  const int n = per_sm / (smem + 1024);
  return n < 1 ? 1 : n > 4 ? 4 : n;
}

// Split-K factor: enough splits to fill every SM with as many CTAs as its
// shared memory holds (resident = ctas_per_sm(SMEM)), each split keeping at
// least two K tiles so that its pipeline has something to overlap. One token
// tile (M <= 8) is pure weight streaming: a grid of at least half a wave
// already reads at full speed there, and the reduction costs more than it
// gains, so it is not split. Fitted to the H200 sweep of 2026-12-04
// (bench/RESULTS.md: int4 and int8, 3 shapes x M 1 / 16, the best split
// count within 3% in every case; the first rule, about one CTA per SM and
// no split above half a wave, was 13-27% slower in 7 of those 12).
inline int64_t choose_splits(int64_t ctas, int64_t k_tiles, int64_t sms, int64_t requested, int64_t m,
                             int resident) {
  if (requested > 0) return requested < k_tiles ? requested : k_tiles;
  if (sms <= 0) sms = 132;
  if (token_tiles(m) == 1 && ctas * 2 > sms) return 1;
  int64_t s = sms * resident / ctas;
  const int64_t cap = k_tiles / 2 > 1 ? k_tiles / 2 : 1;
  if (s > cap) s = cap;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : s;
}

// ---------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy through L2 only; zero-fills (reads nothing) when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// The same copy to a shared-memory address already converted (smem_u32 once, outside the main loop).
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// No L2 cache hint on the weight loads: the evict-first policy they had
// (createpolicy.fractional + cp.async ... L2::cache_hint) runs into a ptxas 13.x
// miscompile of fractional policies on cp.async (Triton disabled them for the
// same reason, triton-lang/triton#11660; fixed in ptxas 13.4): on an H200 with
// nvcc 13.0 every launch of both quantized kernels stopped with "an illegal
// instruction was encountered" (2026-12-04). The weights stream through L2 once
// anyway; the hint only protected x and the scales, which are small.

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant after unrolling
}

// d += A (16x16, row) * B (16x8, col), fp32 accumulate; a/b hold pairs of 16-bit values.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Packed 16-bit pair arithmetic on raw 32-bit registers (round to nearest).
template <typename T>
struct Pair;

template <>
struct Pair<__half> {
  static constexpr uint32_t kMagic = 0x6400;  // 1024.0: a 4- or 8-bit integer u in the low mantissa bits reads 1024 + u
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float bits_to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  static constexpr float kMagicValue = 1024.f;
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                        *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t bits_of(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <>
struct Pair<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x4300;  // 128.0: 7 mantissa bits, so 4-bit integers only
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float bits_to_float(uint32_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
  }
  static constexpr float kMagicValue = 128.f;
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                               *reinterpret_cast<__nv_bfloat162*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t bits_of(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

// (a & b) | c in one LOP3 (the compiler splits it in two when b and c are both
// immediates: an instruction takes one).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Weight tile rows of >= 128 bytes: lanes (g, t) read 16-byte chunk t (+ 4j) of
// rows g and g+1 in the same quarter-warp phase; flipping chunk bit 2 on odd
// rows puts the two rows in opposite halves of the 32 banks. 64-byte rows are
// already conflict-free.
template <int ROW_BYTES>
__device__ __forceinline__ int w_chunk(int row, int c) {
  return ROW_BYTES >= 128 ? (c ^ ((row & 1) << 2)) : c;
}

// One thread's tile copies in the main loops of int8_linear and int4_linear:
// where each of its 16-byte chunks of a K tile comes from and goes to is
// computed once per CTA, then the sources advance by one tile per call (tiles
// are requested in order, kt0, kt0 + 1, ...). C: the kernel's tile config
// (BN, BM, BK, THREADS, W_ROW, X_ROW, W_STAGE, X_STAGE); W_COLS: weight
// columns per 16-byte chunk (16 for int8, 32 for packed int4). COMPACT_X:
// keep one x chunk's source and destination and derive the thread's others
// (the same column, XR rows further each) at issue time, for a kernel short
// of registers; needs THREADS to be a multiple of an x row's chunks and the
// x swizzle to depend on the row's parity only.
template <typename C, int W_COLS, bool COMPACT_X = false>
struct LeanTileCopies {
  static constexpr int WC = C::W_ROW / 16, XC = C::X_ROW / 16;  // chunks per weight / x row of a tile
  static constexpr int WJ = C::BN * WC / C::THREADS, XJ = C::BM * XC / C::THREADS;
  static_assert((C::BN * WC) % C::THREADS == 0 && (C::BM * XC) % C::THREADS == 0,
                "tile chunks must divide among the threads");
  static constexpr int XR = C::THREADS / XC;  // COMPACT_X: rows between a thread's x chunks
  static_assert(!COMPACT_X || (C::THREADS % XC == 0 && XR % 2 == 0), "COMPACT_X needs an even row step");
  static constexpr int XS = COMPACT_X ? 1 : XJ;  // x chunks whose addresses are kept
  // Per chunk: its source (at the current tile), its stage-0 destination, and
  // its column within a K tile (-1: nothing to copy, a weight row past N or a
  // token row past M; COMPACT_X: x_col is the column, x_rows the thread's
  // chunks that are copied).
  const uint8_t* w_src[WJ];
  uint32_t w_dst[WJ];
  int w_col[WJ];
  const uint8_t* x_src[XS];
  uint32_t x_dst[XS];
  int x_col[XS];
  int x_rows;
  int64_t x_step;  // COMPACT_X: bytes between the sources of a thread's x chunks

  // x_chunk(row, chunk): the kernel's swizzle of the x tile.
  template <typename T, typename XChunk>
  __device__ __forceinline__ void init(const uint8_t* qweight, const T* x, const uint8_t* sw, const uint8_t* sx,
                                       int tid, int n0, int N, int m0, int mrows, int K, int kt0, XChunk x_chunk) {
    const int64_t w_row_bytes = static_cast<int64_t>(K) / W_COLS * 16;
#pragma unroll
    for (int j = 0; j < WJ; ++j) {
      const int i = tid + j * C::THREADS, r = i / WC, c = i % WC, n = n0 + r;
      w_src[j] = qweight + (n < N ? n : 0) * w_row_bytes + kt0 * (C::BK / W_COLS * 16) + c * 16;
      w_dst[j] = smem_u32(sw + r * C::W_ROW + w_chunk<C::W_ROW>(r, c) * 16);
      w_col[j] = n < N ? c * W_COLS : -1;
    }
    if constexpr (COMPACT_X) {
      const int r = tid / XC, c = tid % XC;
      x_src[0] = reinterpret_cast<const uint8_t*>(x + static_cast<int64_t>(m0 + (r < mrows ? r : 0)) * K +
                                                  kt0 * C::BK + c * 8);
      x_dst[0] = smem_u32(sx + r * C::X_ROW + x_chunk(r, c) * 16);
      x_col[0] = c * 8;
      x_rows = r < mrows ? (mrows - r + XR - 1) / XR : 0;  // chunks j with r + j * XR < mrows
      x_step = static_cast<int64_t>(XR) * K * 2;
    } else {
#pragma unroll
      for (int j = 0; j < XJ; ++j) {
        const int i = tid + j * C::THREADS, r = i / XC, c = i % XC;
        x_src[j] = reinterpret_cast<const uint8_t*>(x + static_cast<int64_t>(m0 + (r < mrows ? r : 0)) * K +
                                                    kt0 * C::BK + c * 8);
        x_dst[j] = smem_u32(sx + r * C::X_ROW + x_chunk(r, c) * 16);
        x_col[j] = r < mrows ? c * 8 : -1;
      }
    }
  }

  // The copies of K tile kt into pipeline slot `slot`. A chunk past K copies
  // nothing (src-size 0) and zero-fills; its source address is never read.
  // K is a multiple of a weight chunk's columns: a chunk is all in or all out.
  __device__ __forceinline__ void issue(int slot, int kt, int K) {
    const int left = K - kt * C::BK;  // columns of K from this tile's first on
    const uint32_t wo = slot * C::W_STAGE, xo = slot * C::X_STAGE;
#pragma unroll
    for (int j = 0; j < WJ; ++j) {
      cp_async16_to(w_dst[j] + wo, w_src[j], static_cast<unsigned>(w_col[j]) < static_cast<unsigned>(left));
      w_src[j] += C::BK / W_COLS * 16;
    }
    if constexpr (COMPACT_X) {
#pragma unroll
      for (int j = 0; j < XJ; ++j) {
        if (j < x_rows)  // token rows past M stay zero
          cp_async16_to(x_dst[0] + xo + j * XR * C::X_ROW, x_src[0] + j * x_step, x_col[0] < left);
      }
      x_src[0] += C::BK * 2;
    } else {
#pragma unroll
      for (int j = 0; j < XJ; ++j) {
        if (x_col[j] >= 0)  // token rows past M stay zero
          cp_async16_to(x_dst[j] + xo, x_src[j], x_col[j] < left);
        x_src[j] += C::BK * 2;
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Split-K: out[m, n] = sum_s ws[s, m, n] + bias[n], in a fixed order.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void splitk_reduce_kernel(T* __restrict__ out, const float* __restrict__ ws, const T* __restrict__ bias,
                                     int64_t mn, int n, int splits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += ws[s * mn + i];
    if (bias != nullptr) acc += to_float(bias[i % n]);
    out[i] = from_float<T>(acc);
  }
}

template <typename T>
const char* launch_splitk_reduce(T* out, const float* ws, const T* bias, int64_t m, int64_t n, int splits,
                                 cudaStream_t stream) {
  const int64_t mn = m * n;
  const int threads = 256;
  const int64_t blocks = ceil_div<int64_t>(mn, threads);
  splitk_reduce_kernel<T><<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), threads, 0, stream>>>(
      out, ws, bias, mn, static_cast<int>(n), splits);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

// ---------------------------------------------------------------------------
// int4_linear's wgmma path (int4_linear_sm90.cu; variant 2): M
// 9..64 tokens on an sm_90 GPU with the sm_90a build. Declared here so that
// int4_linear.cu can plan for it and dispatch to it.
// ---------------------------------------------------------------------------
constexpr int kWgmmaMinTokens = 9, kWgmmaMaxTokens = 64;
constexpr int kWgmmaRows = 128;   // weight rows (output features) per CTA
constexpr int kWgmmaKTile = 128;  // K per pipeline stage (split-K counts these tiles)

// The arguments of every int4_linear main-loop kernel (int4_linear.cu's
// mma.sync kernels and int4_linear_sm90.cu's wgmma kernel).
struct Int4Params {
  void* out;
  float* ws;  // split-K partials [splits, M, N], or null when splits == 1
  const void* x;
  const uint8_t* qweight;
  const unsigned short* scales;  // raw 16-bit scale bits
  const uint8_t* zeros;
  const void* bias;
  int M, N, K, groups, group_shift, splits;
};

// Warms L2 with the scale and zero rows of a CTA's weight rows [n0, n0 + BN)
// over its K tiles [kt0, kt1) of BK columns, so that the main loop's per-tile
// loads of them hit L2. Every thread of the CTA (THREADS) calls it.
template <int BN, int BK, int THREADS>
__device__ __forceinline__ void prefetch_scale_zero_rows(const Int4Params& p, int n0, int kt0, int kt1, int tid) {
  const int g0 = (kt0 * BK) >> p.group_shift;
  const int g1 = min(kt1 * BK, p.K) >> p.group_shift;
  const int rows = min(BN, p.N - n0);
  const int ssteps = ceil_div((g1 - g0) * 2, 32) + 1, zsteps = ceil_div(g1 - g0, 32) + 1;
  if (g1 > g0) {
    for (int i = tid; i < rows * (ssteps + zsteps); i += THREADS) {
      const int r = i / (ssteps + zsteps), s = i % (ssteps + zsteps);
      const int64_t base = static_cast<int64_t>(n0 + r) * p.groups;
      if (s < ssteps) {
        const int off = min(g0 * 2 + s * 32, g1 * 2 - 1);
        prefetch_l2(reinterpret_cast<const uint8_t*>(p.scales + base) + off);
      } else {
        prefetch_l2(p.zeros + base + min(g0 + (s - ssteps) * 32, g1 - 1));
      }
    }
  }
}

// Whether the wgmma kernels can run on the current device: built for sm_90a
// (FASTLLM_HAS_SM90A) and a compute capability 9.0 device that loads that code.
bool int4_wgmma_usable();
// Dynamic shared memory of the kernel that M tokens (9..64) launch.
int int4_wgmma_smem(int64_t m);
// x, qweight 16-byte aligned; M in 9..64; 1 <= splits <= ceil(K / kWgmmaKTile).
// Writes out (splits == 1, with the bias) or ws (the caller then runs the
// split-K reduction).
const char* launch_int4_wgmma(const Int4Params& a, bool half, cudaStream_t stream);

}  // namespace qlinear
}  // namespace fastllm
