/*
 * W4A16 linear: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] with
 * w[n, k] = (q[n, k] - zero[n, k/g]) * scale[n, k/g], read from the canonical
 * layout (fastllm/quant.py): qweight uint8 [N, K/2] (low nibble = even column),
 * scales [N, K/g] in the activation dtype, zeros uint8 [N, K/g], g in {32, 64, 128}.
 * fp16 / bf16 activations, fp32 accumulation.
 *
 * Algorithm (M <= 64 per CTA; the Python wrapper dequantizes and calls cuBLAS
 * for larger M): tensor-core GEMV/GEMM with the weights as the mma A operand
 * (see quant_linear.cuh for why the row-major layout works as is).
 * - CTA = 4 warps along N (8 at M <= 8: two groups of 4 take alternate
 *   128-column k-blocks of every K tile and sum through shared memory at the
 *   end, for more warps per SM); BN = 64 (M <= 8) or 128 weight rows, all M tokens, a K range
 *   (all of K unless split-K). 4-stage cp.async pipeline of K tiles (BK = 256,
 *   or 128 for M > 16 so that the x tiles fit): the raw packed weights and
 *   the x rows, both in swizzled shared memory.
 * - Lane (g, t) takes one 16-byte run (32 columns) of rows g and g + 8 per
 *   128-column k-block: 4 words of 8 nibbles. Nibbles i and i + 4 of a word go
 *   to the two halves of an A register by one mask-or into the exponent of
 *   1024.0 (fp16) / 128.0 (bf16): (1024 + q) - (1024 + zero) is exact, and one
 *   multiply by the scale rounds like torch's dequantized weight. Each word
 *   feeds two m16n8k16 steps; the B fragment takes x columns (i, i + 4) of the
 *   same 8 with two byte permutes of one LDS.128.
 * - g = 128 (and M <= 16): a k-block is exactly one group, so the mma runs on
 *   the exact integers q - zero and the fp32 partial sums are scaled once per
 *   k-block, which saves the packed multiply per pair (and is more accurate).
 * - Scales and zeros are read straight from global memory one K tile ahead
 *   (a few bytes per lane per tile), after an L2 prefetch of the CTA's rows.
 * - The main loop is lean on instructions (it was issue-bound): the copy
 *   addresses and the scale/zero rows are computed once per CTA and advanced
 *   per tile (LeanTileCopies), one LOP3 per dequantized pair, and for fp16
 *   Marlin's fma by 1/16 for high nibbles. 407 (bf16) / 391 (fp16) SASS
 *   instructions per M <= 8 tile against 721 for the first version, which
 *   recomputed every address per tile: 4096 x 14336 at M = 1 went from 23.2
 *   to 20.4 us on an H200, M = 16 from 39 to 30 (bench/RESULTS.md).
 *
 * Variants: 0 (default) the kernels of this file. 2 (kernel name
 * int4_linear_wgmma; the Python wrapper's default at M 17..64): at M 9..64 on
 * an sm_90 GPU with the 90a build, int4_linear_sm90.cu's warpgroup-MMA kernel
 * (dequantized weights as the register A operand of wgmma, which runs
 * asynchronously beside the dequantisation), with this file's split-K plan
 * and reduction; elsewhere variant 2 is variant 0 (wgmma_path below). 3
 * and 4 (kernel name int4_linear_wide; experimental, not yet run on a GPU):
 * at M <= 16 the wide tiles (Int4Cfg<TT, W> below: twice the warps per SM;
 * 4 also two mma chains per warp), with their own split-K rule; elsewhere
 * variant 0.
 * There is no variant 1 (an 8-stage ring at M <= 8, removed: no faster on an
 * H200).
 *
 * Memory traffic: each weight byte is read once from DRAM (N*K/2 bytes plus
 * 3 bytes per group-row for scales and zeros); every CTA re-reads its x rows
 * from L2 (M*K*2 bytes per CTA, <= the CTA's weight bytes for M <= BN/4).
 * 4096 x 14336 at M = 1: 29.4 MB of weights, ~10 us at 3 TB/s.
 */
#include <type_traits>

#include "quant_linear.cuh"

namespace fastllm {
namespace {

using namespace qlinear;

// W > 0: the wide tiles (variants 3 and 4, M <= 16; experimental), twice the
// warps per SM of variant 0's tiles for the same weight rows:
// - M <= 8 (TT = 1): half the weight rows per CTA (BN = 32: 2 warps along N)
//   and four warp groups along K (BK = 512, one 128-column k-block per warp
//   per stage as before), 3 stages (48 KB, 4 CTAs per SM by shared memory
//   and, bounded to 64 registers a thread, by registers). 4096 -> 14336 then
//   runs 448 CTAs, ~27 warps per SM against ~14 (224 CTAs of 8 warps).
// - M 9..16 (TT = 2): variant 0's M <= 8 layout (BN = 64, 4 warps along N,
//   2 warp groups along K, BK = 256, 4 stages) for both token tiles, 16 rows
//   per warp instead of 32 (64 KB, 3 CTAs per SM, <= 80 registers): 224 CTAs
//   of 8 warps at 4096 -> 14336 against 112 of 4 (split 2) for variant 0.
// W = 2 (variant 4) also keeps two mma accumulator chains per warp (the
// pairs 0/1 and 2/3 of a word) instead of one chain, at the price of a few
// spilled registers. Why: the M = 1 profile (issue 43%, top stall `wait`,
// occupancy 20%) and M = 16's (occupancy 21%) say the dequantisation and mma
// chains lack warps to hide them, not bytes in flight (an 8-stage ring did
// not help).
template <int TT, int W = 0>
struct Int4Cfg {
  static constexpr bool WIDE = W > 0;
  static constexpr bool WIDE1 = WIDE && TT == 1;     // the wide M <= 8 tile
  static_assert(!WIDE || TT <= 2, "the wide tiles are for one or two token tiles");
  static constexpr int R = TT == 1 || WIDE ? 1 : 2;  // 16-row tiles per warp
  static constexpr int BK = WIDE1 ? 512 : TT <= 2 ? 256 : 128;  // K per pipeline stage
  static constexpr int STAGES = WIDE1 ? 3 : 4;
  // Warps along N, and warp groups along K: at M <= 8 two groups split each
  // K tile's k-blocks between them (summed through shared memory at the end),
  // so that an SM has twice the warps to hide the dequantisation chains.
  static constexpr int WARPS_N = WIDE1 ? 2 : 4, KW = WIDE1 ? 4 : TT == 1 || WIDE ? 2 : 1;
  static constexpr int CHAINS = W > 1 ? W : 1;      // independent mma accumulator chains per warp
  // CTAs per SM the registers must allow, as many as the shared memory does
  // (the wide M <= 8 tile unbounded takes ~80 registers: 3 CTAs).
  static constexpr int MIN_CTAS = !WIDE ? 0 : TT == 1 ? 4 : 3;
  static constexpr int WARPS = WARPS_N * KW, THREADS = WARPS * 32;
  static constexpr int BN = 16 * R * WARPS_N;        // weight rows per CTA
  static constexpr int BM = 8 * TT;                  // token rows per CTA
  static constexpr int KBLK = BK / 128;              // 128-column k-blocks per stage
  static constexpr int JW = KBLK / KW;               // k-blocks per warp per stage
  static_assert(KBLK % KW == 0, "the k-blocks of a stage must divide among the warp groups");
  static constexpr int W_ROW = BK / 2;               // bytes of a weight row per stage
  static constexpr int X_ROW = BK * 2;               // bytes of an x row per stage
  static constexpr int W_STAGE = BN * W_ROW;
  static constexpr int X_STAGE = BM * X_ROW;
  static constexpr int SMEM = STAGES * (W_STAGE + X_STAGE);
};

// x tile: lane (g, t) reads chunk 4t + w (+ 16j) of row g, so in one phase t = 0
// and t = 2 would collide (128 bytes apart); flipping chunk bit 0 when bit 3 is
// set separates them, and flipping bit 1 on odd rows separates rows g and g+1.
__device__ __forceinline__ int x_chunk(int row, int c) { return c ^ ((c >> 3) & 1) ^ ((row & 1) << 1); }

template <typename T, int TT, bool G128, int W = 0>
__global__ void __launch_bounds__(Int4Cfg<TT, W>::THREADS, Int4Cfg<TT, W>::MIN_CTAS)
    int4_mma_kernel(const Int4Params p) {
  using C = Int4Cfg<TT, W>;
  constexpr int R = C::R, JW = C::JW, STAGES = C::STAGES, CH = C::CHAINS;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const sw = smem;
  uint8_t* const sx = smem + STAGES * C::W_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int warp = (tid >> 5) % C::WARPS_N, kw = (tid >> 5) / C::WARPS_N;  // rows warp * R * 16.., k-blocks kw + KW i
  const int n0 = blockIdx.x * C::BN;
  const int m0 = blockIdx.z * C::BM;
  const int mrows = min(C::BM, p.M - m0);
  const int k_tiles = ceil_div(p.K, C::BK);
  const int kt0 = static_cast<int>(static_cast<int64_t>(blockIdx.y) * k_tiles / p.splits);
  const int kt1 = static_cast<int>(static_cast<int64_t>(blockIdx.y + 1) * k_tiles / p.splits);
  const T* __restrict__ x = static_cast<const T*>(p.x);

  // Token rows past M stay zero in every stage (cp.async never writes them).
  if (mrows < C::BM) {
    constexpr int XC = C::X_ROW / 16;
    const int per_stage = (C::BM - mrows) * XC;
    for (int i = tid; i < STAGES * per_stage; i += C::THREADS) {
      const int s = i / per_stage, rem = i % per_stage;
      *reinterpret_cast<uint4*>(sx + s * C::X_STAGE + (mrows + rem / XC) * C::X_ROW + (rem % XC) * 16) =
          make_uint4(0, 0, 0, 0);
    }
  }

  prefetch_scale_zero_rows<C::BN, C::BK, C::THREADS>(p, n0, kt0, kt1, tid);

  // The copies' addresses and the scale/zero rows are computed once here and
  // advanced per K tile (recomputing them every tile was about two thirds of
  // the main loop's instructions).
  LeanTileCopies<C, 32, C::WIDE> lean;  // the wide tiles are short of registers: compact x copies
  lean.init(p.qweight, x, sw, sx, tid, n0, p.N, m0, mrows, p.K, kt0, [](int r, int c) { return x_chunk(r, c); });
  const unsigned short* s_row[R][2];
  const uint8_t* z_row[R][2];
  bool row_ok[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + warp * R * 16 + r * 16 + h * 8 + g;
      row_ok[r][h] = n < p.N;
      const int64_t base = static_cast<int64_t>(n < p.N ? n : 0) * p.groups;
      s_row[r][h] = p.scales + base;
      z_row[r][h] = p.zeros + base;
    }

  auto load_tile = [&](int slot, int kt) { lean.issue(slot, kt, p.K); };

  // Per lane, k-block and row: scale bits (low 16) | zero << 16, for K tile kt.
  auto load_sz = [&](uint32_t (&sz)[R][2][JW], int kt) {
#pragma unroll
    for (int jj = 0; jj < JW; ++jj) {
      const int k = kt * C::BK + (kw + C::KW * jj) * 128 + t * 32;
      const int gi = k >> p.group_shift;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          sz[r][h][jj] = row_ok[r][h] && k < p.K ? static_cast<uint32_t>(__ldg(s_row[r][h] + gi)) |
                                                      (static_cast<uint32_t>(__ldg(z_row[r][h] + gi)) << 16)
                                                : 0u;
    }
  };

  // acc[c]: chain c's sums (CH > 1: summed into acc[0] after the main loop;
  // with G128 the chains are the per-k-block parts, and acc[0] alone is used).
  float acc[CH][R][TT][4];
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int tt = 0; tt < TT; ++tt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[c][r][tt][e] = 0.f;

  auto compute = [&](int slot, const uint32_t (&sz)[R][2][JW]) {
    const uint8_t* const tw = sw + slot * C::W_STAGE;
    const uint8_t* const tx = sx + slot * C::X_STAGE;
    constexpr uint32_t kMagic2 = Pair<T>::kMagic * 0x10001u;
    const uint32_t sixteenth2 = Pair<T>::bits_of(0.0625f) * 0x10001u;  // 1/16 in both halves
#pragma unroll
    for (int jj = 0; jj < JW; ++jj) {
      const int j = kw + C::KW * jj;
      uint4 wq[R][2];
      uint32_t zero2[R][2], scale2[R][2], zero_hi2[R][2];
      float scale[R][2];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * R * 16 + r * 16 + h * 8 + g;
          wq[r][h] = lds128(tw + row * C::W_ROW + w_chunk<C::W_ROW>(row, 4 * j + t) * 16);
          const uint32_t v = sz[r][h][jj];
          zero2[r][h] = (Pair<T>::kMagic + (v >> 16)) * 0x10001u;  // (magic + zero) in both halves
          if constexpr (std::is_same_v<T, __half>)  // -(magic / 16 + zero) in both halves: high nibbles
            zero_hi2[r][h] = Pair<T>::bits_of(-(Pair<T>::kMagicValue / 16.f + static_cast<float>(v >> 16))) * 0x10001u;
          scale2[r][h] = (v & 0xFFFFu) * 0x10001u;
          scale[r][h] = Pair<T>::bits_to_float(v & 0xFFFFu);
        }
      float part[CH][R][TT][4];  // G128: this k-block's sum over q - zero, before the scale
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int tt = 0; tt < TT; ++tt)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[c][r][tt][e] = 0.f;  // dead (removed) unless G128
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        // B: x columns 8w..8w+7 of this lane's 32; pair i = (x_i, x_{i+4}).
        uint32_t b[TT][4];
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
          const int row = tt * 8 + g;
          const uint4 xv = lds128(tx + row * C::X_ROW + x_chunk(row, 16 * j + 4 * t + w) * 16);
          b[tt][0] = __byte_perm(xv.x, xv.z, 0x5410);
          b[tt][1] = __byte_perm(xv.x, xv.z, 0x7632);
          b[tt][2] = __byte_perm(xv.y, xv.w, 0x5410);
          b[tt][3] = __byte_perm(xv.y, xv.w, 0x7632);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // A: pair i of row h = (nibble i, nibble i + 4) of word w, dequantized.
          uint32_t a[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t q = word_of(wq[r][h], w);
            // One LOP3 per pair: nibble i of each half, or-ed into the magic.
            // fp16 (10 mantissa bits; Marlin's dequantisation): pairs 1 and 3
            // are taken in place, in the high nibble, i.e. magic + 16 q,
            // which one fma by 1/16 turns into q - zero directly (exact:
            // every value is a small integer). bf16 has 7 mantissa bits, so
            // a high nibble would reach the exponent: shift it down first.
            const uint32_t q8 = q >> 8;
            uint32_t v[4];
            v[0] = Pair<T>::sub(and_or(q, 0x000F000Fu, kMagic2), zero2[r][h]);
            v[2] = Pair<T>::sub(and_or(q8, 0x000F000Fu, kMagic2), zero2[r][h]);
            if constexpr (std::is_same_v<T, __half>) {
              v[1] = Pair<T>::fma(and_or(q, 0x00F000F0u, kMagic2), sixteenth2, zero_hi2[r][h]);
              v[3] = Pair<T>::fma(and_or(q8, 0x00F000F0u, kMagic2), sixteenth2, zero_hi2[r][h]);
            } else {
              v[1] = Pair<T>::sub(and_or(q >> 4, 0x000F000Fu, kMagic2), zero2[r][h]);
              v[3] = Pair<T>::sub(and_or(q >> 12, 0x000F000Fu, kMagic2), zero2[r][h]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) a[h][i] = G128 ? v[i] : Pair<T>::mul(v[i], scale2[r][h]);
          }
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) {
            float(&d0)[4] = *(G128 ? &part[0][r][tt] : &acc[0][r][tt]);
            float(&d1)[4] = *(G128 ? &part[CH - 1][r][tt] : &acc[CH - 1][r][tt]);  // d0 itself unless CH > 1
            mma16816<T>(d0, a[0][0], a[1][0], a[0][1], a[1][1], b[tt][0], b[tt][1]);  // pairs 0, 1
            mma16816<T>(d1, a[0][2], a[1][2], a[0][3], a[1][3], b[tt][2], b[tt][3]);  // pairs 2, 3
          }
        }
      }
      if constexpr (G128) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) {
            float(&pt)[4] = part[0][r][tt];
            if constexpr (CH > 1) {
#pragma unroll
              for (int e = 0; e < 4; ++e) pt[e] += part[1][r][tt][e];
            }
            float(&ac)[4] = acc[0][r][tt];
            ac[0] = fmaf(pt[0], scale[r][0], ac[0]);
            ac[1] = fmaf(pt[1], scale[r][0], ac[1]);
            ac[2] = fmaf(pt[2], scale[r][1], ac[2]);
            ac[3] = fmaf(pt[3], scale[r][1], ac[3]);
          }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (kt0 + s < kt1) load_tile(s, kt0 + s);
    cp_async_commit();
  }
  uint32_t sz[R][2][JW];
  load_sz(sz, kt0);
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt landed for everyone; the slot refilled below was consumed last iteration
    const int next = kt + STAGES - 1;
    if (next < kt1) load_tile((next - kt0) % STAGES, next);
    cp_async_commit();
    uint32_t sz_next[R][2][JW];
    load_sz(sz_next, kt + 1);
    compute((kt - kt0) % STAGES, sz);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int jj = 0; jj < JW; ++jj) sz[r][h][jj] = sz_next[r][h][jj];
  }
  cp_async_wait<0>();
  if constexpr (CH > 1 && !G128) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int tt = 0; tt < TT; ++tt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][r][tt][e] += acc[1][r][tt][e];
  }

  // Warp groups along K: groups 1.. hand their sums to group 0 through the
  // (now idle) pipeline memory, which adds them in a fixed order.
  if constexpr (C::KW > 1) {
    constexpr int V = R * TT * 4;  // floats per lane
    static_assert((C::KW - 1) * C::WARPS_N * 32 * V * 4 <= C::SMEM, "the K-group sums must fit the pipeline memory");
    float* const red = reinterpret_cast<float*>(smem);
    // Group k's value v of this lane (lanes contiguous: no bank conflicts).
    auto slot = [&](int k, int v) -> float& { return red[(((k - 1) * C::WARPS_N + warp) * V + v) * 32 + lane]; };
    float* const sums = &acc[0][0][0][0];  // acc[0] as V floats (unrolled: stays in registers)
    __syncthreads();  // every warp is past its last tile
    if (kw > 0) {
#pragma unroll
      for (int v = 0; v < V; ++v) slot(kw, v) = sums[v];
    }
    __syncthreads();
    if (kw > 0) return;
#pragma unroll
    for (int k = 1; k < C::KW; ++k)
#pragma unroll
      for (int v = 0; v < V; ++v) sums[v] += slot(k, v);
  }

  // Epilogue: c0, c1 = (row g, tokens 2t, 2t+1); c2, c3 = row g + 8.
  T* const out = static_cast<T*>(p.out);
  const T* const bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = n0 + warp * R * 16 + r * 16 + g + (e >> 1) * 8;
        const int m = m0 + tt * 8 + 2 * t + (e & 1);
        if (n < p.N && m < p.M) {
          const float v = acc[0][r][tt][e];
          if (p.ws != nullptr) {
            p.ws[(static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N + n] = v;
          } else {
            out[static_cast<int64_t>(m) * p.N + n] = from_float<T>(bias != nullptr ? v + to_float(bias[n]) : v);
          }
        }
      }
}

// Any alignment (x or qweight not 16-byte aligned): one warp per output row and
// up to 8 tokens, scalar loads. Correct, not fast.
template <typename T>
__global__ void __launch_bounds__(256) int4_generic_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                          const uint8_t* __restrict__ qweight,
                                                          const unsigned short* __restrict__ scales,
                                                          const uint8_t* __restrict__ zeros, const T* __restrict__ bias,
                                                          int M, int N, int K, int groups, int group_shift) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * 8 + warp;
  const int m0 = blockIdx.y * 8;
  if (n >= N) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const uint8_t* row = qweight + static_cast<int64_t>(n) * (K / 2);
  for (int k = lane; k < K; k += 32) {
    const int64_t gi = static_cast<int64_t>(n) * groups + (k >> group_shift);
    const float s = Pair<T>::bits_to_float(scales[gi]);
    const float q = static_cast<float>((row[k >> 1] >> ((k & 1) * 4)) & 0xF);
    const float w = (q - static_cast<float>(zeros[gi])) * s;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (m0 + j < M) acc[j] += w * to_float(x[static_cast<int64_t>(m0 + j) * K + k]);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float v = warp_reduce_sum(acc[j]);
    if (lane == 0 && m0 + j < M)
      out[static_cast<int64_t>(m0 + j) * N + n] = from_float<T>(bias != nullptr ? v + to_float(bias[n]) : v);
  }
}

// w[n, k] = (q - zero) * scale rounded to T (exactly torch's dequantize-then-cast).
// VEC: 16 packed bytes (32 columns) per item, 16-byte stores; else one column per item.
template <typename T, bool VEC>
__global__ void int4_dequant_kernel(T* __restrict__ out, const uint8_t* __restrict__ qweight,
                                    const unsigned short* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                    int64_t N, int64_t K, int64_t groups, int group_shift) {
  const int64_t per = VEC ? 32 : 1;
  const int64_t items = N * K / per;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * per, n = e / K, k = e % K;
    const int64_t gi = n * groups + (k >> group_shift);
    const float s = Pair<T>::bits_to_float(scales[gi]);
    const float z = static_cast<float>(zeros[gi]);
    if constexpr (VEC) {
      const uint4 v = *reinterpret_cast<const uint4*>(qweight + e / 2);
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        const uint32_t word = word_of(v, wi);
        Vec<T, 8> o;
#pragma unroll
        for (int c = 0; c < 8; ++c) o.v[c] = from_float<T>((static_cast<float>((word >> (4 * c)) & 0xF) - z) * s);
        o.store(out + e + wi * 8);
      }
    } else {
      const float q = static_cast<float>((qweight[e >> 1] >> ((e & 1) * 4)) & 0xF);
      out[e] = from_float<T>((q - z) * s);
    }
  }
}

int shift_of(int64_t group) { return group == 32 ? 5 : group == 64 ? 6 : 7; }

// Opts every instance for T in at its first launch, so that one first used
// inside CUDA-graph capture makes no cudaFuncSetAttribute call there.
template <typename T>
const char* opt_in_all() {
  const char* err = nullptr;
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, true>>(Int4Cfg<1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, false>>(Int4Cfg<1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, true>>(Int4Cfg<2>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, false>>(Int4Cfg<2>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 4, false>>(Int4Cfg<4>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 8, false>>(Int4Cfg<8>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, true, 1>>(Int4Cfg<1, 1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, false, 1>>(Int4Cfg<1, 1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, true, 2>>(Int4Cfg<1, 2>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 1, false, 2>>(Int4Cfg<1, 2>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, true, 1>>(Int4Cfg<2, 1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, false, 1>>(Int4Cfg<2, 1>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, true, 2>>(Int4Cfg<2, 2>::SMEM);
  if (!err) err = opt_in_smem<int4_mma_kernel<T, 2, false, 2>>(Int4Cfg<2, 2>::SMEM);
  return err;
}

template <typename T, int TT, bool G128, int W = 0>
const char* run_mma(const Int4Params& p, cudaStream_t stream) {
  using Cfg = Int4Cfg<TT, W>;
  if (const char* err = opt_in_all<T>()) return err;
  const unsigned token_blocks = static_cast<unsigned>(ceil_div(p.M, kMaxTokensPerCta));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::BN)), static_cast<unsigned>(p.splits), token_blocks);
  int4_mma_kernel<T, TT, G128, W><<<grid, Cfg::THREADS, Cfg::SMEM, stream>>>(p);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* run_tiles(const Int4Params& p, int group, int wide, cudaStream_t stream) {
  const int tiles = token_tiles(p.M);
  const bool g128 = group == 128 && tiles <= 2;
  if (wide > 0 && tiles == 1)
    return wide == 1 ? (g128 ? run_mma<T, 1, true, 1>(p, stream) : run_mma<T, 1, false, 1>(p, stream))
                     : (g128 ? run_mma<T, 1, true, 2>(p, stream) : run_mma<T, 1, false, 2>(p, stream));
  if (wide > 0)
    return wide == 1 ? (g128 ? run_mma<T, 2, true, 1>(p, stream) : run_mma<T, 2, false, 1>(p, stream))
                     : (g128 ? run_mma<T, 2, true, 2>(p, stream) : run_mma<T, 2, false, 2>(p, stream));
  switch (tiles) {
    case 1: return g128 ? run_mma<T, 1, true>(p, stream) : run_mma<T, 1, false>(p, stream);
    case 2: return g128 ? run_mma<T, 2, true>(p, stream) : run_mma<T, 2, false>(p, stream);
    case 4: return run_mma<T, 4, false>(p, stream);
    default: return run_mma<T, 8, false>(p, stream);
  }
}

// The main loop (the wgmma kernel or the mma.sync kernels), then the split-K reduction.
template <typename T>
const char* launch_typed(const Int4Params& p, int group, bool wgmma, int wide, cudaStream_t stream) {
  const char* err =
      wgmma ? launch_int4_wgmma(p, std::is_same_v<T, __half>, stream) : run_tiles<T>(p, group, wide, stream);
  if (err) return err;
  if (p.splits > 1)
    return launch_splitk_reduce<T>(static_cast<T*>(p.out), p.ws, static_cast<const T*>(p.bias), p.M, p.N, p.splits,
                                   stream);
  return nullptr;
}

template <typename T>
const char* launch_generic(void* out, const void* x, const void* qweight, const void* scales, const void* zeros,
                           const void* bias, int64_t m, int64_t n, int64_t k, int64_t groups, int shift,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(n, 8)), static_cast<unsigned>(ceil_div<int64_t>(m, 8)));
  int4_generic_kernel<T><<<grid, 256, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(x), static_cast<const uint8_t*>(qweight),
      static_cast<const unsigned short*>(scales), static_cast<const uint8_t*>(zeros), static_cast<const T*>(bias),
      static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(groups), shift);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* launch_dequant(void* out, const void* qweight, const void* scales, const void* zeros, int64_t n,
                           int64_t k, int64_t group, cudaStream_t stream) {
  const bool vec = aligned16(out) && aligned16(qweight);  // K % 32 == 0 keeps every 32-column item in one row
  const int64_t items = vec ? n * k / 32 : n * k;
  const int threads = 256;
  const int64_t want = ceil_div<int64_t>(items, threads);
  const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  auto* o = static_cast<T*>(out);
  auto* q = static_cast<const uint8_t*>(qweight);
  auto* s = static_cast<const unsigned short*>(scales);
  auto* z = static_cast<const uint8_t*>(zeros);
  if (vec) {
    int4_dequant_kernel<T, true><<<blocks, threads, 0, stream>>>(o, q, s, z, n, k, k / group, shift_of(group));
  } else {
    int4_dequant_kernel<T, false><<<blocks, threads, 0, stream>>>(o, q, s, z, n, k, k / group, shift_of(group));
  }
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

// Tile sizes of the mma.sync kernel that M tokens launch (wide: variants 3 and
// 4's, which differ only in their mma chains).
int k_tile_of(int64_t m, bool wide) {
  if (wide) return token_tiles(m) == 1 ? Int4Cfg<1, 1>::BK : Int4Cfg<2, 1>::BK;
  return token_tiles(m) <= 2 ? Int4Cfg<1>::BK : Int4Cfg<4>::BK;
}
int rows_of(int64_t m, bool wide) {
  if (wide) return token_tiles(m) == 1 ? Int4Cfg<1, 1>::BN : Int4Cfg<2, 1>::BN;
  return token_tiles(m) == 1 ? Int4Cfg<1>::BN : Int4Cfg<2>::BN;
}
int smem_of(int64_t m, bool wide) {
  const int tiles = token_tiles(m);
  if (wide) return tiles == 1 ? Int4Cfg<1, 1>::SMEM : Int4Cfg<2, 1>::SMEM;
  if (tiles == 1) return Int4Cfg<1>::SMEM;
  return tiles == 2 ? Int4Cfg<2>::SMEM : tiles == 4 ? Int4Cfg<4>::SMEM : Int4Cfg<8>::SMEM;
}

const char* check_shapes(int64_t m, int64_t n, int64_t k, int64_t group) {
  if (group != 32 && group != 64 && group != 128) return "group_size must be 32, 64 or 128";
  if (m < 0 || m > static_cast<int64_t>(kMaxTokensPerCta) * 65535) return "M (tokens) out of range";
  if (n <= 0 || n > (1LL << 30)) return "N (out_features) out of range";
  if (k <= 0 || k > (1LL << 30) || k % group != 0) return "K (in_features) must be a positive multiple of group_size";
  if (n * (k / group) > (1LL << 40)) return "weight too large";
  return nullptr;
}

constexpr const char* kVariantError =
    "variant must be 0 (default), 2 (wgmma at M 9..64 on sm_90), 3 or 4 (wide tiles at M <= 16)";
bool valid_variant(int64_t variant) { return variant == 0 || variant == 2 || variant == 3 || variant == 4; }

// Variants 3 and 4 run the wide tiles at M <= 16 (Int4Cfg<TT, 1> / <TT, 2>):
// the W of the tile, or 0 (variant 0's kernels: M > 16, or another variant).
int wide_path(int64_t m, int64_t variant) {
  return (variant == 3 || variant == 4) && token_tiles(m) <= 2 ? static_cast<int>(variant) - 2 : 0;
}

// Split-K for the wide tiles: their grids have twice the CTAs of variant 0's
// M <= 8 grid (or twice the warps per CTA, M 9..16), so they are not split
// once every SM has a CTA; below that, splits fill the SMs (each keeping two
// K tiles), as choose_splits.
// A first guess, to be fitted to the sweep like choose_splits was.
int64_t wide_splits(int64_t ctas, int64_t k_tiles, int64_t sms, int64_t requested, int resident) {
  if (requested > 0) return requested < k_tiles ? requested : k_tiles;
  if (sms <= 0) sms = 132;
  if (ctas >= sms) return 1;
  int64_t s = sms * resident / ctas;
  const int64_t cap = k_tiles / 2 > 1 ? k_tiles / 2 : 1;
  if (s > cap) s = cap;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : s;
}

// Variant 2 runs the wgmma kernel (int4_linear_sm90.cu) at M 9..64 on an sm_90
// device with the 90a build; everywhere else (other M, other GPUs, a build
// without 90a, K past 2^24) it is variant 0, in the plan and the launch alike.
bool wgmma_path(int64_t m, int64_t k, int64_t variant) {
  return variant == 2 && m >= kWgmmaMinTokens && m <= kWgmmaMaxTokens && k <= (int64_t{1} << 24) &&
         int4_wgmma_usable();
}

}  // namespace

const char* int4_linear_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t m, int64_t n, int64_t k,
                             int64_t group, int64_t num_sms, int64_t requested_splits, int64_t variant) {
  *num_splits = 1;
  *workspace_floats = 0;
  if (const char* err = check_shapes(m, n, k, group)) return err;
  if (!valid_variant(variant)) return kVariantError;
  if (requested_splits < 0 || requested_splits > kMaxSplits) return "num_splits must be in [1, 16] (0 = automatic)";
  if (m == 0) return nullptr;
  const bool wide = wide_path(m, variant) > 0;
  if (wgmma_path(m, k, variant)) {
    *num_splits = choose_splits(ceil_div<int64_t>(n, kWgmmaRows), ceil_div<int64_t>(k, kWgmmaKTile), num_sms,
                                requested_splits, m, ctas_per_sm(int4_wgmma_smem(m)));
  } else if (wide) {
    *num_splits = wide_splits(ceil_div<int64_t>(n, rows_of(m, true)), ceil_div<int64_t>(k, k_tile_of(m, true)),
                              num_sms, requested_splits, ctas_per_sm(smem_of(m, true)));
  } else {
    const int64_t ctas = ceil_div<int64_t>(n, rows_of(m, false)) * ceil_div<int64_t>(m, kMaxTokensPerCta);
    *num_splits = choose_splits(ctas, ceil_div<int64_t>(k, k_tile_of(m, false)), num_sms, requested_splits, m,
                                ctas_per_sm(smem_of(m, false)));
  }
  *workspace_floats = *num_splits > 1 ? *num_splits * m * n : 0;
  return nullptr;
}

const char* launch_int4_linear(void* out, void* workspace, const void* x, const void* qweight, const void* scales,
                               const void* zeros, const void* bias, int64_t m, int64_t n, int64_t k, int64_t group,
                               int64_t num_splits, int64_t variant, int dtype, void* stream) {
  if (const char* err = check_shapes(m, n, k, group)) return err;
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "activations must be float16 or bfloat16";
  if (!valid_variant(variant)) return kVariantError;
  if (m == 0) return nullptr;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int shift = shift_of(group);
  const int64_t groups = k / group;
  const bool half = dtype == static_cast<int>(DType::kFloat16);
  if (!aligned16(x) || !aligned16(qweight)) {
    if (ceil_div<int64_t>(m, 8) > 65535) return "too many tokens for the unaligned path";
    return half ? launch_generic<__half>(out, x, qweight, scales, zeros, bias, m, n, k, groups, shift, st)
                : launch_generic<__nv_bfloat16>(out, x, qweight, scales, zeros, bias, m, n, k, groups, shift, st);
  }
  const bool wgmma = wgmma_path(m, k, variant);
  const int wide = wide_path(m, variant);
  const int64_t k_tiles = ceil_div<int64_t>(k, wgmma ? kWgmmaKTile : k_tile_of(m, wide > 0));
  // A variant-2 plan made on another (sm_90) device than this one counts the
  // wgmma path's 128-column K tiles; here variant 0 may have fewer: clamp
  // (the workspace is only larger than needed).
  if (variant == 2 && !wgmma && num_splits > k_tiles) num_splits = k_tiles;
  if (num_splits < 1 || num_splits > kMaxSplits || num_splits > k_tiles)
    return "num_splits must be in [1, min(16, K tiles)] (use int4_linear_plan)";
  if (num_splits > 1 && (workspace == nullptr || !aligned16(workspace)))
    return "num_splits > 1 needs a 16-byte aligned fp32 workspace of num_splits * M * N floats";
  Int4Params p{out,
               static_cast<float*>(num_splits > 1 ? workspace : nullptr),
               x,
               static_cast<const uint8_t*>(qweight),
               static_cast<const unsigned short*>(scales),
               static_cast<const uint8_t*>(zeros),
               bias,
               static_cast<int>(m),
               static_cast<int>(n),
               static_cast<int>(k),
               static_cast<int>(groups),
               shift,
               static_cast<int>(num_splits)};
  return half ? launch_typed<__half>(p, static_cast<int>(group), wgmma, wide, st)
              : launch_typed<__nv_bfloat16>(p, static_cast<int>(group), wgmma, wide, st);
}

const char* launch_int4_dequantize(void* out, const void* qweight, const void* scales, const void* zeros, int64_t n,
                                   int64_t k, int64_t group, int dtype, void* stream) {
  if (const char* err = check_shapes(0, n, k, group)) return err;
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "dtype must be float16 or bfloat16";
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == static_cast<int>(DType::kFloat16))
    return launch_dequant<__half>(out, qweight, scales, zeros, n, k, group, st);
  return launch_dequant<__nv_bfloat16>(out, qweight, scales, zeros, n, k, group, st);
}

}  // namespace fastllm
