/*
 * Prefill attention on Hopper (sm_90a): the computation of
 * prefill_attention.cu (same parameters, same results: causal / sliding-window
 * attention of packed variable-length queries over the paged KV cache, GQA
 * rows packed into M, optional LSE), with the two matrix products on the
 * warpgroup MMA (wgmma) instead of mma.sync. Head dims 64 and 128; the
 * launcher falls back to the mma.sync kernel for the others.
 *
 * Why: mma.sync tops out near FA2 speed on an H100 (~330 TFLOP/s at best);
 * wgmma reads its B operand (and A for Q K^T) straight from shared memory,
 * issues a 64 x N x 16 product per warpgroup instruction and runs
 * asynchronously, so the softmax can overlap products on the tensor cores
 * and ldmatrix disappears from the loop.
 *
 * Algorithm (one CTA = 2 warpgroups = 256 threads, 128 rows, one sequence and
 * KV head, as the mma.sync kernel, so the host sizes one grid for both):
 *  - Each warpgroup owns 64 rows. S = Q K^T for a tile of BN = 128 keys is D/16
 *    wgmma.m64n128k16 with Q (A) and K (B) both K-major in shared memory; the
 *    fp32 S accumulators (64 per thread) get the mask and the online softmax in
 *    registers (the accumulator layout per warp is mma.sync's C layout, so the
 *    softmax is the mma.sync kernel's), and P in 16 bits stays in registers as
 *    the A operand of O += P V: BN/16 wgmma.m64n{D}k16 with V (B) read N-major
 *    (imm-trans-b) from its natural [key][dim] layout.
 *  - Two schedules (template kPipelined; impl 1 and 2 of the launcher):
 *    plain: per tile, S, then its softmax, then P V, which is not waited for:
 *    it runs while the warpgroup crosses the barrier and issues Q K^T of the
 *    next tile, and one wait covers both (wgmma groups complete in order).
 *    The softmax finds the tensor cores idle: both warpgroups reach it
 *    together, their loads and barriers keeping them in step.
 *    pipelined (FA3's intra-warpgroup overlap): per tile, issue S of tile t+1
 *    and then P V of tile t as two groups, wait for the first only, and run
 *    the softmax of t+1 while P V of t occupies the tensor cores; then wait,
 *    rescale O and pack P of t+1. S of t+1, P of t and O are all live through
 *    the softmax (s 64 + P 32 + O 64 registers at D = 128), and one CTA
 *    barrier per tile publishes V(t) and K(t+1) together, loaded one tile
 *    ahead (V(t+1) and K(t+2) fly during tile t).
 *  - Shared memory tiles are stored as 128-byte-swizzled column blocks of 64
 *    elements ([D/64][rows][64]; 16-byte chunk c of row r at
 *    (c / 8) * rows * 128 + r * 128 + ((c % 8) ^ (r % 8)) * 16, bases
 *    1024-aligned), which is the canonical SW128 layout of wgmma: K-major
 *    descriptors for Q and K (stride byte offset 1024 between 8-row groups, a
 *    k16 step is +32 bytes inside the 128-byte row), N-major for V (leading
 *    byte offset = one column block, stride byte offset 1024 between 8-key
 *    groups, a k16 step is +2048 bytes). The same XOR makes the cp.async
 *    writes conflict-free.
 *  - Loads are the mma.sync kernel's: every thread issues cp.async for Q and
 *    the K/V tiles (double-buffered; plain: K of tile t+1 during S of tile t,
 *    V of t+1 during P V of t), cache slots looked up two (pipelined: three)
 *    tiles ahead into a 3-entry ring. Before a barrier that publishes a
 *    tile to wgmma, each thread waits for its copies and fences them into
 *    the async proxy (fence.proxy.async), which wgmma reads through.
 *  - Shared memory: Q 16/32 KB, K and V 2 x 16/32 KB each, slots 1.5 KB:
 *    82 KB (D = 64) or 162 KB (D = 128); ptxas (sm_90a, CUDA 13.0): plain
 *    163 / 200 registers, pipelined 168 / 202, no spills, no wgmma
 *    serialisation: one CTA (8 warps) per SM.
 *
 * Traffic: as the mma.sync kernel (Q, K, V, O once from HBM; K/V tiles per
 * 128 rows from L2). Compute: 4 * D flops per row and attended key on
 * wgmma, whose peak on an H100 SXM is ~990 dense TFLOP/s in bf16.
 */
#include "common.cuh"
#include "mma.cuh"
#include "prefill_attention.cuh"
#include "wgmma.cuh"

#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTLLM_SM90A_DEVICE 1
#endif

namespace fastllm {
namespace prefill {
namespace {

constexpr int kThreads = 256;      // two warpgroups
constexpr int kBM = kRowsPerCta;   // 128 rows: 64 per warpgroup
constexpr int kBN = 128;           // keys per tile
static_assert(kBM == 128, "two warpgroups of 64 rows");

template <int D_>
struct Sm90Cfg {
  static constexpr int D = D_;
  static constexpr int CPR = D / 8;    // 16-byte chunks per row
  static constexpr int Q_BYTES = kBM * D * 2;
  static constexpr int KV_BYTES = kBN * D * 2;  // one K or V buffer
  static constexpr int SLOT_BYTES = 3 * kBN * 4;
  static constexpr int SMEM = 1024 + Q_BYTES + 4 * KV_BYTES + SLOT_BYTES;  // 1024: to align the base
  static_assert(D == 64 || D == 128, "wgmma kernel: head dims 64 and 128");
  static_assert(kThreads % CPR == 0, "every thread copies whole columns of chunks");
};

#ifdef FASTLLM_SM90A_DEVICE
constexpr float kLn2 = 0.6931471805599453f;

// Byte offset of 16-byte chunk c of row r in a tile of `rows` rows stored as
// 128-byte-swizzled column blocks of 64 elements (see the header comment).
__device__ __forceinline__ uint32_t sw128(int r, int c, int rows) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Publishes shared-memory tiles to wgmma: this thread's cp.async groups but
// the newest N have landed, are fenced into the async proxy that wgmma reads
// through, and a CTA barrier makes every thread's copies visible.
template <int N>
__device__ __forceinline__ void publish_to_wgmma() {
  mma::cp_async_wait<N>();
  wgmma::fence_proxy_async();
  __syncthreads();
}
#endif

// kPipelined: P V of tile t runs under the softmax of tile t + 1 (one CTA
// barrier per tile); otherwise each tile's S, softmax and P V follow in turn
// (two barriers per tile). See the header comment.
template <typename T, int D, bool kPipelined>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_sm90_kernel(const PrefillParams<T> p) {
#ifdef FASTLLM_SM90A_DEVICE
  using C = Sm90Cfg<D>;
  using MmaS = wgmma::Mma<T, kBN>;  // S: n = keys of a tile
  using MmaO = wgmma::Mma<T, D>;    // O: n = head dim
  constexpr int CPR = C::CPR;
  constexpr int KS = D / 16;    // k16 steps of Q K^T
  constexpr int NK = kBN / 16;  // k16 steps of P V

  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (mma::smem_u32(smem_raw) + 1023u) & ~1023u;  // [D/64][kBM][64], swizzled
  const uint32_t sK = sQ + C::Q_BYTES;                              // [2][D/64][kBN][64]
  const uint32_t sV = sK + 2 * C::KV_BYTES;                         // [2][D/64][kBN][64]
  const uint32_t sSlot = sV + 2 * C::KV_BYTES;                      // [3][kBN] int32 slot ring

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;                      // warpgroup: rows 64 wg .. 64 wg + 63
  const int warp_row0 = wg * 64 + (warp & 3) * 16;  // first row of this warp

  Cta cta;
  if (!plan_cta(p, kBM, kBN, cta)) return;  // uniform over the CTA
  const int G = cta.G, m0 = cta.m0, ntiles = cta.ntiles, n_top = cta.n_top;
  const int window = p.window;

  // ---- loads (every thread; chunk c of rows tid / CPR + i * kThreads / CPR) ----
  const int ld_c = tid % CPR, ld_r = tid / CPR;
  constexpr int kRowStep = kThreads / CPR;
  auto load_q = [&]() {
#pragma unroll
    for (int i = 0; i < kBM / kRowStep; ++i) {
      const int r = ld_r + i * kRowStep, row = m0 + r;
      const bool ok = row < cta.rows;
      const T* src = p.q;
      if (ok) {
        const int qi = row / G, g = row - qi * G;
        src = p.q + static_cast<int64_t>(cta.q_start + qi) * p.q_token_stride +
              static_cast<int64_t>(cta.kvh * G + g) * p.q_head_stride + ld_c * 8;
      }
      mma::cp_async_16(sQ + sw128(r, ld_c, kBM), src, ok);
    }
  };
  auto store_slot = [&](int ring, int r, int slot) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sSlot + (ring * kBN + r) * 4), "r"(slot) : "memory");
  };
  const unsigned slot_bytes = static_cast<unsigned>(p.kv_slot_stride) * 2u;
  auto load_kv = [&](uint32_t dst, const T* cache, int ring) {
    const char* base = reinterpret_cast<const char*>(cache + cta.kvh * D) + ld_c * 16;
#pragma unroll
    for (int i = 0; i < kBN / kRowStep; ++i) {
      const int r = ld_r + i * kRowStep;
      int slot;
      asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(slot) : "r"(sSlot + (ring * kBN + r) * 4) : "memory");
      const bool ok = slot >= 0;
      const char* src = base + static_cast<size_t>(static_cast<unsigned>(ok ? slot : 0)) * slot_bytes;
      mma::cp_async_16(dst + sw128(r, ld_c, kBN), src, ok);
    }
  };

  // ---- per-thread rows: warp_row0 + g4 (h = 0) and + 8 (h = 1) ----------------
  const int g4 = lane >> 2, t4 = lane & 3;
  int row_pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) row_pos[h] = row_position(cta, m0 + warp_row0 + h * 8 + g4);

  // Descriptors: this warpgroup's 64 Q rows; k16 step ks of Q K^T is +32 bytes
  // inside a 128-byte row, the next column block after 4 steps; k16 step kk of
  // P V is 16 keys = +2048 bytes of V.
  const uint32_t q_base = sQ + wg * 64 * 128;
  auto q_desc = [&](int ks) {
    return wgmma::desc_sw128(q_base + (ks >> 2) * (kBM * 128) + (ks & 3) * 32, 16, 1024);
  };
  auto k_desc = [&](uint32_t kbuf, int ks) {
    return wgmma::desc_sw128(kbuf + (ks >> 2) * (kBN * 128) + (ks & 3) * 32, 16, 1024);
  };
  auto v_desc = [&](uint32_t vbuf, int kk) { return wgmma::desc_sw128(vbuf + kk * 2048, kBN * 128, 1024); };

  float o[D / 2], s[kBN / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) s[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float sl2 = p.scale_log2;
  uint32_t pf[NK][4];  // P of a tile in 16 bits: the A operand of its P V
  float alpha[2];      // what O is rescaled by before the next P V

  // S = Q K^T of the tile in kbuf (raw scores, fp32; the first k-step
  // overwrites S), issued and committed as one wgmma group.
  auto issue_s = [&](uint32_t kbuf) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) MmaS::ss(s, q_desc(ks), k_desc(kbuf, ks), ks > 0 ? 1 : 0);
    wgmma::commit();
  };
  // O += P V of the tile in vbuf, one wgmma group.
  auto issue_pv = [&](uint32_t vbuf) {
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) MmaO::rs(o, pf[kk], v_desc(vbuf, kk));
    wgmma::commit();
  };
  // Mask (diagonal / window-edge / past-the-end tiles only) and online softmax
  // (base 2) of the S tile of keys n0 .. n0 + kBN - 1: s becomes
  // p = 2^(s * sl2 - m * sl2), l and m are updated, alpha gets the factor for
  // O; returns whether O needs it (some row of the warp has a new maximum).
  auto softmax_tile = [&](int n0) -> bool {
    if (n0 + kBN - 1 > cta.p_min || n0 + kBN > cta.kv_len || n0 <= cta.win_edge) {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (masked(n0 + i * 8 + t4 * 2 + (e & 1), row_pos[e >> 1], window)) s[4 * i + e] = -INFINITY;
        }
      }
    }
    bool rescale = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float ms = mx == -INFINITY ? 0.f : mx * sl2;  // no key yet: keep -inf - (-inf) out
      const bool grew = mx != m_run[h];
      alpha[h] = grew ? mma::fast_exp2(m_run[h] * sl2 - ms) : 1.f;
      rescale |= grew;
      m_run[h] = mx;
      float rs = 0.f;
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
        s[4 * i + 2 * h] = mma::fast_exp2(fmaf(s[4 * i + 2 * h], sl2, -ms));
        s[4 * i + 2 * h + 1] = mma::fast_exp2(fmaf(s[4 * i + 2 * h + 1], sl2, -ms));
        rs += s[4 * i + 2 * h] + s[4 * i + 2 * h + 1];
      }
      l_run[h] = fmaf(l_run[h], alpha[h], rs);
    }
    return __any_sync(0xffffffffu, rescale);
  };
  auto rescale_o = [&]() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[4 * i + 0] *= alpha[0];
      o[4 * i + 1] *= alpha[0];
      o[4 * i + 2] *= alpha[1];
      o[4 * i + 3] *= alpha[1];
    }
  };
  // Accumulator n8 chunks 2kk, 2kk+1 of S are the A fragment of k-step kk of
  // P V (per warp the mma.m16n8k16 A layout).
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      pf[kk][0] = mma::pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = mma::pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = mma::pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = mma::pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // Prologue: the slots of the first tiles (two ahead, pipelined three), then
  // group 0 = Q and K(0), group 1 = V(0) (pipelined: and K(1)). Tile t uses
  // slot-ring entry t % 3.
  constexpr int kTilesAhead = kPipelined ? 3 : 2;
  for (int e = tid; e < kTilesAhead * kBN; e += kThreads) {
    const int t = e / kBN, r = e - t * kBN;
    if (t < ntiles) store_slot(t, r, lookup_slot(p, cta, n_top - t * kBN + r));
  }
  __syncthreads();
  load_q();
  if (ntiles > 0) load_kv(sK, p.k_cache, 0);
  mma::cp_async_commit();
  if (ntiles > 0) load_kv(sV, p.v_cache, 0);
  if (kPipelined && ntiles > 1) load_kv(sK + C::KV_BYTES, p.k_cache, 1);
  mma::cp_async_commit();

  if constexpr (!kPipelined) {
    // ---- main loop: key tiles from the diagonal down ------------------------
    int ring1 = 1;  // ring entry of tile it + 1
    for (int it = 0; it < ntiles; ++it) {
      const int n0 = n_top - it * kBN;
      const int buf = it & 1;
      const uint32_t kbuf = sK + buf * C::KV_BYTES, vbuf = sV + buf * C::KV_BYTES;
      const int ring2 = ring1 == 2 ? 0 : ring1 + 1;

      publish_to_wgmma<1>();  // Q and K of this tile; and tile it-1's S products are done
      if (it + 1 < ntiles) load_kv(sK + (buf ^ 1) * C::KV_BYTES, p.k_cache, ring1);
      mma::cp_async_commit();
      const bool do_lookup = tid < kBN && it + 2 < ntiles;
      const int next_slot = do_lookup ? lookup_slot(p, cta, n0 - 2 * kBN + tid) : -1;

      wgmma::fence();
      issue_s(kbuf);
      wgmma::wait<0>();  // S of this tile, and P V of the previous one
      wgmma::fence_operand(s);
      wgmma::fence_operand(o);
      if (softmax_tile(n0)) rescale_o();
      pack_p();

      if (do_lookup) store_slot(ring2, tid, next_slot);
      publish_to_wgmma<1>();  // V of this tile (K of the next may still fly); and every
                              // warpgroup is past P V of tile it-1: its V buffer is free
      if (it + 1 < ntiles) load_kv(sV + (buf ^ 1) * C::KV_BYTES, p.v_cache, ring1);
      mma::cp_async_commit();
      ring1 = ring2;

      // O += P V, left running (waited for after the next tile's S).
      wgmma::fence();  // P and the rescaled O were written by ordinary instructions
      issue_pv(vbuf);
    }
  } else {
    if (ntiles > 0) {  // S and P of tile 0 (O is still 0: nothing to rescale)
      publish_to_wgmma<1>();  // Q and K(0)
      wgmma::fence();
      issue_s(sK);
      wgmma::wait<0>();
      wgmma::fence_operand(s);
      softmax_tile(n_top);
      pack_p();
    }

    // ---- main loop: P V of tile it under the softmax of tile it + 1 -----------
    // (the last tile's P V follows the loop, so that every wgmma here is issued
    // unconditionally and ptxas sees one pattern of groups and waits)
    for (int it = 0; it + 1 < ntiles; ++it) {
      publish_to_wgmma<0>();  // V(it) and K(it+1); and every warpgroup is done with
                              // S(it) and P V(it-1): K buffer it&1, V buffer (it+1)&1
                              // and slot ring entry it % 3 are free
      load_kv(sV + ((it + 1) & 1) * C::KV_BYTES, p.v_cache, (it + 1) % 3);
      if (it + 2 < ntiles) load_kv(sK + (it & 1) * C::KV_BYTES, p.k_cache, (it + 2) % 3);
      mma::cp_async_commit();
      const bool do_lookup = tid < kBN && it + 3 < ntiles;
      const int next_slot = do_lookup ? lookup_slot(p, cta, n_top - (it + 3) * kBN + tid) : -1;

      // Two groups in flight: S(it+1), then P V(it). Waiting for the first
      // leaves the second running on the tensor cores under the softmax.
      wgmma::fence();  // P and the rescaled O were written by ordinary instructions
      issue_s(sK + ((it + 1) & 1) * C::KV_BYTES);
      issue_pv(sV + (it & 1) * C::KV_BYTES);
      wgmma::wait<1>();
      wgmma::fence_operand(s);
      const bool rescale = softmax_tile(n_top - (it + 1) * kBN);
      wgmma::wait<0>();  // P V(it): O may be rescaled and P(it) overwritten now
      wgmma::fence_operand(o);
      wgmma::fence_operand(pf);
      if (rescale) rescale_o();
      pack_p();
      if (do_lookup) store_slot(it % 3, tid, next_slot);
    }
    if (ntiles > 0) {  // P V of the last tile
      publish_to_wgmma<0>();
      wgmma::fence();
      issue_pv(sV + ((ntiles - 1) & 1) * C::KV_BYTES);
    }
  }
  wgmma::wait<0>();
  wgmma::fence_operand(o);

  // ---- epilogue --------------------------------------------------------------
  // O / l is staged through the warp's own Q rows (16-byte global stores);
  // every copy into Q must have landed (a CTA without keys never waited).
  mma::cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_run[h] = l;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = warp_row0 + h * 8 + g4;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const uint32_t v = mma::pack2<T>(o[4 * i + 2 * h] * inv, o[4 * i + 2 * h + 1] * inv);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sQ + sw128(r, i, kBM) + t4 * 4), "r"(v) : "memory");
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * CPR / 32; ++i) {
    const int idx = lane + i * 32;
    const int rr = idx / CPR, c = idx - rr * CPR;
    const int r = warp_row0 + rr, row = m0 + r;
    if (row < cta.rows) {
      const int qi = row / G, g = row - qi * G;
      uint4 v;
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(sQ + sw128(r, c, kBM))
                   : "memory");
      T* dst = p.out + (static_cast<int64_t>(cta.q_start + qi) * p.num_q_heads + cta.kvh * G + g) * D + c * 8;
      *reinterpret_cast<uint4*>(dst) = v;
    }
  }
  if (p.lse != nullptr && t4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_row0 + h * 8 + g4;
      if (row < cta.rows) {
        const int qi = row / G, g = row - qi * G;
        const float l = l_run[h];
        const float v = l > 0.f ? (m_run[h] * sl2 + log2f(l)) * kLn2 : -INFINITY;
        p.lse[static_cast<int64_t>(cta.q_start + qi) * p.num_q_heads + cta.kvh * G + g] = v;
      }
    }
  }
#endif  // FASTLLM_SM90A_DEVICE
}

constexpr int kMaxDevices = 64;

template <typename T, int D, bool kPipelined>
const char* launch_typed(const PrefillParams<T>& p, int64_t grid, cudaStream_t stream) {
  auto kernel = prefill_attention_sm90_kernel<T, D, kPipelined>;
  static bool opted_in[kMaxDevices] = {};  // per device and instantiation, outside any capture that follows
  int dev = 0;
  FASTLLM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices || !opted_in[dev]) {
    FASTLLM_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm90Cfg<D>::SMEM));
    if (dev >= 0 && dev < kMaxDevices) opted_in[dev] = true;
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, Sm90Cfg<D>::SMEM, stream>>>(p);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

}  // namespace

bool sm90_usable(int64_t head_dim) {
#ifndef FASTLLM_HAS_SM90A
  (void)head_dim;
  return false;  // not compiled for sm_90a: the kernel bodies are empty
#else
  return (head_dim == 64 || head_dim == 128) && sm90a_loadable<prefill_attention_sm90_kernel<__nv_bfloat16, 128, false>>();
#endif
}

template <typename T>
const char* launch_sm90(const PrefillParams<T>& p, int64_t grid, int head_dim, bool pipelined, cudaStream_t stream) {
  if (!sm90_usable(head_dim)) return "the wgmma kernel needs an sm_90 GPU, a build for 90a and head_dim 64 or 128";
  if (pipelined) {
    return head_dim == 64 ? launch_typed<T, 64, true>(p, grid, stream) : launch_typed<T, 128, true>(p, grid, stream);
  }
  return head_dim == 64 ? launch_typed<T, 64, false>(p, grid, stream) : launch_typed<T, 128, false>(p, grid, stream);
}

template const char* launch_sm90<__half>(const PrefillParams<__half>&, int64_t, int, bool, cudaStream_t);
template const char* launch_sm90<__nv_bfloat16>(const PrefillParams<__nv_bfloat16>&, int64_t, int, bool,
                                                cudaStream_t);

}  // namespace prefill
}  // namespace fastllm
