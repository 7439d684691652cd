// Host-side declarations of every kernel launcher: plain C++ types only, so
// that bindings.cpp compiles with the host compiler and no CUDA headers.
// Each launcher returns nullptr on success or a static error string.
#pragma once
#include <cstdint>

namespace fastllm {

// Element types the kernels accept; the values are shared with fastllm/ops/cuda.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = rmsnorm(x) * w over rows of length `cols`. With `residual` non-null:
// h = x + residual (rounded to the dtype) is written to `residual_out` and y is
// the rmsnorm of h. `stream` is a cudaStream_t.
const char* launch_rmsnorm(void* out, void* residual_out, const void* x, const void* residual,
                           const void* weight, int64_t rows, int64_t cols, float eps, int dtype,
                           void* stream);

// out [rows, d] = silu(x[:, :d]) * x[:, d:] for x [rows, 2d], both contiguous.
const char* launch_silu_and_mul(void* out, const void* x, int64_t rows, int64_t d, int dtype, void* stream);

// In-place NeoX rotary embedding of q [tokens, Hq, D] and k [tokens, Hk, D]
// (element strides given; last dim contiguous) from an fp32 cos/sin table
// [max_pos, D] at int64 positions [tokens].
const char* launch_rotary_embedding(void* q, void* k, const void* positions, const void* cos_sin_cache,
                                    int64_t num_tokens, int64_t q_token_stride, int64_t q_head_stride,
                                    int64_t k_token_stride, int64_t k_head_stride, int64_t num_q_heads,
                                    int64_t num_k_heads, int64_t head_dim, int64_t max_pos, int dtype, void* stream);

// Paged KV cache write: k_cache[slot[n]] = k[n], v_cache[slot[n]] = v[n] for
// k, v [tokens, heads, head_dim] (element strides given, last dim contiguous)
// and caches [num_blocks, block_size, heads, head_dim] contiguous holding
// num_slots = num_blocks * block_size slots; int64 slot_mapping [tokens].
// Slots outside [0, num_slots) are skipped.
const char* launch_reshape_and_cache(void* k_cache, void* v_cache, const void* k, const void* v,
                                     const void* slot_mapping, int64_t num_tokens, int64_t num_heads,
                                     int64_t head_dim, int64_t k_token_stride, int64_t k_head_stride,
                                     int64_t v_token_stride, int64_t v_head_stride, int64_t num_slots, int dtype,
                                     void* stream);

// Grid plan of launch_decode_attention: the number of key splits (requested_splits,
// or chosen for the device and variant (0 or 1) when 0) and the fp32 workspace it
// needs, batch * num_q_heads * num_splits * (head_dim + 2) floats when num_splits > 1,
// else 0. max_seq_len: a host-side upper bound on seq_lens (only sizes the grid).
const char* decode_attention_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t batch,
                                  int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_seq_len,
                                  int64_t sliding_window, int64_t requested_splits, int64_t variant, int dtype);

// Decode attention over a paged KV cache, one query token per sequence:
// out [batch, Hq, D] = softmax(q k^T * scale) v over keys [max(0, L - window), L)
// with L = seq_lens[b] (int32, device) and the cache slots given by int32
// block_tables [batch, max_blocks] (device). q: [batch, Hq, D] with the given
// element strides; caches [num_blocks, block_size, Hk, D] contiguous; fp16/bf16;
// D in {64, 80, 96, 128, 256}; block_size a power of two; sliding_window 0 = none.
// workspace: decode_attention_plan's fp32 floats (may be null when num_splits == 1).
// variant: 0 (default) the tensor-core split kernel for head dims 64, 128, 256
// (the CUDA-core one for 80, 96 and caches of 2^31 slots or more); 1 the
// CUDA-core split kernel for every head dim. The plan must be made for the same
// variant.
const char* launch_decode_attention(void* out, void* workspace, const void* q, const void* k_cache,
                                    const void* v_cache, const void* block_tables, const void* seq_lens,
                                    int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t q_token_stride, int64_t q_head_stride, int64_t num_blocks,
                                    int64_t block_size, int64_t max_blocks, float scale, int64_t sliding_window,
                                    int64_t num_splits, int64_t variant, int dtype, void* stream);

// One token per row of logits [rows, vocab] (dtype code) into out (int64 [rows]):
// softmax(logits / temperature) filtered by top-k (int32), top-p and min-p (fp32,
// per row), drawn with Philox(seed, offset) (int64 per row); temperature 0 is the
// argmax. Rows with NaN / all -inf logits / bad parameters get -1 / -2 / -3.
// force_group: 0 = choose, else the blocks per row (1, 2, 4, 8, 16; >1 needs
// sm_90); cache_limit: < 0 = default, else at most this many q values cached
// in shared memory per block (tests use both to reach every path). variant:
// 0 = the verified kernel, 1 = the same algorithm rescheduled (sample_v1.cuh;
// bit-identical tokens).
const char* launch_sample(void* out, const void* logits, const void* temperature, const void* top_k,
                          const void* top_p, const void* min_p, const void* seeds, const void* offsets, int64_t rows,
                          int64_t vocab, int dtype, int force_group, int64_t cache_limit, int variant, void* stream);

// Greedy decoding: out[b] (int64) = argmax of logits[b] (rows x vocab, dtype
// code), the lowest id on ties; -1 for a row with NaN, -2 for a row whose
// logits are all -inf (sample's status codes; no parameters are read).
// force_group: 0 = choose, else the blocks per row (1, 2, 4, 8; >1 needs sm_90).
const char* launch_sample_argmax(void* out, const void* logits, int64_t rows, int64_t vocab, int dtype,
                                 int force_group, void* stream);

// Prefill attention over a paged KV cache (any number of queries per sequence):
// for sequence b, queries q[cu_seqlens_q[b] .. cu_seqlens_q[b+1]) (int32 [batch+1],
// device) sit at positions L - query_len + i (L = seq_lens[b], int32 [batch],
// device) and attend causally (and within sliding_window when > 0) to the
// cached keys, slots from int32 block_tables [batch, max_blocks] (device):
// out [num_tokens, Hq, D] (contiguous) = softmax(q k^T * scale) v, fp32 inside;
// lse (fp32 [num_tokens, Hq], may be null) = natural-log sum of exp of the
// scaled scores (-inf, and out 0, for a query without keys). q: [num_tokens,
// Hq, D] with the given element strides (multiples of 8); caches
// [num_blocks, block_size, Hk, D] contiguous; fp16/bf16; D in {64, 80, 96,
// 128, 256}; block_size a power of two; scale > 0. max_query_len: a host-side
// bound on the query lengths (sizes the grid; longer queries are not computed).
// impl: 0 = the mma.sync kernel (sm_80+), 1 = the wgmma kernel (sm_90a build on
// an sm_90 device, D in {64, 128}; see prefill_attention_sm90_usable), 2 = the
// same with P V overlapped with the next tile's softmax.
const char* launch_prefill_attention(void* out, void* lse, const void* q, const void* k_cache, const void* v_cache,
                                     const void* cu_seqlens_q, const void* seq_lens, const void* block_tables,
                                     int64_t num_tokens, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                     int64_t head_dim, int64_t q_token_stride, int64_t q_head_stride,
                                     int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                     int64_t max_query_len, float scale, int64_t sliding_window, int dtype,
                                     int impl, void* stream);
// Whether impl 1 can run for this head dim on the current device.
bool prefill_attention_sm90_usable(int64_t head_dim);

// Weight-only quantized linears (formats: fastllm/quant.py), x [M, K] and out
// [M, N] contiguous in dtype (fp16/bf16 only), bias [N] in dtype or null.
// *_plan: host-only, no CUDA calls: the split-K factor for M tokens on a GPU
// with num_sms SMs (requested_splits 0 = automatic, else clamped to the K
// tiles) and the fp32 workspace it needs (num_splits * M * N when > 1, else 0).
// launch_*: num_splits from the plan; workspace may be null when it is 1.
// x or qweight not 16-byte aligned (or int8 K % 16 != 0) takes a slow scalar
// path that ignores num_splits. *_dequantize: w [N, K] in dtype, rounded like
// torch's dequantize-then-cast.
// int8: qweight int8 [N, K], scales fp32 [N]; y = x (q * scale)^T + bias; any K >= 1.
const char* int8_linear_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t m, int64_t n, int64_t k,
                             int64_t num_sms, int64_t requested_splits);
const char* launch_int8_linear(void* out, void* workspace, const void* x, const void* qweight, const void* scales,
                               const void* bias, int64_t m, int64_t n, int64_t k, int64_t num_splits, int dtype,
                               void* stream);
const char* launch_int8_dequantize(void* out, const void* qweight, const void* scales, int64_t n, int64_t k, int dtype,
                                   void* stream);
// int4: qweight uint8 [N, K/2] (low nibble = even column), scales [N, K/g] in
// dtype, zeros uint8 [N, K/g] in [0, 15], g in {32, 64, 128}, K % g == 0;
// w = (q - zero) * scale per group of g columns.
// variant: 0 the default kernels; 2 the wgmma kernel at M 9..64 on an sm_90a
// build and device (int4_linear_sm90.cu; elsewhere exactly variant 0); 3 and 4
// the wide tiles at M <= 16 (variant 0 at M > 16); there is no variant 1. The
// plan must be made for the same variant.
const char* int4_linear_plan(int64_t* num_splits, int64_t* workspace_floats, int64_t m, int64_t n, int64_t k,
                             int64_t group, int64_t num_sms, int64_t requested_splits, int64_t variant);
const char* launch_int4_linear(void* out, void* workspace, const void* x, const void* qweight, const void* scales,
                               const void* zeros, const void* bias, int64_t m, int64_t n, int64_t k, int64_t group,
                               int64_t num_splits, int64_t variant, int dtype, void* stream);
const char* launch_int4_dequantize(void* out, const void* qweight, const void* scales, const void* zeros, int64_t n,
                                   int64_t k, int64_t group, int dtype, void* stream);

}  // namespace fastllm
