/*
 * What the two prefill attention kernels share: the parameter block the host
 * launcher fills once (prefill_attention.cu) and the Hopper kernel's entry
 * points (prefill_attention_sm90.cu). See prefill_attention.cu for the
 * semantics of every field.
 */
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastllm {
namespace prefill {

template <typename T>
struct PrefillParams {
  T* out;                       // [N, Hq, D] contiguous
  float* lse;                   // [N, Hq] fp32, or null
  const T* q;                   // [N, Hq, D], strides q_token_stride, q_head_stride
  const T* k_cache;             // [num_blocks, block_size, Hk, D] contiguous
  const T* v_cache;
  const int32_t* cu_seqlens_q;  // [B + 1]
  const int32_t* seq_lens;      // [B]
  const int32_t* block_tables;  // [B, max_blocks]
  int64_t q_token_stride, q_head_stride;
  int kv_slot_stride;  // Hk * D
  int num_tokens, batch, num_q_heads, num_kv_heads, group;
  int num_blocks, max_blocks, log2_block, max_len, window, num_m_blocks;
  float scale_log2;  // scale * log2(e)
};

// What one CTA (m block of rows, sequence, KV head) works on; rows are
// (query, query head of the group) pairs, row = i * G + g.
struct Cta {
  int kvh, b, G;
  int q_start, rows, m0, last_row;  // rows of the sequence, this CTA's first and last
  int kv_len, ctx;                  // keys with a table entry; position of query 0
  int p_min, p_max;                 // positions of the CTA's first and last rows
  int j_lo, j_hi;                   // keys some row attends: [j_lo, j_hi)
  int ntiles, n_top;                // key tiles, the first (highest) tile's first key
  int win_edge;                     // tiles starting at or below it need the window mask
  const int32_t* table;             // the sequence's block table
};

// Fills c for this block (m blocks descending: the longest key ranges start
// first); false when the CTA has no rows (uniform over the CTA). Lengths are
// read on the device and clamped so that bad metadata never faults.
template <typename T>
__device__ __forceinline__ bool plan_cta(const PrefillParams<T>& p, int bm, int bn, Cta& c) {
  int bid = blockIdx.x;
  c.kvh = bid % p.num_kv_heads;
  bid /= p.num_kv_heads;
  c.b = bid % p.batch;
  const int mb = p.num_m_blocks - 1 - bid / p.batch;
  c.G = p.group;
  int q_start = __ldg(p.cu_seqlens_q + c.b), q_end = __ldg(p.cu_seqlens_q + c.b + 1);
  q_start = min(max(q_start, 0), p.num_tokens);
  q_end = min(max(q_end, q_start), p.num_tokens);
  c.q_start = q_start;
  const int q_len = q_end - q_start;
  c.rows = q_len * c.G;  // host checks num_tokens * G < 2^31
  c.m0 = mb * bm;
  if (c.m0 >= c.rows) return false;

  const int seq_len = max(__ldg(p.seq_lens + c.b), 0);
  c.kv_len = min(seq_len, p.max_len);
  c.ctx = seq_len - q_len;  // < 0: bad metadata, those queries have no keys
  c.last_row = min(c.m0 + bm, c.rows) - 1;
  c.p_min = c.ctx + c.m0 / c.G;
  c.p_max = c.ctx + c.last_row / c.G;
  const int window = p.window;
  c.j_hi = min(c.p_max + 1, c.kv_len);
  c.j_lo = window > 0 ? static_cast<int>(max(static_cast<long long>(c.p_min) - window + 1, 0LL)) : 0;
  const int n_lo = c.j_lo / bn;
  c.ntiles = c.j_hi > c.j_lo ? (c.j_hi + bn - 1) / bn - n_lo : 0;
  c.n_top = (n_lo + c.ntiles - 1) * bn;
  // A tile starting at n0 needs the per-element mask iff some key of it is
  // above some row's position (or past kv_len), or at/below some row's window edge.
  c.win_edge = window > 0 ? static_cast<int>(max(static_cast<long long>(c.p_max) - window, -1LL)) : -1;
  c.table = p.block_tables + static_cast<int64_t>(c.b) * p.max_blocks;
  return true;
}

// Cache slot of key j, or -1 for a key outside [j_lo, j_hi) or with a bad
// block id: those are zero-filled, never read.
template <typename T>
__device__ __forceinline__ int lookup_slot(const PrefillParams<T>& p, const Cta& c, int j) {
  int slot = -1;
  if (static_cast<unsigned>(j - c.j_lo) < static_cast<unsigned>(c.j_hi - c.j_lo)) {
    const unsigned blk = static_cast<unsigned>(__ldg(c.table + (j >> p.log2_block)));
    if (blk < static_cast<unsigned>(p.num_blocks))  // never fault on a bad id
      slot = static_cast<int>((blk << p.log2_block) | static_cast<unsigned>(j & ((1 << p.log2_block) - 1)));
  }
  return slot;
}

// Position of row `row` for the masks: clamped to [-1, kv_len - 1] (negative:
// no keys; -1 keeps pos - window from overflowing); padding rows copy the last.
__device__ __forceinline__ int row_position(const Cta& c, int row) {
  return min(max(c.ctx + min(row, c.last_row) / c.G, -1), c.kv_len - 1);
}

// Whether key j is masked for a row at position pos.
__device__ __forceinline__ bool masked(int j, int pos, int window) {
  return j > pos || (window > 0 && j <= pos - window);
}

// Rows (query x query head of a group) per CTA of both kernels for D <= 128:
// the launcher sizes one grid for either.
constexpr int kRowsPerCta = 128;

// The wgmma kernel (sm_90a) for head dims 64 and 128: whether it can run on the
// current device (compiled for sm_90a and the device is sm_90), and its launch
// (pipelined: the schedule that overlaps a tile's P V with the next softmax).
bool sm90_usable(int64_t head_dim);
template <typename T>
const char* launch_sm90(const PrefillParams<T>& p, int64_t grid, int head_dim, bool pipelined, cudaStream_t stream);

}  // namespace prefill
}  // namespace fastllm
