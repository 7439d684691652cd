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
}
