/*
 * W4A16 linear on Hopper (sm_90a) for decode / verify batches of M = 9..64
 * tokens: int4_linear's variant 2 (kernel name int4_linear_wgmma; verified on
 * an H200, the default at M 17..64). Same computation and formats as
 * int4_linear.cu: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] with
 * w[n, k] = (q[n, k] - zero[n, k/g]) * scale[n, k/g], qweight uint8 [N, K/2]
 * (low nibble = even column), scales [N, K/g] in the activation dtype, zeros
 * uint8 [N, K/g], g in {32, 64, 128}; fp16 / bf16, fp32 accumulation.
 *
 * Why: the mma.sync kernel is bound by instruction issue at M > 8 (an H200
 * spends 26 us at M = 16 and 47 us at M = 64 on 4096 -> 14336, whose 29 MB of
 * weights take ~7 us to read): every tensor-core op is a synchronous warp
 * instruction competing with the dequantisation for issue slots. The
 * warpgroup MMA (wgmma) runs asynchronously, a 64 x NP x 16 product per
 * instruction: a warpgroup issues the products of k-steps s..s+3 and
 * dequantizes k-steps s+4..s+7 while the tensor cores work (the approach of
 * CUTLASS's mixed-input GEMM / vLLM's Machete: A = dequantized weights in
 * registers, B = activations from shared memory).
 *
 * Products: y^T = W x^T. Per warpgroup and k16 step, one
 * wgmma.m64nNPk16 (wgmma::MmaKB): A = 64 weight rows x 16 k in registers
 * (four 32-bit registers per thread, the mma.m16n8k16 A layout per warp:
 * a0 = (row g, k 2t..2t+1), a1 = (row g+8, same), a2 = (row g, k 2t+8..2t+9),
 * a3 = (row g+8, same); g = lane / 4, t = lane % 4), B = x^T: 16 k x NP tokens,
 * K-major (x is [M, K] row-major), in shared memory; D = 64 x NP fp32 in
 * registers (NP / 2 per thread). NP = M rounded up to 16, 32, 48 or 64 (wgmma
 * takes any N multiple of 8; four instantiations per dtype). Token rows
 * M..NP-1 of x are zero in shared memory, and D's columns are independent, so
 * they only produce columns that are never stored.
 *
 * The k order (why x is copied in 4-byte pieces): an mma sums over its 16
 * logical k, so any bijection between logical and physical columns works if A
 * and B use the same one. A lane (g, t) reads one 16-byte run of each of its
 * two rows per 128-column K tile: physical columns 32t .. 32t + 31, 16 pairs
 * of adjacent columns = 16 bytes (byte b = columns 2b, 2b + 1: low and high
 * nibble). It feeds them to the 8 k16 steps of the tile in order: step s uses
 * bytes 2(s%2) and 2(s%2) + 1 of word s/2 for its logical pairs (2t, 2t+1) and
 * (2t+8, 2t+9). So logical pair L = 8s + 4h + t (h = 0, 1) of the tile is
 * physical pair P = 16t + 2s + h, i.e. L = 4 (P % 16) + P / 16 (a rotation of
 * P's six bits). wgmma reads B in logical order from shared memory, so x is
 * copied pair by pair (cp.async of 4 bytes) to the logical position of each
 * pair. (Variant 0 pairs nibbles i and i + 4 of a word, one LOP3 per pair; that
 * would need x permuted at 2-byte granularity, which no copy does, and the
 * natural order would make each lane use one byte in four of its weight
 * loads.) Dequantisation of byte b of word q: one PRMT puts byte b (fp16) or
 * bytes b of q and of q >> 4 (bf16) where one LOP3 with the magic exponent
 * turns them into (magic + low nibble, magic + high nibble [x16 for fp16]);
 * one HFMA2 (fp16: times (1, 1/16) minus (1024 + zero, 64 + zero)) or HSUB2
 * (bf16: minus 128 + zero) gives the exact q - zero, and one HMUL2 by the
 * scale rounds once, like torch's dequantized weight. ~4 instructions per pair
 * (variant 0: ~3.5), no mma.sync and no B fragments to build.
 *
 * Shared memory (canonical wgmma layouts, as prefill_attention_sm90.cu):
 *  - x stage: [2 column blocks of 64 k][NP rows][128 bytes], 128-byte swizzle
 *    (16-byte chunk c of row r at r * 128 + ((c ^ (r % 8)) << 4)), each stage
 *    1024-aligned. Step s's B descriptor: K-major SW128, start = stage +
 *    (s / 4) * NP * 128 + (s % 4) * 32 (a k16 step is 32 bytes inside the
 *    128-byte swizzled row; the hardware applies the XOR on address bits, so
 *    moving the start inside the atom works from a 1024-aligned base),
 *    stride byte offset 1024 (between 8-row groups), leading byte offset
 *    unused (16). A warp's 32 four-byte copies fill one 128-byte row of a
 *    column block: lane (t', u) copies physical pair 16t' + 8cb + u (four
 *    32-byte global segments) to chunk u, bytes 4t'..4t'+3, i.e. banks
 *    4 (u ^ r % 8) + t': conflict-free.
 *  - weight stage: [128 rows][64 bytes] raw packed nibbles (16-byte cp.async),
 *    read by LDS.128 (lanes 8 rows x 4 chunks: conflict-free).
 *  - STAGES = 8 / 6 / 5 / 4 for NP = 16 / 32 / 48 / 64 (97-101 KB: 2 CTAs per
 *    SM, as the 128 registers per thread of __launch_bounds__(256, 2) allow);
 *    tiles are loaded STAGES - 2 ahead (see "Ordering").
 *
 * CTA = 2 warpgroups (256 threads), 128 weight rows (64 per warpgroup), all M
 * tokens, a K range (all of K, or a 1/S share with split-K: the plan, fp32
 * workspace and splitk_reduce_kernel of variant 0, with 128-column K tiles).
 * Scales and zeros come from global memory one K tile ahead (one group per
 * lane, row and tile: 32 | g), after an L2 prefetch, as in variant 0.
 *
 * Ordering (per K tile, per thread):
 *   cp.async.wait (tile landed) + fence.proxy.async + __syncthreads;
 *   issue the copies of tile kt + STAGES - 2; LDS the two weight runs;
 *   dequantize steps 0-3 -> registers aA; wgmma.fence; 4 wgmma; commit;
 *   wait<1> (the previous group, which read aB, is done); dequantize steps
 *   4-7 -> aB; wgmma.fence; 4 wgmma; commit; wait<1> (aA free again).
 * wgmma.fence orders the ordinary writes of the A registers (and the zeroed
 * accumulators) before the wgmmas that read them; fence_operand keeps the
 * compiler from reusing an A buffer's registers before the wait that retires
 * the wgmmas reading it. At a tile's barrier at most one group is in flight
 * (the previous tile's second), reading the previous tile's stage; every
 * thread has retired the groups of the tile before it, so the stage refilled
 * after the barrier (that of tile kt - 2) is free: hence STAGES - 2 ahead.
 *
 * Build: the kernel body exists only in sm_90a code (guarded like the prefill
 * kernel); int4_wgmma_usable() checks a 90a build, a compute capability 9.0
 * device and that it loads the sm_90a binary. When it is not usable, variant 2
 * falls back to variant 0 (int4_linear.cu), in the plan and the launch alike.
 *
 * Traffic: as variant 0 (weights once from DRAM; x and scales per CTA from
 * L2). wgmma work: NP / M of the useful products (NP - M padded tokens).
 *
 * ptxas (sm_90a, CUDA 13.0), registers for NP = 16 / 32 / 48 / 64: bf16
 * 112 / 118 / 128 / 127, fp16 96 / 104 / 124 / 128; no spills, no wgmma
 * serialisation. SASS per K tile and thread (the main loop): bf16
 * 275 / 307 / 298 / 314, fp16 269 / 301 / 292 / 305 instructions, of which
 * 136 dequantize 32 pairs, 8 are HGMMA, and the x copies take 4 / 8 / 12 / 16
 * LDGSTS plus ~2 address instructions each. Estimate (H200, 4096 -> 14336,
 * 54 warp-tiles per scheduler): M = 16 ~9 us of issue (about the ~7-8 us of
 * HBM), M = 64 ~10 us of issue beside ~7.5 us of wgmma; not yet measured.
 */
#include "quant_linear.cuh"
#include "wgmma.cuh"

#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTLLM_SM90A_DEVICE 1
#endif

namespace fastllm {
namespace qlinear {
namespace {

constexpr int kThreads = 256;  // two warpgroups
constexpr int kBN = kWgmmaRows;
constexpr int kBK = kWgmmaKTile;
static_assert(kBN == 128 && kBK == 128, "two warpgroups of 64 rows; lanes own 32-column runs of a 128-column tile");

template <int NP_>
struct WgCfg {
  static constexpr int NP = NP_;                      // tokens, padded: wgmma's N
  static constexpr int STAGES = NP <= 16 ? 8 : NP <= 32 ? 6 : NP <= 48 ? 5 : 4;
  static constexpr int AHEAD = STAGES - 2;            // K tiles loaded ahead of the one computed
  static constexpr int W_ROW = kBK / 2;               // 64 bytes of packed weights per row and tile
  static constexpr int W_STAGE = kBN * W_ROW;         // 8 KB
  static constexpr int X_BLOCK = NP * 128;            // one column block: NP rows of 64 elements
  static constexpr int X_STAGE = 2 * X_BLOCK;
  static constexpr int SMEM = 1024 + STAGES * (X_STAGE + W_STAGE);  // 1024: to align the base
  static constexpr int XJ = NP / 4;                   // x rows per warp and stage (8 warps, 2 column blocks)
  static_assert(NP % 16 == 0 && NP >= 16 && NP <= 64, "NP: 16, 32, 48 or 64");
  static_assert(X_STAGE % 1024 == 0 && X_BLOCK % 1024 == 0, "SW128 tiles must stay 1024-aligned");
  static_assert(AHEAD >= 2, "at least two K tiles in flight");
  static_assert(XJ * 8 == 2 * NP && XJ >= 4, "8 warps copy NP rows x 2 column blocks");
};

#ifdef FASTLLM_SM90A_DEVICE
// 4-byte global -> shared copy (cp.async.ca: 4 and 8 bytes go through L1);
// zero-fills and reads nothing when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}

// Byte b (0..3, a constant after unrolling) of q, dequantized with its two
// nibbles in the two halves: (low, high) = columns (2b, 2b + 1) -> one A
// register. scale2 = (scale, scale); fix2 = fp16: (-(1024 + zero), -(64 + zero)),
// bf16: (128 + zero, 128 + zero). qs = q >> 4 (bf16 only).
template <typename T>
__device__ __forceinline__ uint32_t dequant_byte(uint32_t q, uint32_t qs, int b, uint32_t scale2, uint32_t fix2) {
  constexpr uint32_t kMagic2 = Pair<T>::kMagic * 0x10001u;
  if constexpr (std::is_same_v<T, __half>) {
    // Byte b in bytes 0 and 2: its low nibble at bits 0-3 (1024 + lo) and its
    // high nibble at bits 20-23 (1024 + 16 hi); fp16 has 10 mantissa bits.
    const uint32_t v = and_or(__byte_perm(q, 0, b * 0x1111), 0x00F0000Fu, kMagic2);
    constexpr uint32_t kOneSixteenth = 0x3C00u | (0x2C00u << 16);  // (1.0, 1/16)
    return Pair<T>::mul(Pair<T>::fma(v, kOneSixteenth, fix2), scale2);
  } else {
    // bf16 has 7 mantissa bits: byte b of q (low nibble) and byte b of q >> 4
    // (the high nibble, moved down) in bytes 0 and 2, both at 128 + nibble.
    const uint32_t v = and_or(__byte_perm(q, qs, b | ((4 + b) << 8)), 0x000F000Fu, kMagic2);
    return Pair<T>::mul(Pair<T>::sub(v, fix2), scale2);
  }
}
#endif

template <typename T, int NP>
__global__ void __launch_bounds__(kThreads, 2) int4_wgmma_kernel(const Int4Params p) {
#ifdef FASTLLM_SM90A_DEVICE
  using C = WgCfg<NP>;
  using Mma = wgmma::MmaKB<T, NP>;
  constexpr int STAGES = C::STAGES, AHEAD = C::AHEAD;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  const uint32_t raw_u32 = smem_u32(smem_raw);
  const uint32_t sX = (raw_u32 + 1023u) & ~1023u;    // [STAGES][2][NP][128], swizzled
  const uint32_t sW = sX + STAGES * C::X_STAGE;      // [STAGES][128][64]
  const uint8_t* const w_gen = smem_raw + (sW - raw_u32);  // the same, as a generic pointer (LDS)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = (warp >> 2) * 64 + (warp & 3) * 16 + g;  // this thread's A rows: row_lo, row_lo + 8
  const int n0 = blockIdx.x * kBN;
  const int M = p.M, N = p.N, K = p.K;
  const int k_tiles = ceil_div(K, kBK);
  const int kt0 = static_cast<int>(static_cast<int64_t>(blockIdx.y) * k_tiles / p.splits);
  const int kt1 = static_cast<int>(static_cast<int64_t>(blockIdx.y + 1) * k_tiles / p.splits);

  // Token rows M..NP-1 of every x stage stay zero (cp.async never writes them).
  if (M < NP) {
    const int per_block = (NP - M) * 8;  // 16-byte chunks per column block
    for (int i = tid; i < STAGES * 2 * per_block; i += kThreads) {
      const int blk = i / per_block, rem = i - blk * per_block;  // blk = stage * 2 + column block
      const uint32_t a = sX + blk * C::X_BLOCK + (M + rem / 8) * 128 + (rem % 8) * 16;
      asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
    }
  }

  prefetch_scale_zero_rows<kBN, kBK, kThreads>(p, n0, kt0, kt1, tid);

  // ---- copies: computed once, advanced by one K tile per issue --------------
  // Weights: thread i copies 16-byte chunk i % 4 of rows i / 4 and i / 4 + 64.
  const uint8_t* w_src[2];
  uint32_t w_dst[2];
  int w_col[2];  // column of the chunk within a tile; -1: row past N
  {
    const int64_t row_bytes = K / 2;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = (tid >> 2) + 64 * j, c = tid & 3, n = n0 + r;
      w_src[j] = p.qweight + (n < N ? n : 0) * row_bytes + static_cast<int64_t>(kt0) * (kBK / 2) + c * 16;
      w_dst[j] = sW + r * C::W_ROW + c * 16;
      w_col[j] = n < N ? c * 32 : -1;
    }
  }
  // x: warp w copies column block w % 2 of rows w / 2 + 4 j (j < XJ); lane
  // (xt, xu) copies physical pair P = 16 xt + 8 cb + xu of the tile (columns
  // 2P, 2P + 1) to logical pair L = 4 (P % 16) + P / 16 = 32 cb + 4 xu + xt:
  // chunk xu of the swizzled row, bytes 4 xt. Per copy one IMAD.WIDE (the
  // source, 32-bit row stride: K <= 2^24, checked by the host) and the copy
  // (the destination is a per-tile register plus an immediate).
  const int xt = lane >> 3, xu = lane & 7, cb = warp & 1, xr0 = warp >> 1;
  const int x_col = 32 * xt + 16 * cb + 2 * xu;        // first column of the pair within a tile
  const int x_rows = M > xr0 ? (M - xr0 + 3) / 4 : 0;  // rows xr0 + 4 j < M: j < x_rows
  const uint32_t x_stride = 4u * static_cast<uint32_t>(K) * sizeof(T);  // bytes from row r to r + 4
  const uint8_t* x_src =
      reinterpret_cast<const uint8_t*>(static_cast<const T*>(p.x) + static_cast<int64_t>(xr0) * K + x_col) +
      static_cast<int64_t>(kt0) * kBK * sizeof(T);
  // Rows xr0 + 4 j alternate between two swizzle phases ((r + 4) % 8 = r % 8 ^ 4).
  uint32_t x_dst_even = sX + cb * C::X_BLOCK + xr0 * 128 + ((xu ^ (xr0 & 7)) << 4) + 4 * xt;
  uint32_t x_dst_odd = sX + cb * C::X_BLOCK + xr0 * 128 + ((xu ^ (xr0 & 7) ^ 4) << 4) + 4 * xt;
  // Opaque to the compiler, which would otherwise recompute the swizzle for
  // every copy of every tile (where the copies are predicated).
  asm volatile("" : "+r"(x_dst_even), "+r"(x_dst_odd));

  auto load_tile = [&](int slot, int kt) {
    const int left = K - kt * kBK;  // columns of K from this tile's first on
    const uint32_t wo = slot * C::W_STAGE;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      cp_async16_to(w_dst[j] + wo, w_src[j], static_cast<unsigned>(w_col[j]) < static_cast<unsigned>(left));
      w_src[j] += kBK / 2;
    }
    const bool x_in = x_col < left;  // K is a multiple of 32: a pair is all in or all out
    const uint32_t xo = slot * C::X_STAGE;
    const uint32_t d_even = x_dst_even + xo, d_odd = x_dst_odd + xo;
#pragma unroll
    for (int j = 0; j < C::XJ; ++j) {
      // Rows xr0 + 4 j < NP - 16 < M for j < XJ - 4: only the last four can be past M.
      if (j < C::XJ - 4 || j < x_rows)
        cp_async4((j & 1 ? d_odd : d_even) + j * 512, x_src + static_cast<uint64_t>(j * x_stride), x_in);
    }
    x_src += kBK * sizeof(T);
  };

  // ---- scales and zeros: per lane and row, scale bits | zero << 16 ------------
  // This lane's 32 columns of a tile lie in one group (32 | g): group index
  // (kt * 128 + 32 t) >> shift, advanced by 128 >> shift per tile.
  const unsigned short* s_row[2];
  const uint8_t* z_row[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + row_lo + 8 * h;
    row_ok[h] = n < N;
    const int64_t base = static_cast<int64_t>(n < N ? n : 0) * p.groups;
    s_row[h] = p.scales + base;
    z_row[h] = p.zeros + base;
  }
  const int g_step = kBK >> p.group_shift;
  int sz_col = kt0 * kBK + t * 32, sz_group = sz_col >> p.group_shift;  // of the next tile load_sz reads
  auto load_sz = [&](uint32_t (&sz)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      sz[h] = row_ok[h] && sz_col < K ? static_cast<uint32_t>(__ldg(s_row[h] + sz_group)) |
                                            (static_cast<uint32_t>(__ldg(z_row[h] + sz_group)) << 16)
                                      : 0u;  // scale 0: rows past N and columns past K dequantize to 0
    sz_col += kBK;
    sz_group += g_step;
  };

  float acc[NP / 2];
#pragma unroll
  for (int i = 0; i < NP / 2; ++i) acc[i] = 0.f;
  uint32_t a_lo[4][4], a_hi[4][4];  // A of k-steps 0-3 and 4-7 of a tile (double buffer)
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) a_lo[s][i] = a_hi[s][i] = 0u;

  // The A fragments of k-steps 4 half .. 4 half + 3 (words 2 half, 2 half + 1
  // of the lane's runs wq[0] = row_lo, wq[1] = row_lo + 8).
  auto dequant_half = [&](uint32_t (&a)[4][4], const uint4 (&wq)[2], int half, const uint32_t (&scale2)[2],
                          const uint32_t (&fix2)[2]) {
#pragma unroll
    for (int ww = 0; ww < 2; ++ww)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t q = word_of(wq[h], 2 * half + ww);
        const uint32_t qs = q >> 4;  // dead for fp16
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {  // step 2 ww + sub: bytes 2 sub, 2 sub + 1
          a[2 * ww + sub][h] = dequant_byte<T>(q, qs, 2 * sub, scale2[h], fix2[h]);
          a[2 * ww + sub][2 + h] = dequant_byte<T>(q, qs, 2 * sub + 1, scale2[h], fix2[h]);
        }
      }
  };

  // One K tile from pipeline slot `slot`: 8 k16 steps in two wgmma groups.
  auto compute = [&](int slot, const uint32_t (&sz)[2]) {
    const uint8_t* const tw = w_gen + slot * C::W_STAGE;
    const uint4 wq[2] = {lds128(tw + row_lo * C::W_ROW + t * 16), lds128(tw + (row_lo + 8) * C::W_ROW + t * 16)};
    uint32_t scale2[2], fix2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      scale2[h] = __byte_perm(sz[h], 0, 0x1010);                 // (scale, scale)
      const uint32_t zero2 = (Pair<T>::kMagic + (sz[h] >> 16)) * 0x10001u;  // (magic + zero) in both halves
      if constexpr (std::is_same_v<T, __half>) {
        constexpr uint32_t k0_960 = 0x6380u << 16;  // (0, 960): minus (1024 + zero) = (-(1024 + zero), -(64 + zero))
        fix2[h] = Pair<T>::sub(k0_960, zero2);
      } else {
        fix2[h] = zero2;
      }
    }
    // Step s reads k 16 s .. 16 s + 15 of the tile: column block s / 4, +32 bytes per step inside it.
    const uint64_t desc0 = wgmma::desc_sw128(sX + slot * C::X_STAGE, 16, 1024);
    auto desc = [&](int s) { return desc0 + static_cast<uint64_t>(((s >> 2) * C::X_BLOCK + (s & 3) * 32) >> 4); };

    dequant_half(a_lo, wq, 0, scale2, fix2);
    wgmma::fence();  // a_lo (and, on the first tile, the zeroed accumulators) written by ordinary instructions
#pragma unroll
    for (int s = 0; s < 4; ++s) Mma::rs(acc, a_lo[s], desc(s));
    wgmma::commit();
    wgmma::wait<1>();  // the previous group (the last tile's steps 4-7) is done: a_hi is free
    wgmma::fence_operand(a_hi);

    dequant_half(a_hi, wq, 1, scale2, fix2);
    wgmma::fence();
#pragma unroll
    for (int s = 4; s < 8; ++s) Mma::rs(acc, a_hi[s - 4], desc(s));
    wgmma::commit();
    wgmma::wait<1>();  // steps 0-3 are done: a_lo is free
    wgmma::fence_operand(a_lo);
  };

  // ---- main loop ---------------------------------------------------------------
#pragma unroll
  for (int s = 0; s < AHEAD; ++s) {
    if (kt0 + s < kt1) load_tile(s, kt0 + s);
    cp_async_commit();
  }
  uint32_t sz[2];
  load_sz(sz);
  int slot = 0;
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<AHEAD - 1>();   // this thread's copies of tile kt have landed
    wgmma::fence_proxy_async();   // ... and are visible to wgmma (the async proxy)
    __syncthreads();              // everyone's; and every group of tile kt - 2 is retired
    const int next = kt + AHEAD;  // into the slot of tile kt - 2
    if (next < kt1) load_tile(slot + AHEAD < STAGES ? slot + AHEAD : slot + AHEAD - STAGES, next);
    cp_async_commit();
    uint32_t sz_next[2];
    load_sz(sz_next);
    compute(slot, sz);
    sz[0] = sz_next[0];
    sz[1] = sz_next[1];
    slot = slot + 1 < STAGES ? slot + 1 : 0;
  }
  wgmma::wait<0>();
  wgmma::fence_operand(acc);
  wgmma::fence_operand(a_lo);
  wgmma::fence_operand(a_hi);
  cp_async_wait<0>();

  // ---- epilogue: acc[4i + e] = (row row_lo + 8 (e / 2), token 8i + 2t + e % 2) ---
  T* const out = static_cast<T*>(p.out);
  const T* const bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + row_lo + 8 * h;
    if (n >= N) continue;
    const float b = (p.ws == nullptr && bias != nullptr) ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < NP / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = 8 * i + 2 * t + e;
        if (m < M) {
          const float v = acc[4 * i + 2 * h + e];
          if (p.ws != nullptr) {
            p.ws[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = v;
          } else {
            out[static_cast<int64_t>(m) * N + n] = from_float<T>(v + b);
          }
        }
      }
  }
#endif  // FASTLLM_SM90A_DEVICE
}

int tokens_of(int64_t m) { return m <= 16 ? 16 : m <= 32 ? 32 : m <= 48 ? 48 : 64; }

// Opts every instance in at the first launch, so that one first used inside
// CUDA-graph capture makes no cudaFuncSetAttribute call there (as variant 0).
const char* opt_in_all() {
  const char* err = nullptr;
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__half, 16>>(WgCfg<16>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__half, 32>>(WgCfg<32>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__half, 48>>(WgCfg<48>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__half, 64>>(WgCfg<64>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__nv_bfloat16, 16>>(WgCfg<16>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__nv_bfloat16, 32>>(WgCfg<32>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__nv_bfloat16, 48>>(WgCfg<48>::SMEM);
  if (!err) err = opt_in_smem<int4_wgmma_kernel<__nv_bfloat16, 64>>(WgCfg<64>::SMEM);
  return err;
}

template <typename T, int NP>
const char* run(const Int4Params& a, cudaStream_t stream) {
  if (const char* err = opt_in_all()) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.N, kBN)), static_cast<unsigned>(a.splits), 1);
  int4_wgmma_kernel<T, NP><<<grid, kThreads, WgCfg<NP>::SMEM, stream>>>(a);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* run_typed(const Int4Params& a, cudaStream_t stream) {
  switch (tokens_of(a.M)) {
    case 16: return run<T, 16>(a, stream);
    case 32: return run<T, 32>(a, stream);
    case 48: return run<T, 48>(a, stream);
    default: return run<T, 64>(a, stream);
  }
}

}  // namespace

bool int4_wgmma_usable() {
#ifndef FASTLLM_HAS_SM90A
  return false;  // not compiled for sm_90a: the kernel bodies are empty
#else
  return sm90a_loadable<int4_wgmma_kernel<__nv_bfloat16, 16>>();
#endif
}

int int4_wgmma_smem(int64_t m) {
  switch (tokens_of(m)) {
    case 16: return WgCfg<16>::SMEM;
    case 32: return WgCfg<32>::SMEM;
    case 48: return WgCfg<48>::SMEM;
    default: return WgCfg<64>::SMEM;
  }
}

const char* launch_int4_wgmma(const Int4Params& a, bool half, cudaStream_t stream) {
  if (!int4_wgmma_usable()) return "int4_linear variant 2 (wgmma) needs an sm_90 GPU and a build for 90a";
  if (a.M < kWgmmaMinTokens || a.M > kWgmmaMaxTokens) return "int4_linear variant 2 (wgmma) takes 9..64 tokens";
  if (a.splits < 1 || a.splits > ceil_div(a.K, kBK)) return "int4_linear variant 2: num_splits out of range";
  return half ? run_typed<__half>(a, stream) : run_typed<__nv_bfloat16>(a, stream);
}

}  // namespace qlinear
}  // namespace fastllm
