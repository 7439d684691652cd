/*
 * W8A16 linear: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n] with
 * qweight int8 [N, K] and fp32 per-row scales (fastllm/quant.py), fp16 / bf16
 * activations, fp32 accumulation.
 *
 * Algorithm (M <= 64 per CTA; the Python wrapper dequantizes and calls cuBLAS
 * for larger M): tensor-core GEMV/GEMM with the weights as the mma A operand
 * (see quant_linear.cuh for why the row-major layout works as is).
 * - CTA = 4 warps; BN = 64 (M <= 8) or 128 weight rows, all M tokens, a K range
 *   (all of K unless split-K). cp.async pipeline of K tiles (4 stages of 256
 *   columns for M <= 8, else of 128; 3 stages for M > 32 so that the x tiles
 *   fit twice per SM): the int8 weights and the x rows, in
 *   swizzled shared memory.
 * - Lane (g, t) takes one 16-byte run (16 columns) of rows g and g + 8 per
 *   64-column k-block; each word (4 columns) is one m16n8k16 step, pairs
 *   (0, 1) and (2, 3), so the B fragment is two plain words of x.
 * - The mma runs on the exact integers q: fp16 puts q + 128 in the mantissa of
 *   1024.0 with one byte permute (one subtract gives q); bf16 has too few
 *   mantissa bits, so the bytes go through fp32 (permute into 2^23, subtract,
 *   pack two to bf16). The per-row scale multiplies the fp32 sums once at the end.
 * - K % 16 != 0 or unaligned x / qweight: a scalar kernel (correct, slow).
 * - The copy addresses are computed once per CTA and advanced per tile
 *   (LeanTileCopies): 508 SASS instructions per bf16 M <= 8 tile against 813
 *   for the first version, which recomputed them every tile; 4096 x 14336 at
 *   M = 1 went from 25.0 to 21.3 us on an H200 (bench/RESULTS.md).
 *
 * Memory traffic: each weight byte read once from DRAM (N*K bytes + 4N for the
 * scales); every CTA re-reads its x rows from L2 (M*K*2 bytes per CTA).
 * 4096 x 14336 at M = 1: 58.7 MB, ~20 us at 3 TB/s.
 */
#include "quant_linear.cuh"

namespace fastllm {
namespace {

using namespace qlinear;

template <int TT>
struct Int8Cfg {
  static constexpr int R = TT == 1 ? 1 : 2;        // 16-row tiles per warp
  static constexpr int BK = TT == 1 ? 256 : 128;   // K per pipeline stage
  static constexpr int STAGES = TT == 8 ? 3 : 4;
  static constexpr int WARPS = 4, THREADS = WARPS * 32;  // all warps along N
  static constexpr int BN = 16 * R * WARPS;        // weight rows per CTA
  static constexpr int BM = 8 * TT;                // token rows per CTA
  static constexpr int KBLK = BK / 64;             // 64-column k-blocks per stage
  static constexpr int W_ROW = BK;                 // bytes of a weight row per stage
  static constexpr int X_ROW = BK * 2;             // bytes of an x row per stage
  static constexpr int W_STAGE = BN * W_ROW;
  static constexpr int X_STAGE = BM * X_ROW;
  static constexpr int SMEM = STAGES * (W_STAGE + X_STAGE);
};

struct Int8Params {
  void* out;
  float* ws;  // split-K partials [splits, M, N], or null when splits == 1
  const void* x;
  const int8_t* qweight;
  const float* scales;
  const void* bias;
  int M, N, K, splits;
};

// x tile: lane (g, t) reads chunk 2t + hh (+ 8j) of row g: within a row the four
// t already hit distinct bank groups; flipping chunk bit 0 on odd rows puts
// rows g and g+1 (same quarter-warp phase) on the other four.
__device__ __forceinline__ int x_chunk(int row, int c) { return c ^ (row & 1); }

// Word of 4 int8 -> two A registers: (q0, q1) and (q2, q3) as exact 16-bit values.
template <typename T>
struct Int8Pairs;

template <>
struct Int8Pairs<__half> {
  __device__ static __forceinline__ void get(uint32_t q, uint32_t& p01, uint32_t& p23) {
    const uint32_t u = q ^ 0x80808080u;                    // q + 128 in [0, 255]
    constexpr uint32_t kBias = 0x64806480u;                // 1152.0 = 1024 + 128 in both halves
    p01 = Pair<__half>::sub(__byte_perm(u, 0x64646464u, 0x4140), kBias);
    p23 = Pair<__half>::sub(__byte_perm(u, 0x64646464u, 0x4342), kBias);
  }
};

template <>
struct Int8Pairs<__nv_bfloat16> {
  __device__ static __forceinline__ void get(uint32_t q, uint32_t& p01, uint32_t& p23) {
    const uint32_t u = q ^ 0x80808080u;
    constexpr float kBias = 8388736.f;  // 2^23 + 128
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)) - kBias;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)) - kBias;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)) - kBias;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)) - kBias;
    __nv_bfloat162 a = __floats2bfloat162_rn(f0, f1), b = __floats2bfloat162_rn(f2, f3);
    p01 = *reinterpret_cast<uint32_t*>(&a);
    p23 = *reinterpret_cast<uint32_t*>(&b);
  }
};

template <typename T, int TT>
__global__ void __launch_bounds__(Int8Cfg<TT>::THREADS) int8_mma_kernel(const Int8Params p) {
  using C = Int8Cfg<TT>;
  constexpr int R = C::R, KBLK = C::KBLK, STAGES = C::STAGES;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const sw = smem;
  uint8_t* const sx = smem + STAGES * C::W_STAGE;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
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

  // The copies' addresses are computed once here and advanced by a tile per
  // call (recomputing them every K tile took ~360 of 813 instructions per tile).
  LeanTileCopies<C, 16> lean;
  lean.init(reinterpret_cast<const uint8_t*>(p.qweight), x, sw, sx, tid, n0, p.N, m0, mrows, p.K, kt0,
            [](int r, int c) { return x_chunk(r, c); });
  auto load_tile = [&](int slot, int kt) { lean.issue(slot, kt, p.K); };

  float acc[R][TT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][tt][e] = 0.f;

  auto compute = [&](int slot) {
    const uint8_t* const tw = sw + slot * C::W_STAGE;
    const uint8_t* const tx = sx + slot * C::X_STAGE;
#pragma unroll
    for (int j = 0; j < KBLK; ++j) {
      uint4 wq[R][2];  // columns 64j + 16t .. +16 of rows g, g + 8
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * R * 16 + r * 16 + h * 8 + g;
          wq[r][h] = lds128(tw + row * C::W_ROW + w_chunk<C::W_ROW>(row, 4 * j + t) * 16);
        }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        uint4 xv[TT];  // columns 64j + 16t + 8hh .. +8 of token row g
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
          const int row = tt * 8 + g;
          xv[tt] = lds128(tx + row * C::X_ROW + x_chunk(row, 8 * j + 2 * t + hh) * 16);
        }
#pragma unroll
        for (int ww = 0; ww < 2; ++ww) {
          const int w = 2 * hh + ww;  // weight word: columns 4w .. 4w + 3 of the lane's 16
#pragma unroll
          for (int r = 0; r < R; ++r) {
            uint32_t a[2][2];
#pragma unroll
            for (int h = 0; h < 2; ++h) Int8Pairs<T>::get(word_of(wq[r][h], w), a[h][0], a[h][1]);
#pragma unroll
            for (int tt = 0; tt < TT; ++tt)
              mma16816<T>(acc[r][tt], a[0][0], a[1][0], a[0][1], a[1][1], word_of(xv[tt], 2 * ww),
                          word_of(xv[tt], 2 * ww + 1));
          }
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (kt0 + s < kt1) load_tile(s, kt0 + s);
    cp_async_commit();
  }
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt landed for everyone; the slot refilled below was consumed last iteration
    const int next = kt + STAGES - 1;
    if (next < kt1) load_tile((next - kt0) % STAGES, next);
    cp_async_commit();
    compute((kt - kt0) % STAGES);
  }
  cp_async_wait<0>();

  // Epilogue: c0, c1 = (row g, tokens 2t, 2t+1); c2, c3 = row g + 8.
  T* const out = static_cast<T*>(p.out);
  const T* const bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + warp * R * 16 + r * 16 + h * 8 + g;
      if (n >= p.N) continue;
      const float s = __ldg(p.scales + n);
      const float b = bias != nullptr && p.ws == nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
      for (int tt = 0; tt < TT; ++tt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m0 + tt * 8 + 2 * t + e;
          if (m >= p.M) continue;
          const float v = acc[r][tt][2 * h + e] * s;
          if (p.ws != nullptr) {
            p.ws[(static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N + n] = v;
          } else {
            out[static_cast<int64_t>(m) * p.N + n] = from_float<T>(v + b);
          }
        }
    }
}

// Any K, any alignment: one warp per output row and up to 8 tokens, scalar loads.
template <typename T>
__global__ void __launch_bounds__(256) int8_generic_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                          const int8_t* __restrict__ qweight,
                                                          const float* __restrict__ scales, const T* __restrict__ bias,
                                                          int M, int N, int K) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * 8 + warp;
  const int m0 = blockIdx.y * 8;
  if (n >= N) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int8_t* row = qweight + static_cast<int64_t>(n) * K;
  for (int k = lane; k < K; k += 32) {
    const float w = static_cast<float>(row[k]);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (m0 + j < M) acc[j] += w * to_float(x[static_cast<int64_t>(m0 + j) * K + k]);
  }
  const float s = scales[n];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float v = warp_reduce_sum(acc[j]) * s;
    if (lane == 0 && m0 + j < M)
      out[static_cast<int64_t>(m0 + j) * N + n] = from_float<T>(bias != nullptr ? v + to_float(bias[n]) : v);
  }
}

// w[n, k] = q * scale rounded to T (exactly torch's q.float() * s, then cast).
// VEC: 16 columns per item (one 16-byte load, two 16-byte stores); else one.
template <typename T, bool VEC>
__global__ void int8_dequant_kernel(T* __restrict__ out, const int8_t* __restrict__ qweight,
                                    const float* __restrict__ scales, int64_t N, int64_t K) {
  const int64_t per = VEC ? 16 : 1;
  const int64_t items = N * K / per;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * per;
    const float s = scales[e / K];
    if constexpr (VEC) {
      const uint4 v = *reinterpret_cast<const uint4*>(qweight + e);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        Vec<T, 8> o;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const uint32_t word = word_of(v, half * 2 + c / 4);
          const int8_t q = static_cast<int8_t>((word >> (8 * (c % 4))) & 0xFF);
          o.v[c] = from_float<T>(static_cast<float>(q) * s);
        }
        o.store(out + e + half * 8);
      }
    } else {
      out[e] = from_float<T>(static_cast<float>(qweight[e]) * s);
    }
  }
}

int k_tile_of(int64_t m) { return token_tiles(m) == 1 ? Int8Cfg<1>::BK : Int8Cfg<2>::BK; }
int rows_of(int64_t m) { return token_tiles(m) == 1 ? Int8Cfg<1>::BN : Int8Cfg<2>::BN; }
int smem_of(int64_t m) {
  const int tiles = token_tiles(m);
  return tiles == 1 ? Int8Cfg<1>::SMEM : tiles == 2 ? Int8Cfg<2>::SMEM : tiles == 4 ? Int8Cfg<4>::SMEM : Int8Cfg<8>::SMEM;
}

const char* check_shapes(int64_t m, int64_t n, int64_t k) {
  if (m < 0 || m > static_cast<int64_t>(kMaxTokensPerCta) * 65535) return "M (tokens) out of range";
  if (n <= 0 || n > (1LL << 30)) return "N (out_features) out of range";
  if (k <= 0 || k > (1LL << 30)) return "K (in_features) out of range";
  return nullptr;
}

// Opts every instance for T in at its first launch, so that one first used
// inside CUDA-graph capture makes no cudaFuncSetAttribute call there.
template <typename T>
const char* opt_in_all() {
  const char* err = nullptr;
  if (!err) err = opt_in_smem<int8_mma_kernel<T, 1>>(Int8Cfg<1>::SMEM);
  if (!err) err = opt_in_smem<int8_mma_kernel<T, 2>>(Int8Cfg<2>::SMEM);
  if (!err) err = opt_in_smem<int8_mma_kernel<T, 4>>(Int8Cfg<4>::SMEM);
  if (!err) err = opt_in_smem<int8_mma_kernel<T, 8>>(Int8Cfg<8>::SMEM);
  return err;
}

template <typename T, int TT>
const char* run_mma(const Int8Params& p, cudaStream_t stream) {
  using Cfg = Int8Cfg<TT>;
  if (const char* err = opt_in_all<T>()) return err;
  const unsigned token_blocks = static_cast<unsigned>(ceil_div(p.M, kMaxTokensPerCta));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::BN)), static_cast<unsigned>(p.splits), token_blocks);
  int8_mma_kernel<T, TT><<<grid, Cfg::THREADS, Cfg::SMEM, stream>>>(p);
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* run_tiles(const Int8Params& p, cudaStream_t stream) {
  switch (token_tiles(p.M)) {
    case 1: return run_mma<T, 1>(p, stream);
    case 2: return run_mma<T, 2>(p, stream);
    case 4: return run_mma<T, 4>(p, stream);
    default: return run_mma<T, 8>(p, stream);
  }
}

template <typename T>
const char* launch_typed(const Int8Params& p, cudaStream_t stream) {
  if (const char* err = run_tiles<T>(p, stream)) return err;
  if (p.splits > 1)
    return launch_splitk_reduce<T>(static_cast<T*>(p.out), p.ws, static_cast<const T*>(p.bias), p.M, p.N, p.splits,
                                   stream);
  return nullptr;
}

template <typename T>
const char* launch_generic(void* out, const void* x, const void* qweight, const void* scales, const void* bias,
                           int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(n, 8)), static_cast<unsigned>(ceil_div<int64_t>(m, 8)));
  int8_generic_kernel<T><<<grid, 256, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(x),
                                                   static_cast<const int8_t*>(qweight),
                                                   static_cast<const float*>(scales), static_cast<const T*>(bias),
                                                   static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

template <typename T>
const char* launch_dequant(void* out, const void* qweight, const void* scales, int64_t n, int64_t k,
                           cudaStream_t stream) {
  const bool vec = k % 16 == 0 && aligned16(out) && aligned16(qweight);
  const int64_t items = vec ? n * k / 16 : n * k;
  const int threads = 256;
  const int64_t want = ceil_div<int64_t>(items, threads);
  const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  auto* o = static_cast<T*>(out);
  auto* q = static_cast<const int8_t*>(qweight);
  auto* s = static_cast<const float*>(scales);
  if (vec) {
    int8_dequant_kernel<T, true><<<blocks, threads, 0, stream>>>(o, q, s, n, k);
  } else {
    int8_dequant_kernel<T, false><<<blocks, threads, 0, stream>>>(o, q, s, n, k);
  }
  FASTLLM_CHECK_LAUNCH();
  return nullptr;
}

}  // namespace

const char* int8_linear_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t m, int64_t n, int64_t k,
                             int64_t num_sms, int64_t requested_splits) {
  *num_splits = 1;
  *workspace_floats = 0;
  if (const char* err = check_shapes(m, n, k)) return err;
  if (requested_splits < 0 || requested_splits > kMaxSplits) return "num_splits must be in [1, 16] (0 = automatic)";
  if (m == 0) return nullptr;
  const int64_t ctas = ceil_div<int64_t>(n, rows_of(m)) * ceil_div<int64_t>(m, kMaxTokensPerCta);
  *num_splits = choose_splits(ctas, ceil_div<int64_t>(k, k_tile_of(m)), num_sms, requested_splits, m,
                              ctas_per_sm(smem_of(m)));
  *workspace_floats = *num_splits > 1 ? *num_splits * m * n : 0;
  return nullptr;
}

const char* launch_int8_linear(void* out, void* workspace, const void* x, const void* qweight, const void* scales,
                               const void* bias, int64_t m, int64_t n, int64_t k, int64_t num_splits, int dtype,
                               void* stream) {
  if (const char* err = check_shapes(m, n, k)) return err;
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "activations must be float16 or bfloat16";
  if (m == 0) return nullptr;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool half = dtype == static_cast<int>(DType::kFloat16);
  if (k % 16 != 0 || !aligned16(x) || !aligned16(qweight)) {
    if (ceil_div<int64_t>(m, 8) > 65535) return "too many tokens for the unaligned path";
    return half ? launch_generic<__half>(out, x, qweight, scales, bias, m, n, k, st)
                : launch_generic<__nv_bfloat16>(out, x, qweight, scales, bias, m, n, k, st);
  }
  const int64_t k_tiles = ceil_div<int64_t>(k, k_tile_of(m));
  if (num_splits < 1 || num_splits > kMaxSplits || num_splits > k_tiles)
    return "num_splits must be in [1, min(16, K tiles)] (use int8_linear_plan)";
  if (num_splits > 1 && (workspace == nullptr || !aligned16(workspace)))
    return "num_splits > 1 needs a 16-byte aligned fp32 workspace of num_splits * M * N floats";
  const Int8Params p{out,
                     static_cast<float*>(num_splits > 1 ? workspace : nullptr),
                     x,
                     static_cast<const int8_t*>(qweight),
                     static_cast<const float*>(scales),
                     bias,
                     static_cast<int>(m),
                     static_cast<int>(n),
                     static_cast<int>(k),
                     static_cast<int>(num_splits)};
  return half ? launch_typed<__half>(p, st) : launch_typed<__nv_bfloat16>(p, st);
}

const char* launch_int8_dequantize(void* out, const void* qweight, const void* scales, int64_t n, int64_t k, int dtype,
                                   void* stream) {
  if (const char* err = check_shapes(0, n, k)) return err;
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16))
    return "dtype must be float16 or bfloat16";
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == static_cast<int>(DType::kFloat16) ? launch_dequant<__half>(out, qweight, scales, n, k, st)
                                                    : launch_dequant<__nv_bfloat16>(out, qweight, scales, n, k, st);
}

}  // namespace fastllm
