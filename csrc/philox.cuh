/*
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
 * SC'11): a counter-based generator. Four 32-bit words of output are a pure
 * function of a 128-bit counter and a 64-bit key, so a draw needs no state in
 * memory: sampling uses key = seed, counter = (offset, stream id) and gets the
 * same numbers for a row whatever else shares its batch.
 *
 * Host and device: the host build lets a CPU program check the known-answer
 * vectors of the Random123 distribution.
 */
#pragma once

#include <cstdint>

namespace fastllm {

struct Philox4x32 {
  uint32_t v[4];
};

__host__ __device__ __forceinline__ void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Ten rounds of Philox4x32 on counter (c0..c3) with key (k0, k1).
__host__ __device__ __forceinline__ Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                            uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// 64 uniform random bits determined by (seed, offset) only; `stream` separates
// independent uses of the same pair.
__host__ __device__ __forceinline__ uint64_t philox_u64(uint64_t seed, uint64_t offset, uint32_t stream) {
  const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), stream, 0u,
                                     static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
}

}  // namespace fastllm
