/*
 * Prefill attention over the paged KV cache (flash attention, FA2-style on
 * mma.sync m16n8k16), for every step that is not a pure decode step: prompts,
 * chunks of prompts appended to a cached prefix (chunked prefill, prefix
 * caching), several sequences packed without padding.
 *
 * What it computes: for sequence b with query_len = cu_seqlens_q[b+1] -
 * cu_seqlens_q[b] and L = seq_lens[b], query i (token cu_seqlens_q[b] + i)
 * sits at position p = L - query_len + i; query head h reads KV head
 * h / G (G = Hq / Hk) and attends to the cached keys j <= p (and j > p - window
 * with a sliding window):
 *   out[token, h] = softmax_j(q . k_j * scale) v_j           (fp32 inside)
 *   lse[token, h] = ln sum_j exp(q . k_j * scale)             (optional)
 * A query with no keys gets out = 0 and lse = -inf. K/V are read from the
 * cache, [num_blocks, block_size, Hk, D]: position j of sequence b lives in
 * slot block_tables[b][j / block_size] * block_size + j % block_size (the new
 * tokens were written there by reshape_and_cache before this runs).
 *
 * Algorithm:
 *  - One CTA of 4 warps owns one sequence, one KV head and BM "rows", where a
 *    row is a (query, query head of the group) pair, row = i * G + g: the G
 *    query heads that share a KV head are packed into the M dimension, so each
 *    K/V tile brought into shared memory serves all of them, and a short query
 *    (1..7 tokens: speculative or chunked steps) still fills the M dimension
 *    with G x query_len rows instead of query_len. Consecutive rows are
 *    consecutive queries, so the causal structure stays a band: a CTA covers
 *    BM / G positions and only the one or two key tiles on its diagonal (and on
 *    the window's lower edge) need a mask.
 *  - Each warp owns 16 * MT rows (MT = 2 for D <= 128: a K/V fragment loaded
 *    by ldmatrix feeds two mma, which halves the shared-memory traffic per
 *    mma; that is what keeps mma.sync, not ldmatrix, the bottleneck). Q lives
 *    in shared memory and is re-read per k-step (D = 64: held in registers),
 *    S = Q K^T and O are fp32 mma accumulators in registers, P is converted to
 *    16 bits in registers and reused directly as the A operand of P V (the C
 *    layout of two n8 tiles is the A layout of one k16 step).
 *  - Key tiles of BN rows are walked from the diagonal down (masked tiles
 *    first), double-buffered in shared memory and filled with cp.async (16
 *    bytes per chunk). A tile may span any number of cache blocks in any
 *    order: one thread per key looks its slot up in the block table two tiles
 *    ahead and leaves it in a 3-entry ring in shared memory, so the K and V
 *    copies of every thread cost one shared load per chunk. Keys outside the
 *    CTA's range and invalid block ids get slot -1: zero-filled, never read.
 *    The copy of tile t+1's K starts before S of tile t is computed, and its
 *    V before P V of tile t, so both overlap half an iteration of mma work;
 *    two barriers per tile.
 *  - Online softmax in base 2: per row a running max m (of the raw scores) and
 *    sum l; p = 2^(s * scale * log2 e - m * scale * log2 e) is one FFMA and one
 *    MUFU.EX2. O is rescaled only when the maximum of some row of the warp
 *    grew (a warp vote; after the first tiles that is rare). l is kept per
 *    thread and reduced over the 4 lanes of a row only at the end.
 *  - Shared memory: Q [BM][DP], K [2][BN][DP], V [2][BN][DP] (DP = D rounded
 *    up to 64 elements: D = 80, 96 use 128-element rows), the slot ring
 *    [3][BN] and each thread's row positions (read by masked tiles only):
 *    <= 99 KB, two CTAs per H100 SM. Rows are XOR-swizzled in 16-byte chunks
 *    (chunk ^ row % 8): ldmatrix and the cp.async writes are free of bank
 *    conflicts.
 *  - Grid: one CTA per (m block, sequence, KV head) in a 1-D grid ordered with
 *    the m block slowest and descending, so the CTAs with the longest key
 *    ranges (the end of the longest prompt) start first and the short ones
 *    fill the tail. The grid is sized from a host-side bound on the query
 *    length; lengths are read on the device (no sync, CUDA-graph capturable),
 *    and CTAs past their sequence's rows exit at once.
 *  - Epilogue: O / l is staged through the warp's own rows of the Q tile and
 *    written with 16-byte stores; the LSE (natural log) by one lane per row.
 *
 * Traffic and compute: each CTA reads its Q rows once and the K/V tiles of its
 * key range once; per row the work is 4 * D flops per attended key. For the
 * causal S = 8192, 32/8 heads, d = 128 prompt that is 550 GFLOP against
 * 160 MB of HBM traffic (Q, K, V, O once: the CTAs of one KV head run close
 * together, so K/V come from L2) and ~4.3 GB of L2 -> shared traffic (32 KB of
 * K/V per 128 rows x 64 keys), ~2.5 TB/s at 315 TFLOP/s: within the L2's
 * bandwidth. Compute bound: the aim is mma.sync throughput (FA2 class, > 300
 * TFLOP/s on an H100); per tile and warp the loop issues ~1000 instructions
 * around its 256 HMMA.
 */
#include "common.cuh"
#include "mma.cuh"
#include "prefill_attention.cuh"

#include <climits>
#include <cmath>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "prefill_attention.cu needs sm_80 or newer (cp.async, ldmatrix, bf16 mma)"
#endif

namespace fastllm {
namespace {

using mma::cp_async_16;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::fast_exp2;
using mma::ldmatrix_x4;
using mma::ldmatrix_x4_trans;
using mma::mma_16816;
using mma::pack2;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile configuration of one head dim.
template <int D_, int MT_, int BN_, bool QREG_>
struct Cfg {
  static constexpr int D = D_;
  static constexpr int MT = MT_;               // m16 tiles (16 rows each) per warp
  static constexpr int BM = kWarps * 16 * MT;  // rows per CTA
  static constexpr int BN = BN_;               // keys per tile
  static constexpr bool QREG = QREG_;          // Q fragments held in registers
  static constexpr int DP = (D + 63) / 64 * 64;  // shared-memory row, elements
  static constexpr int ROW_BYTES = DP * 2;
  static constexpr int CPR = D / 8;   // 16-byte chunks per row
  static constexpr int KS = D / 16;   // k16 steps of Q K^T
  static constexpr int NT = BN / 8;   // n8 tiles of S
  static constexpr int DT = D / 8;    // n8 tiles of O
  static constexpr int Q_BYTES = BM * ROW_BYTES;
  static constexpr int KV_BYTES = BN * ROW_BYTES;  // one K or V buffer
  static constexpr int LOADS = BN * CPR / kThreads;    // K (or V) chunks per thread per tile
  static constexpr int SLOT_BYTES = 3 * BN * 4;          // cache slots of three tiles (a ring)
  static constexpr int POS_BYTES = MT * 2 * kThreads * 4;  // each thread's row positions
  // <= 99 KB so that it also runs on sm_86 / sm_89 (99 KB per block), and
  // two CTAs fit an sm_90 SM.
  static constexpr int SMEM = Q_BYTES + 4 * KV_BYTES + SLOT_BYTES + POS_BYTES;
  static_assert(SMEM <= 99 * 1024, "shared memory must fit sm_86 / sm_89");
  static_assert(2 * BN <= kThreads, "the prologue looks up two tiles' slots at once");
  static_assert(D % 16 == 0 && BN % 16 == 0, "tiles are made of k16 / n16 steps");
  static_assert((BM * CPR) % kThreads == 0 && (BN * CPR) % kThreads == 0, "loads must split evenly");
  static_assert((16 * MT * CPR) % 32 == 0, "epilogue stores must split evenly over a warp");
};

// D = 64: Q in registers (32), O 64, S 64 registers per thread.
// D = 80..128: Q re-read from shared memory; O 80..128 + S 64 registers.
// D = 256: one m16 tile per warp (O alone is 128 registers), 32-key tiles.
using Cfg64 = Cfg<64, 2, 64, true>;
using Cfg80 = Cfg<80, 2, 64, false>;
using Cfg96 = Cfg<96, 2, 64, false>;
using Cfg128 = Cfg<128, 2, 64, false>;
using Cfg256 = Cfg<256, 1, 32, false>;

using prefill::Cta;
using prefill::PrefillParams;

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads, 2) prefill_attention_kernel(const PrefillParams<T> p) {
  constexpr int D = C::D, MT = C::MT, BM = C::BM, BN = C::BN, RB = C::ROW_BYTES;
  constexpr int CPR = C::CPR, KS = C::KS, NT = C::NT, DT = C::DT;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = mma::smem_u32(smem);
  const uint32_t sK = sQ + C::Q_BYTES;       // [2][BN][DP]
  const uint32_t sV = sK + 2 * C::KV_BYTES;  // [2][BN][DP]
  const uint32_t sSlot = sV + 2 * C::KV_BYTES;   // [3][BN] int32: cache slot per key, -1 = zero fill
  const uint32_t sPos = sSlot + C::SLOT_BYTES;   // [MT * 2][kThreads] int32, private to each thread

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  Cta cta;
  if (!prefill::plan_cta(p, BM, BN, cta)) return;  // uniform over the CTA
  const int kvh = cta.kvh, G = cta.G, q_start = cta.q_start, rows = cta.rows, m0 = cta.m0;
  const int ntiles = cta.ntiles, n_top = cta.n_top, p_min = cta.p_min, kv_len = cta.kv_len;
  const int window = p.window, win_edge = cta.win_edge;

  // ---- loads ---------------------------------------------------------------
  // Chunk i of this thread in a tile: row r, 16-byte chunk c. When the threads
  // cover whole rows per pass (CPR divides 128), c is fixed and the rows of a
  // thread are RPP apart, which keeps the address arithmetic out of the loop.
  auto chunk_of = [&](int i, int& r, int& c) {
    if constexpr (kThreads % CPR == 0) {
      r = tid / CPR + i * (kThreads / CPR);
      c = tid % CPR;
    } else {
      const int idx = tid + i * kThreads;
      r = idx / CPR;
      c = idx - r * CPR;
    }
  };
  auto load_q = [&]() {
#pragma unroll
    for (int i = 0; i < BM * CPR / kThreads; ++i) {
      int r, c;
      chunk_of(i, r, c);
      const int row = m0 + r;
      const bool ok = row < rows;
      const T* src = p.q;
      if (ok) {
        const int qi = row / G, g = row - qi * G;
        src = p.q + static_cast<int64_t>(q_start + qi) * p.q_token_stride +
              static_cast<int64_t>(kvh * G + g) * p.q_head_stride + c * 8;
      }
      cp_async_16(sQ + mma::swizzle(r, c, RB), src, ok);
    }
  };
  // One thread per key of a tile looks its slot up two tiles ahead and leaves
  // it in the slot ring, so the K and V copies (every thread, after a
  // barrier) cost a shared load per chunk.
  auto lookup = [&](int j) -> int { return prefill::lookup_slot(p, cta, j); };
  auto store_slot = [&](int ring, int r, int slot) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sSlot + (ring * BN + r) * 4), "r"(slot) : "memory");
  };
  const unsigned slot_bytes = static_cast<unsigned>(p.kv_slot_stride) * 2u;
  auto load_kv = [&](uint32_t dst, const T* cache, int ring) {
    const char* base = reinterpret_cast<const char*>(cache + kvh * D);
#pragma unroll
    for (int i = 0; i < C::LOADS; ++i) {
      int r, c;
      chunk_of(i, r, c);
      int slot;
      asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(slot) : "r"(sSlot + (ring * BN + r) * 4) : "memory");
      const bool ok = slot >= 0;
      const char* src = (base + c * 16) + static_cast<size_t>(static_cast<unsigned>(ok ? slot : 0)) * slot_bytes;
      cp_async_16(dst + mma::swizzle(r, c, RB), src, ok);
    }
  };

  // Prologue: slots of the first two tiles, then group 0 = Q and K of the
  // first tile, group 1 = its V. Tile t uses ring entry t % 3.
  if (tid < 2 * BN) {
    const int t = tid / BN, r = tid % BN;
    if (t < ntiles) store_slot(t, r, lookup(n_top - t * BN + r));
  }
  __syncthreads();
  load_q();
  if (ntiles > 0) load_kv(sK, p.k_cache, 0);
  cp_async_commit();
  if (ntiles > 0) load_kv(sV, p.v_cache, 0);
  cp_async_commit();

  // ---- per-thread constants ------------------------------------------------
  const int g4 = lane >> 2, t4 = lane & 3;
  const int warp_row0 = warp * 16 * MT;
  // Each thread holds rows warp_row0 + mt * 16 + h * 8 + g4 (mt < MT, h < 2),
  // at positions row_pos; key j is allowed iff j <= row_pos and (with a
  // window) j > row_pos - window. Negative positions (no keys) clamp to -1 so
  // that row_pos - window cannot overflow; positions past the last loadable
  // key clamp to it (only with inconsistent metadata). Only the masked tiles
  // read them, so they wait in (thread-private) shared memory, not registers.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int pos = prefill::row_position(cta, m0 + warp_row0 + mt * 16 + h * 8 + g4);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sPos + ((mt * 2 + h) * kThreads + tid) * 4), "r"(pos) : "memory");
    }
  }

  // ldmatrix lane addresses. Every address a lane gives is in a row r with
  // r % 8 == lane % 8, so the swizzled chunk is (2 * step) ^ x with a per-lane
  // x < 8: chunks 8k.. of a step are 128 bytes further, and the XOR only
  // touches the low three bits (four distinct offsets per lane).
  //  Q (A, row-major):    rows lane % 16,               chunk 2 ks + lane / 16
  //  K (B of Q K^T):      rows lane % 8 + 8 (lane / 16), chunk 2 ks + (lane / 8) % 2
  //  V (B of P V, .trans): rows lane % 16,               chunk 2 dp + lane / 16
  const int x_q = (lane >> 4) ^ (lane & 7);
  const int x_k = ((lane >> 3) & 1) ^ (lane & 7);
  const uint32_t q_row = sQ + (warp_row0 + (lane & 15)) * RB;
  const uint32_t k_row = static_cast<uint32_t>(((lane & 7) + ((lane >> 4) << 3)) * RB);
  const uint32_t v_row = static_cast<uint32_t>((lane & 15) * RB);
  // Byte offset of chunk 2 * step (swizzled) for a lane constant x.
  auto step_off = [](int step, int x) -> uint32_t {
    return static_cast<uint32_t>((((2 * step) & ~7) + (((2 * step) & 7) ^ x)) << 4);
  };

  float o[MT][DT][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  uint32_t qf[C::QREG ? MT : 1][C::QREG ? KS : 1][4];
  if constexpr (C::QREG) {
    cp_async_wait<1>();  // Q (and K of the first tile) landed for this thread
    __syncthreads();     // ... and for every thread
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qf[mt][ks], q_row + mt * 16 * RB + step_off(ks, x_q));
    }
  }

  const float sl2 = p.scale_log2;

  // ---- main loop: key tiles from the diagonal down --------------------------
  int ring1 = 1;  // ring entry of tile it + 1, i.e. (it + 1) % 3
  for (int it = 0; it < ntiles; ++it) {
    const int n0 = n_top - it * BN;
    const int buf = it & 1;
    const uint32_t kbuf = sK + buf * C::KV_BYTES, vbuf = sV + buf * C::KV_BYTES;
    const int ring2 = ring1 == 2 ? 0 : ring1 + 1;  // (it + 2) % 3

    cp_async_wait<1>();  // K of this tile landed (its V may still be in flight)
    __syncthreads();     // visible to all warps; all warps are done with tile it-1 (buffers, ring entry)
    if (it + 1 < ntiles) load_kv(sK + (buf ^ 1) * C::KV_BYTES, p.k_cache, ring1);
    cp_async_commit();
    // Slots of tile it + 2, published by the barrier before P V.
    const bool do_lookup = tid < BN && it + 2 < ntiles;
    const int next_slot = do_lookup ? lookup(n0 - 2 * BN + tid) : -1;

    // S = Q K^T (raw scores, fp32).
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (C::QREG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
        } else {
          ldmatrix_x4(a[mt], q_row + mt * 16 * RB + step_off(ks, x_q));
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];  // b0, b1 of n-tile 2np, then of 2np + 1
        ldmatrix_x4(kb, kbuf + k_row + np * 16 * RB + step_off(ks, x_k));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], kb[0], kb[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
        }
      }
    }

    // Mask the diagonal / window-edge / past-the-end tiles only.
    const bool need_mask = n0 + BN - 1 > p_min || n0 + BN > kv_len || n0 <= win_edge;
    if (need_mask) {
      int row_pos[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          asm volatile("ld.shared.b32 %0, [%1];\n"
                       : "=r"(row_pos[mt][h])
                       : "r"(sPos + ((mt * 2 + h) * kThreads + tid) * 4)
                       : "memory");
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = n0 + nt * 8 + t4 * 2 + (e & 1);
            const int pos = row_pos[mt][e >> 1];
            if (prefill::masked(j, pos, window)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax; s becomes p = 2^(s * sl2 - m * sl2).
    float alpha[MT][2];
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m_run[mt][h];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ms = mx == -INFINITY ? 0.f : mx * sl2;  // no key yet: keep -inf - (-inf) out
        const bool grew = mx != m_run[mt][h];
        alpha[mt][h] = grew ? fast_exp2(m_run[mt][h] * sl2 - ms) : 1.f;  // 2^-inf = 0 for the first keys
        rescale |= grew;
        m_run[mt][h] = mx;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          s[mt][nt][2 * h] = fast_exp2(fmaf(s[mt][nt][2 * h], sl2, -ms));
          s[mt][nt][2 * h + 1] = fast_exp2(fmaf(s[mt][nt][2 * h + 1], sl2, -ms));
          rs += s[mt][nt][2 * h] + s[mt][nt][2 * h + 1];
        }
        l_run[mt][h] = fmaf(l_run[mt][h], alpha[mt][h], rs);
      }
    }
    // Rescale O only when some row of the warp saw a larger maximum: after the
    // first tiles that is rare, and it is 4 * D / 8 multiplies per row.
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][0] *= alpha[mt][0];
          o[mt][dt][1] *= alpha[mt][0];
          o[mt][dt][2] *= alpha[mt][1];
          o[mt][dt][3] *= alpha[mt][1];
        }
      }
    }

    // P in 16 bits: the C fragments of n-tiles 2kk, 2kk+1 are the A fragment
    // of k-step kk of P V.
    uint32_t pf[MT][NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        pf[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    if (do_lookup) store_slot(ring2, tid, next_slot);
    cp_async_wait<1>();  // V of this tile landed (next K may still be in flight)
    __syncthreads();
    if (it + 1 < ntiles) load_kv(sV + (buf ^ 1) * C::KV_BYTES, p.v_cache, ring1);
    cp_async_commit();
    ring1 = ring2;

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];  // b0, b1 of d-tile 2dp, then of 2dp + 1
        ldmatrix_x4_trans(vb, vbuf + v_row + kk * 16 * RB + step_off(dp, x_q));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], pf[mt][kk], vb[0], vb[1]);
          mma_16816<T>(o[mt][2 * dp + 1], pf[mt][kk], vb[2], vb[3]);
        }
      }
    }
  }
  // ---- epilogue --------------------------------------------------------------
  // The warp's own Q rows become the staging area: every copy into them must
  // have landed (the Q copies of a CTA without keys were never waited for),
  // and other warps only ever read their own rows.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mt][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      l_run[mt][h] = l;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int r = warp_row0 + mt * 16 + h * 8 + g4;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const uint32_t v = pack2<T>(o[mt][dt][2 * h] * inv, o[mt][dt][2 * h + 1] * inv);
        const uint32_t addr = sQ + mma::swizzle(r, dt, RB) + t4 * 4;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * MT * CPR / 32; ++i) {
    const int idx = lane + i * 32;
    const int rr = idx / CPR, c = idx - rr * CPR;
    const int r = warp_row0 + rr;
    const int row = m0 + r;
    if (row < rows) {
      const int qi = row / G, g = row - qi * G;
      uint4 v;
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(sQ + mma::swizzle(r, c, RB))
                   : "memory");
      T* dst = p.out + (static_cast<int64_t>(q_start + qi) * p.num_q_heads + kvh * G + g) * D + c * 8;
      *reinterpret_cast<uint4*>(dst) = v;
    }
  }
  if (p.lse != nullptr && t4 == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + warp_row0 + mt * 16 + h * 8 + g4;
        if (row < rows) {
          const int qi = row / G, g = row - qi * G;
          const float l = l_run[mt][h];
          const float v = l > 0.f ? (m_run[mt][h] * sl2 + log2f(l)) * kLn2 : -INFINITY;
          p.lse[static_cast<int64_t>(q_start + qi) * p.num_q_heads + kvh * G + g] = v;
        }
      }
    }
  }
}

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  return dev;
}

template <typename T, typename C>
const char* launch_typed(const PrefillParams<T>& p, int64_t grid, cudaStream_t stream) {
  auto kernel = prefill_attention_kernel<T, C>;
  // Opting in to more than 48 KB of dynamic shared memory is per device and
  // function; done once (outside any graph capture that follows an eager call).
  static bool opted_in[64] = {};
  const int dev = current_device();
  if (dev < 0 || dev >= 64 || !opted_in[dev]) {
    FASTLLM_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
    if (dev >= 0 && dev < 64) opted_in[dev] = true;
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, C::SMEM, stream>>>(p);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename F>
const char* dispatch_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(Cfg64{});
    case 80: return f(Cfg80{});
    case 96: return f(Cfg96{});
    case 128: return f(Cfg128{});
    case 256: return f(Cfg256{});
  }
  return "head_dim must be 64, 80, 96, 128 or 256";
}

}  // namespace

const char* launch_prefill_attention(void* out, void* lse, const void* q, const void* k_cache, const void* v_cache,
                                     const void* cu_seqlens_q, const void* seq_lens, const void* block_tables,
                                     int64_t num_tokens, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                     int64_t head_dim, int64_t q_token_stride, int64_t q_head_stride,
                                     int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                     int64_t max_query_len, float scale, int64_t sliding_window, int dtype,
                                     int impl, void* stream) {
  if (impl < 0 || impl > 2) return "impl must be 0 (mma.sync), 1 (wgmma) or 2 (wgmma, pipelined; both sm_90a)";
  if (impl != 0 && head_dim != 64 && head_dim != 128) return "the wgmma kernels support head_dim 64 and 128";
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "dtype must be float16 or bfloat16";
  if (head_dim != 64 && head_dim != 80 && head_dim != 96 && head_dim != 128 && head_dim != 256)
    return "head_dim must be 64, 80, 96, 128 or 256";
  if (num_kv_heads <= 0 || num_q_heads <= 0 || num_q_heads % num_kv_heads != 0)
    return "num_q_heads must be a positive multiple of num_kv_heads";
  if (num_tokens < 0 || batch < 0 || max_query_len < 0) return "num_tokens, batch and max_query_len must be >= 0";
  if (num_tokens == 0 || batch == 0 || max_query_len == 0) return nullptr;
  const int64_t group = num_q_heads / num_kv_heads;
  if (num_tokens * num_q_heads > INT_MAX / 2 || batch > INT_MAX / 2) return "too many tokens x heads";
  if (block_size <= 0 || (block_size & (block_size - 1)) != 0 || block_size > (1 << 20))
    return "block_size must be a power of two in [1, 2^20]";
  if (num_blocks < 0 || num_blocks * block_size > INT_MAX) return "num_blocks * block_size must fit in int32";
  if (num_kv_heads * head_dim > INT_MAX) return "too many KV heads";
  if (max_blocks < 0 || max_blocks > INT_MAX) return "max_blocks out of range";
  if (sliding_window < 0 || sliding_window > INT_MAX) return "sliding_window out of range (0 = none)";
  if (!std::isfinite(scale) || !(scale > 0.f)) return "scale must be finite and > 0";
  if (q_token_stride % 8 || q_head_stride % 8) return "q strides must be multiples of 8 elements";
  if (!aligned16(out) || !aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache))
    return "out, q and the caches must be 16-byte aligned";
  if (lse != nullptr && (reinterpret_cast<uintptr_t>(lse) & 3)) return "lse must be 4-byte aligned";

  if (max_query_len > num_tokens) max_query_len = num_tokens;
  static_assert(Cfg128::BM == prefill::kRowsPerCta, "both kernels size the grid with these rows per CTA");
  const int bm = head_dim == 256 ? Cfg256::BM : Cfg128::BM;
  const int64_t num_m_blocks = ceil_div<int64_t>(max_query_len * group, bm);
  const int64_t grid = num_m_blocks * batch * num_kv_heads;
  if (grid > INT_MAX) return "grid too large (tokens x heads)";
  int log2_block = 0;
  while ((int64_t{1} << log2_block) < block_size) ++log2_block;
  const int64_t max_len = max_blocks * block_size;

  auto fill = [&](auto* typed_out) -> const char* {
    using T = std::remove_pointer_t<decltype(typed_out)>;
    PrefillParams<T> p;
    p.out = typed_out;
    p.lse = static_cast<float*>(lse);
    p.q = static_cast<const T*>(q);
    p.k_cache = static_cast<const T*>(k_cache);
    p.v_cache = static_cast<const T*>(v_cache);
    p.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q);
    p.seq_lens = static_cast<const int32_t*>(seq_lens);
    p.block_tables = static_cast<const int32_t*>(block_tables);
    p.q_token_stride = q_token_stride;
    p.q_head_stride = q_head_stride;
    p.kv_slot_stride = static_cast<int>(num_kv_heads * head_dim);
    p.num_tokens = static_cast<int>(num_tokens);
    p.batch = static_cast<int>(batch);
    p.num_q_heads = static_cast<int>(num_q_heads);
    p.num_kv_heads = static_cast<int>(num_kv_heads);
    p.group = static_cast<int>(group);
    p.num_blocks = static_cast<int>(num_blocks);
    p.max_blocks = static_cast<int>(max_blocks);
    p.log2_block = log2_block;
    p.max_len = static_cast<int>(max_len < INT_MAX ? max_len : INT_MAX);
    p.window = static_cast<int>(sliding_window);
    p.num_m_blocks = static_cast<int>(num_m_blocks);
    p.scale_log2 = scale * kLog2e;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (impl != 0) return prefill::launch_sm90<T>(p, grid, static_cast<int>(head_dim), impl == 2, s);
    return dispatch_head_dim(head_dim, [&](auto c) -> const char* {
      using C = decltype(c);
      static_assert(C::BM == (C::D == 256 ? Cfg256::BM : Cfg128::BM), "grid sizing assumes these block rows");
      return launch_typed<T, C>(p, grid, s);
    });
  };
  if (dtype == static_cast<int>(DType::kFloat16)) return fill(static_cast<__half*>(out));
  return fill(static_cast<__nv_bfloat16*>(out));
}

bool prefill_attention_sm90_usable(int64_t head_dim) { return prefill::sm90_usable(head_dim); }

}  // namespace fastllm
