// The only Python module of the extension: one m.def per kernel launcher.
// Pointers and streams arrive as integers (tensor.data_ptr(), stream.cuda_stream)
// so the extension needs neither libtorch nor CUDA headers here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(const char* op, const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string(op) + ": " + err);
}

std::vector<std::string> split_archs(const std::string& csv) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : csv) {
    if (c == ',') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm CUDA kernels (raw device pointers, sizes and a CUDA stream)";

  // One name per line: each kernel family adds its own.
  m.def(
      "kernels",
      [] {
        return std::vector<std::string>{
            "rmsnorm",
            "silu_and_mul",
            "rotary_embedding",
            "reshape_and_cache",
            "decode_attention",
            "sample",
            "sample_v1",      // sample's variant 1 (the same draws, rescheduled) by default when enabled
            "sample_argmax",  // greedy rows: sampling.sample_next routes all-greedy steps here when enabled
            "prefill_attention",
            "prefill_attention_sm90",            // the wgmma variants prefill_attention picks when
            "prefill_attention_sm90_pipelined",  // enabled (the pipelined one first)
            "int8_linear",
            "int4_linear",
            "int4_linear_wgmma",  // int4_linear's wgmma path at M 9..64 (variant 2)
            "int4_linear_wide",   // int4_linear's wide tiles at M <= 16 (variants 3 and 4; experimental)
        };
      },
      "Names of the kernels compiled in.");
  m.def("cuda_archs", [] { return split_archs(FASTLLM_CUDA_ARCHS); }, "CUDA architectures the kernels were built for.");

  m.def(
      "rmsnorm",
      [](std::uintptr_t out, std::uintptr_t residual_out, std::uintptr_t x, std::uintptr_t residual,
         std::uintptr_t weight, std::int64_t rows, std::int64_t cols, float eps, int dtype, std::uintptr_t stream) {
        check("rmsnorm", fastllm::launch_rmsnorm(ptr(out), ptr(residual_out), ptr(x), ptr(residual), ptr(weight),
                                                 rows, cols, eps, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("residual_out"), py::arg("x"), py::arg("residual"), py::arg("weight"),
      py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      "y = x * rsqrt(mean(x^2) + eps) * weight per row (fp32 math). With residual != 0: h = x + residual is "
      "written to residual_out and normalised instead. dtype: 0 fp32, 1 fp16, 2 bf16. Pointers are device "
      "addresses; stream is a cudaStream_t.");

  m.def(
      "silu_and_mul",
      [](std::uintptr_t out, std::uintptr_t x, std::int64_t rows, std::int64_t d, int dtype, std::uintptr_t stream) {
        check("silu_and_mul", fastllm::launch_silu_and_mul(ptr(out), ptr(x), rows, d, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("x"), py::arg("rows"), py::arg("d"), py::arg("dtype"), py::arg("stream"),
      "out[r, i] = silu(x[r, i]) * x[r, d + i] for contiguous x [rows, 2d] and out [rows, d].");

  m.def(
      "rotary_embedding",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t positions, std::uintptr_t cos_sin_cache,
         std::int64_t num_tokens, std::int64_t q_token_stride, std::int64_t q_head_stride,
         std::int64_t k_token_stride, std::int64_t k_head_stride, std::int64_t num_q_heads, std::int64_t num_k_heads,
         std::int64_t head_dim, std::int64_t max_pos, int dtype, std::uintptr_t stream) {
        check("rotary_embedding",
              fastllm::launch_rotary_embedding(ptr(q), ptr(k), ptr(positions), ptr(cos_sin_cache), num_tokens,
                                               q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                                               num_q_heads, num_k_heads, head_dim, max_pos, dtype, ptr(stream)));
      },
      py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("cos_sin_cache"), py::arg("num_tokens"),
      py::arg("q_token_stride"), py::arg("q_head_stride"), py::arg("k_token_stride"), py::arg("k_head_stride"),
      py::arg("num_q_heads"), py::arg("num_k_heads"), py::arg("head_dim"), py::arg("max_pos"), py::arg("dtype"),
      py::arg("stream"),
      "In-place NeoX rotary embedding of q and k (element strides; last dim contiguous) from an fp32 table "
      "[max_pos, head_dim] (cos then sin) at int64 positions.");

  m.def(
      "sample",
      [](std::uintptr_t out, std::uintptr_t logits, std::uintptr_t temperature, std::uintptr_t top_k,
         std::uintptr_t top_p, std::uintptr_t min_p, std::uintptr_t seeds, std::uintptr_t offsets, std::int64_t rows,
         std::int64_t vocab, int dtype, int force_group, std::int64_t cache_limit, std::uintptr_t stream,
         int variant) {
        check("sample", fastllm::launch_sample(ptr(out), ptr(logits), ptr(temperature), ptr(top_k), ptr(top_p),
                                               ptr(min_p), ptr(seeds), ptr(offsets), rows, vocab, dtype, force_group,
                                               cache_limit, variant, ptr(stream)));
      },
      py::arg("out"), py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
      py::arg("min_p"), py::arg("seeds"), py::arg("offsets"), py::arg("rows"), py::arg("vocab"), py::arg("dtype"),
      py::arg("force_group"), py::arg("cache_limit"), py::arg("stream"), py::arg("variant") = 0,
      "out[b] (int64) = one token drawn from softmax(logits[b] / temperature[b]) after top-k (int32), top-p and "
      "min-p (fp32) per row, with Philox(seeds[b], offsets[b]) (int64); temperature 0 = argmax. Rows with NaN, "
      "all -inf logits or out-of-range parameters get -1, -2, -3. force_group: 0 = auto, else blocks per row; "
      "cache_limit: -1 = default, else q values cached in shared memory per block; variant: 0 = the verified "
      "kernel, 1 = the rescheduled one (bit-identical draws).");

  m.def(
      "sample_argmax",
      [](std::uintptr_t out, std::uintptr_t logits, std::int64_t rows, std::int64_t vocab, int dtype,
         int force_group, std::uintptr_t stream) {
        check("sample_argmax",
              fastllm::launch_sample_argmax(ptr(out), ptr(logits), rows, vocab, dtype, force_group, ptr(stream)));
      },
      py::arg("out"), py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("dtype"), py::arg("force_group"),
      py::arg("stream"),
      "out[b] (int64) = argmax of logits[b] (the lowest id on ties), or -1 for a row with NaN, -2 for a row of "
      "-inf only. force_group: 0 = auto, else blocks per row (1, 2, 4, 8; more than 1 needs sm_90).");

  m.def(
      "reshape_and_cache",
      [](std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t k, std::uintptr_t v,
         std::uintptr_t slot_mapping, std::int64_t num_tokens, std::int64_t num_heads, std::int64_t head_dim,
         std::int64_t k_token_stride, std::int64_t k_head_stride, std::int64_t v_token_stride,
         std::int64_t v_head_stride, std::int64_t num_slots, int dtype, std::uintptr_t stream) {
        check("reshape_and_cache",
              fastllm::launch_reshape_and_cache(ptr(k_cache), ptr(v_cache), ptr(k), ptr(v), ptr(slot_mapping),
                                                num_tokens, num_heads, head_dim, k_token_stride, k_head_stride,
                                                v_token_stride, v_head_stride, num_slots, dtype, ptr(stream)));
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slot_mapping"),
      py::arg("num_tokens"), py::arg("num_heads"), py::arg("head_dim"), py::arg("k_token_stride"),
      py::arg("k_head_stride"), py::arg("v_token_stride"), py::arg("v_head_stride"), py::arg("num_slots"),
      py::arg("dtype"), py::arg("stream"),
      "k_cache[slot[n]] = k[n], v_cache[slot[n]] = v[n] for k, v [tokens, heads, head_dim] (element strides, "
      "contiguous last dim), contiguous caches of num_slots slots and int64 slot_mapping; slots outside "
      "[0, num_slots) are skipped. dtype: 0 fp32, 1 fp16, 2 bf16.");

  m.def(
      "decode_attention_plan",
      [](std::int64_t batch, std::int64_t num_q_heads, std::int64_t num_kv_heads, std::int64_t head_dim,
         std::int64_t max_seq_len, std::int64_t sliding_window, std::int64_t requested_splits, int dtype,
         std::int64_t variant) {
        std::int64_t splits = 1, workspace_floats = 0;
        check("decode_attention",
              fastllm::decode_attention_plan(&splits, &workspace_floats, batch, num_q_heads, num_kv_heads, head_dim,
                                             max_seq_len, sliding_window, requested_splits, variant, dtype));
        return std::make_pair(splits, workspace_floats);
      },
      py::arg("batch"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_seq_len"),
      py::arg("sliding_window"), py::arg("requested_splits"), py::arg("dtype"), py::arg("variant") = 0,
      "(num_splits, workspace_floats) for decode_attention on the current device: requested_splits (1..256), or "
      "0 to choose from the batch, heads and max_seq_len (a host-side bound on seq_lens), for kernel variant "
      "0 or 1 (see decode_attention); workspace_floats = batch * num_q_heads * num_splits * (head_dim + 2) fp32 "
      "when num_splits > 1, else 0.");

  m.def(
      "decode_attention",
      [](std::uintptr_t out, std::uintptr_t workspace, std::uintptr_t q, std::uintptr_t k_cache,
         std::uintptr_t v_cache, std::uintptr_t block_tables, std::uintptr_t seq_lens, std::int64_t batch,
         std::int64_t num_q_heads, std::int64_t num_kv_heads, std::int64_t head_dim, std::int64_t q_token_stride,
         std::int64_t q_head_stride, std::int64_t num_blocks, std::int64_t block_size, std::int64_t max_blocks,
         float scale, std::int64_t sliding_window, std::int64_t num_splits, int dtype, std::uintptr_t stream,
         std::int64_t variant) {
        check("decode_attention",
              fastllm::launch_decode_attention(ptr(out), ptr(workspace), ptr(q), ptr(k_cache), ptr(v_cache),
                                               ptr(block_tables), ptr(seq_lens), batch, num_q_heads, num_kv_heads,
                                               head_dim, q_token_stride, q_head_stride, num_blocks, block_size,
                                               max_blocks, scale, sliding_window, num_splits, variant, dtype,
                                               ptr(stream)));
      },
      py::arg("out"), py::arg("workspace"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("block_tables"), py::arg("seq_lens"), py::arg("batch"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q_token_stride"), py::arg("q_head_stride"),
      py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("scale"),
      py::arg("sliding_window"), py::arg("num_splits"), py::arg("dtype"), py::arg("stream"),
      py::arg("variant") = 0,
      "out [batch, Hq, D] = softmax(q k^T * scale) v for one query token per sequence over its cached keys "
      "[max(0, L - window), L), L = seq_lens[b] (int32, device), slots from int32 block_tables [batch, max_blocks] "
      "(device); caches [num_blocks, block_size, Hk, D]; fp16/bf16 (dtype 1/2); sliding_window 0 = none; "
      "workspace and num_splits from decode_attention_plan (made for the same variant); variant 0 (default: "
      "the tensor-core split kernel for D 64/128/256, the CUDA-core one otherwise) or 1 (the CUDA-core one).");

  m.def(
      "prefill_attention",
      [](std::uintptr_t out, std::uintptr_t lse, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
         std::uintptr_t cu_seqlens_q, std::uintptr_t seq_lens, std::uintptr_t block_tables, std::int64_t num_tokens,
         std::int64_t batch, std::int64_t num_q_heads, std::int64_t num_kv_heads, std::int64_t head_dim,
         std::int64_t q_token_stride, std::int64_t q_head_stride, std::int64_t num_blocks, std::int64_t block_size,
         std::int64_t max_blocks, std::int64_t max_query_len, float scale, std::int64_t sliding_window, int dtype,
         std::uintptr_t stream, int impl) {
        check("prefill_attention",
              fastllm::launch_prefill_attention(ptr(out), ptr(lse), ptr(q), ptr(k_cache), ptr(v_cache),
                                                ptr(cu_seqlens_q), ptr(seq_lens), ptr(block_tables), num_tokens,
                                                batch, num_q_heads, num_kv_heads, head_dim, q_token_stride,
                                                q_head_stride, num_blocks, block_size, max_blocks, max_query_len,
                                                scale, sliding_window, dtype, impl, ptr(stream)));
      },
      py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_seqlens_q"),
      py::arg("seq_lens"), py::arg("block_tables"), py::arg("num_tokens"), py::arg("batch"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q_token_stride"), py::arg("q_head_stride"),
      py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("max_query_len"),
      py::arg("scale"), py::arg("sliding_window"), py::arg("dtype"), py::arg("stream"), py::arg("impl") = 0,
      "out [num_tokens, Hq, D] (contiguous) = causal softmax(q k^T * scale) v of each sequence's queries "
      "q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] (positions seq_lens[b] - query_len + i) over its cached keys (slots "
      "from int32 block_tables [batch, max_blocks]; int32 cu_seqlens_q, seq_lens; all device), within "
      "sliding_window when > 0; lse (fp32 [num_tokens, Hq], 0 = none) = log-sum-exp of the scaled scores. "
      "caches [num_blocks, block_size, Hk, D]; fp16/bf16 (dtype 1/2); D in {64, 80, 96, 128, 256}; "
      "max_query_len: host-side bound on the query lengths (sizes the grid). impl: 0 = mma.sync kernel (sm_80+), "
      "1 = wgmma kernel (sm_90a, D 64 or 128), 2 = the wgmma kernel with P V under the next tile's softmax.");

  m.def("prefill_attention_sm90_usable", &fastllm::prefill_attention_sm90_usable, py::arg("head_dim"),
        "Whether prefill_attention(impl=1 or 2) runs on the current device for this head dim (a build for 90a, an sm_90 "
        "GPU, D 64 or 128).");

  m.def(
      "int8_linear_plan",
      [](std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t num_sms, std::int64_t requested_splits) {
        std::int64_t splits = 1, workspace_floats = 0;
        check("int8_linear", fastllm::int8_linear_plan(&splits, &workspace_floats, m, n, k, num_sms, requested_splits));
        return std::make_pair(splits, workspace_floats);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_sms"), py::arg("requested_splits"),
      "(num_splits, workspace_floats) for int8_linear with M tokens, N outputs, K inputs on a GPU with num_sms "
      "SMs (host only): requested_splits (1..16, clamped to the K tiles) or 0 to choose; workspace_floats = "
      "num_splits * M * N fp32 when num_splits > 1, else 0.");

  m.def(
      "int8_linear",
      [](std::uintptr_t out, std::uintptr_t workspace, std::uintptr_t x, std::uintptr_t qweight,
         std::uintptr_t scales, std::uintptr_t bias, std::int64_t m, std::int64_t n, std::int64_t k,
         std::int64_t num_splits, int dtype, std::uintptr_t stream) {
        check("int8_linear", fastllm::launch_int8_linear(ptr(out), ptr(workspace), ptr(x), ptr(qweight), ptr(scales),
                                                         ptr(bias), m, n, k, num_splits, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("workspace"), py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("bias"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_splits"), py::arg("dtype"), py::arg("stream"),
      "out [M, N] = x [M, K] @ (qweight * scales[:, None]).T + bias for int8 qweight [N, K], fp32 scales [N], "
      "bias [N] (0 = none); x, out, bias fp16/bf16 (dtype 1/2), contiguous. num_splits and the fp32 workspace "
      "(0 when num_splits == 1) from int8_linear_plan.");

  m.def(
      "int8_dequantize",
      [](std::uintptr_t out, std::uintptr_t qweight, std::uintptr_t scales, std::int64_t n, std::int64_t k, int dtype,
         std::uintptr_t stream) {
        check("int8_linear",
              fastllm::launch_int8_dequantize(ptr(out), ptr(qweight), ptr(scales), n, k, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("qweight"), py::arg("scales"), py::arg("n"), py::arg("k"), py::arg("dtype"),
      py::arg("stream"),
      "out [N, K] (fp16/bf16, dtype 1/2) = qweight * scales[:, None] rounded once, for int8 qweight [N, K] and "
      "fp32 scales [N].");

  m.def(
      "int4_linear_plan",
      [](std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t group, std::int64_t num_sms,
         std::int64_t requested_splits, std::int64_t variant) {
        std::int64_t splits = 1, workspace_floats = 0;
        check("int4_linear", fastllm::int4_linear_plan(&splits, &workspace_floats, m, n, k, group, num_sms,
                                                       requested_splits, variant));
        return std::make_pair(splits, workspace_floats);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("num_sms"), py::arg("requested_splits"),
      py::arg("variant") = 0,
      "(num_splits, workspace_floats) for int4_linear with M tokens, N outputs, K inputs and group size 32/64/128 "
      "on a GPU with num_sms SMs (host only): requested_splits (1..16, clamped to the K tiles) or 0 to choose; "
      "workspace_floats = num_splits * M * N fp32 when num_splits > 1, else 0. variant as for int4_linear (the plan "
      "of variant 2 counts the wgmma kernel's K tiles where that kernel runs).");

  m.def(
      "int4_linear",
      [](std::uintptr_t out, std::uintptr_t workspace, std::uintptr_t x, std::uintptr_t qweight,
         std::uintptr_t scales, std::uintptr_t zeros, std::uintptr_t bias, std::int64_t m, std::int64_t n,
         std::int64_t k, std::int64_t group, std::int64_t num_splits, int dtype, std::uintptr_t stream,
         std::int64_t variant) {
        check("int4_linear",
              fastllm::launch_int4_linear(ptr(out), ptr(workspace), ptr(x), ptr(qweight), ptr(scales), ptr(zeros),
                                          ptr(bias), m, n, k, group, num_splits, variant, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("workspace"), py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("bias"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("num_splits"),
      py::arg("dtype"), py::arg("stream"), py::arg("variant") = 0,
      "out [M, N] = x [M, K] @ w.T + bias with w = (q - zeros) * scales per group of `group` columns, q the "
      "nibbles of uint8 qweight [N, K/2] (low nibble = even column), scales [N, K/group] in the activation dtype, "
      "uint8 zeros [N, K/group]; x, out, bias fp16/bf16 (dtype 1/2), contiguous; bias 0 = none. num_splits and "
      "the fp32 workspace (0 when num_splits == 1) from int4_linear_plan (made for the same variant); variant 0 "
      "(default), 2 (warpgroup MMA at M 9..64 on an sm_90 GPU with the 90a build; variant 0 elsewhere), 3 or 4 (the "
      "wide tiles at M <= 16, one or two mma chains per warp; variant 0 at M > 16).");

  m.def(
      "int4_dequantize",
      [](std::uintptr_t out, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t zeros, std::int64_t n,
         std::int64_t k, std::int64_t group, int dtype, std::uintptr_t stream) {
        check("int4_linear", fastllm::launch_int4_dequantize(ptr(out), ptr(qweight), ptr(scales), ptr(zeros), n, k,
                                                             group, dtype, ptr(stream)));
      },
      py::arg("out"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("n"), py::arg("k"),
      py::arg("group"), py::arg("dtype"), py::arg("stream"),
      "out [N, K] (fp16/bf16, dtype 1/2) = (q - zeros) * scales per group, rounded once; formats as int4_linear.");
}
