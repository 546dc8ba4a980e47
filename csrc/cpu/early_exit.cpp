// CPU kernels of the early-exit family: rows split across threads, the per-row math from entropy.h.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "effbert/checks.h"
#include "effbert/entropy.h"
#include "effbert/registry.h"

namespace {

constexpr int64_t kBlock = 256;
constexpr int kChunk = 16;

template <int DTYPE>
void entropy_rows(const char* logits, int64_t row_begin, int64_t row_end, int64_t cols, int64_t row_stride,
                  float* out) {
  const int64_t row_bytes = row_stride * effbert::dtype_size(DTYPE);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* row = logits + r * row_bytes;
    // Blocks of kBlock columns merged into the row total keep fp32 rounding near that of a tree sum
    // (one long running sum over a 50k-class row drifts by ~1e-5).
    effbert::EntropyState total = effbert::entropy_init();
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      effbert::EntropyState st = effbert::entropy_init();
      const int64_t c1 = std::min(cols, c0 + kBlock);
      int64_t c = c0;
      for (; c + kChunk <= c1; c += kChunk) {  // chunks: one max and one rescale per kChunk values
        float z[kChunk];
        for (int i = 0; i < kChunk; ++i) z[i] = effbert::load_as_float(row, DTYPE, c + i);
        effbert::entropy_push_chunk<kChunk>(st, z);
      }
      for (; c < c1; ++c) effbert::entropy_push(st, effbert::load_as_float(row, DTYPE, c));
      total = c0 == 0 ? st : effbert::entropy_merge(total, st);
    }
    out[r] = effbert::entropy_finish(total);
  }
}

void entropy_rows_any(const char* logits, int dtype, int64_t row_begin, int64_t row_end, int64_t cols,
                      int64_t row_stride, float* out) {
  switch (dtype) {  // dtype as a template argument: the chunk loops stay branch-free and vectorise
    case effbert::kFloat32: return entropy_rows<effbert::kFloat32>(logits, row_begin, row_end, cols, row_stride, out);
    case effbert::kFloat16: return entropy_rows<effbert::kFloat16>(logits, row_begin, row_end, cols, row_stride, out);
    default: return entropy_rows<effbert::kBFloat16>(logits, row_begin, row_end, cols, row_stride, out);
  }
}

void exit_entropy_cpu(uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out) {
  effbert::require_dtype(dtype, "logits");
  effbert::require(rows >= 0, "rows must be >= 0");
  effbert::require(cols >= 1, "cols must be >= 1");
  effbert::require(row_stride >= cols || rows <= 1, "row_stride must be >= cols");
  if (rows == 0) return;
  effbert::require(logits != 0 && out != 0, "logits and out must be non-null");
  const char* src = reinterpret_cast<const char*>(logits);
  float* dst = reinterpret_cast<float*>(out);
  // Threads only pay off on large inputs; small exit decisions stay on the calling thread.
  const int64_t work = rows * cols;
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t n_threads = std::min<int64_t>({hw, rows, std::max<int64_t>(1, work >> 16)});
  if (n_threads <= 1) {
    entropy_rows_any(src, dtype, 0, rows, cols, row_stride, dst);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (rows + n_threads - 1) / n_threads;
  for (int64_t b = 0; b < rows; b += chunk)
    pool.emplace_back(entropy_rows_any, src, dtype, b, std::min(rows, b + chunk), cols, row_stride, dst);
  for (auto& t : pool) t.join();
}

}  // namespace

EFFBERT_BIND(early_exit) {
  m.def(
      "exit_entropy",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out) {
        pybind11::gil_scoped_release release;
        exit_entropy_cpu(logits, dtype, rows, cols, row_stride, out);
      },
      pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("rows"), pybind11::arg("cols"),
      pybind11::arg("row_stride"), pybind11::arg("out"),
      "Entropy of softmax(logits[r, :cols]) for each row r into out[r] (float32). Addresses are host pointers.");
}
