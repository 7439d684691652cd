/*
 * Device helpers for tensor-core kernels on sm_80+: cp.async (16-byte, zero
 * fill), ldmatrix (.x4, plain and .trans), mma.sync m16n8k16 with fp32
 * accumulators for fp16/bf16, packing fp32 pairs to 16-bit, ex2.approx, and
 * the XOR swizzle used for shared-memory tiles of 16-bit rows.
 *
 * Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
 * g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group); every 32-bit
 * register holds two consecutive 16-bit elements, the lower column in the
 * lower half:
 *   A 16x16 (row-major): a0 = (row g,   cols 2t, 2t+1)   a1 = (row g+8, cols 2t, 2t+1)
 *                        a2 = (row g,   cols 2t+8, +9)   a3 = (row g+8, cols 2t+8, +9)
 *   B 16x8  (k x n):     b0 = (k 2t, 2t+1;   col n = g)  b1 = (k 2t+8, 2t+9; col n = g)
 *   C 16x8  (fp32):      c0, c1 = (row g, cols 2t, 2t+1) c2, c3 = (row g+8, cols 2t, 2t+1)
 * ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes
 * each); register ri of lane L receives matrix i's (row L/4, cols 2(L%4),
 * 2(L%4)+1), or with .trans the transpose: (rows 2(L%4), 2(L%4)+1, col L/4).
 * So a row-major [rows][k] tile gives A fragments and B fragments of its
 * transpose (K of Q K^T) with plain ldmatrix, and a row-major [k][n] tile (V of
 * P V) gives B fragments with .trans.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastllm {
namespace mma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1. fill == false writes 16 zero bytes
// and reads nothing (gmem must still be a valid-looking address).
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool fill) {
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values as one 32-bit register of 16-bit elements, lo in the low half
// (the lower column of a fragment), round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^x in one MUFU instruction (relative error ~2^-22; 2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile whose rows are
// row_bytes long (a multiple of 128): the chunk index is XORed with row % 8, so
// the 8 rows an ldmatrix matrix (or 8 lanes of a cp.async phase) touch at one
// logical chunk fall in 8 different 16-byte bank groups: no bank conflicts.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk, int row_bytes) {
  return static_cast<uint32_t>(row * row_bytes + ((chunk ^ (row & 7)) << 4));
}

}  // namespace mma
}  // namespace fastllm
