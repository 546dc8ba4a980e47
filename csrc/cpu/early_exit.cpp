// CPU kernels of the early-exit family: rows split across threads, the per-row math from entropy.h.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "effbert/checks.h"
#include "effbert/entropy.h"
#include "effbert/exit_decision.h"
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

// ---- the fused exit decision (one call per layer; see exit_decision.h for the per-row math) ----

struct DecisionArgs {
  uintptr_t logits;
  int dtype;
  int64_t rows, cols, row_stride;
  uintptr_t row_ids, prev, counter, out_logits;
  int64_t out_batch, out_stride;
  uintptr_t out_layer, next_rows, next_local, count;
  int criterion;
  int32_t layer;
  float threshold;
  int32_t patience;
  bool last;
};

void check_decision_args(const DecisionArgs& a) {
  effbert::require_dtype(a.dtype, "logits");
  effbert::require(a.rows >= 0, "rows must be >= 0");
  effbert::require(a.cols >= 1, "cols must be >= 1");
  effbert::require(a.row_stride >= a.cols || a.rows <= 1, "row_stride must be >= cols");
  effbert::require(a.out_stride >= a.cols || a.out_batch <= 1, "out_stride must be >= cols");
  effbert::require(a.rows <= a.out_batch, "rows must be <= out_batch (the active rows are a subset of the batch)");
  effbert::require(a.out_batch < (int64_t(1) << 31), "out_batch must fit in int32");
  effbert::require(a.criterion >= effbert::kCritEntropy && a.criterion <= effbert::kCritPatienceRegression,
                   "criterion code must be 0..3");
  effbert::require(a.criterion != effbert::kCritPatienceRegression || a.cols == 1,
                   "the regression patience rule takes one column");
  effbert::require(a.layer >= 1, "layer must be >= 1");
  effbert::require(a.patience >= 1 || a.criterion < effbert::kCritPatience, "patience must be >= 1");
  effbert::require(a.count != 0, "count must be non-null");
  if (a.rows == 0) return;
  effbert::require(a.logits && a.row_ids && a.out_logits && a.out_layer && a.next_rows && a.next_local,
                   "pointers must be non-null");
  effbert::require(a.criterion < effbert::kCritPatience || (a.prev && a.counter),
                   "prev and counter must be non-null for patience");
}

// Exiting rows' logits are copied bit for bit (no round trip through float), whatever the dtype.
void copy_row(const char* src, char* dst, int64_t cols, int dtype) {
  std::memcpy(dst, src, static_cast<size_t>(cols) * effbert::dtype_size(dtype));
}

void exit_decision_cpu(const DecisionArgs& a) {
  check_decision_args(a);
  const int esize = effbert::dtype_size(a.dtype);
  const char* logits = reinterpret_cast<const char*>(a.logits);
  const int32_t* ids = reinterpret_cast<const int32_t*>(a.row_ids);
  float* prev = reinterpret_cast<float*>(a.prev);
  int32_t* counter = reinterpret_cast<int32_t*>(a.counter);
  char* out_logits = reinterpret_cast<char*>(a.out_logits);
  int32_t* out_layer = reinterpret_cast<int32_t*>(a.out_layer);
  int32_t* next_rows = reinterpret_cast<int32_t*>(a.next_rows);
  int32_t* next_local = reinterpret_cast<int32_t*>(a.next_local);
  const bool patience = a.criterion >= effbert::kCritPatience;
  // A bad id would write outside the outputs: refuse the call before any state changes.
  for (int64_t r = 0; r < a.rows; ++r)
    effbert::require(ids[r] >= 0 && ids[r] < a.out_batch,
                     "row_ids[" + std::to_string(r) + "] = " + std::to_string(ids[r]) + " outside [0, out_batch)");
  int32_t kept = 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int32_t id = ids[r];
    const char* row = logits + r * a.row_stride * esize;
    effbert::RowSummary s = effbert::summary_init();
    for (int64_t c = 0; c < a.cols; ++c)
      effbert::summary_push(s, effbert::load_as_float(row, a.dtype, c), static_cast<int32_t>(c));
    const effbert::Decision d =
        effbert::exit_decide(a.criterion, s, a.layer, a.threshold, a.patience, patience ? prev[id] : 0.f,
                             patience ? counter[id] : 0, a.last);
    if (patience) {
      prev[id] = d.pred;
      counter[id] = d.counter;
    }
    if (d.exits) {
      copy_row(row, out_logits + static_cast<int64_t>(id) * a.out_stride * esize, a.cols, a.dtype);
      out_layer[id] = a.layer;
    } else {
      next_rows[kept] = id;
      next_local[kept] = static_cast<int32_t>(r);
      ++kept;
    }
  }
  *reinterpret_cast<int32_t*>(a.count) = kept;
}

}  // namespace

EFFBERT_BIND(early_exit) {
  m.def(
      "exit_decision",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t row_ids,
         uintptr_t prev, uintptr_t counter, uintptr_t out_logits, int64_t out_batch, int64_t out_stride,
         uintptr_t out_layer, uintptr_t next_rows, uintptr_t next_local, uintptr_t count, int criterion,
         int32_t layer, float threshold, int32_t patience, bool last) {
        pybind11::gil_scoped_release release;
        exit_decision_cpu(DecisionArgs{logits, dtype, rows, cols, row_stride, row_ids, prev, counter, out_logits,
                                       out_batch, out_stride, out_layer, next_rows, next_local, count, criterion,
                                       layer, threshold, patience, last});
      },
      pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("rows"), pybind11::arg("cols"),
      pybind11::arg("row_stride"), pybind11::arg("row_ids"), pybind11::arg("prev"), pybind11::arg("counter"),
      pybind11::arg("out_logits"), pybind11::arg("out_batch"), pybind11::arg("out_stride"),
      pybind11::arg("out_layer"), pybind11::arg("next_rows"), pybind11::arg("next_local"), pybind11::arg("count"),
      pybind11::arg("criterion"), pybind11::arg("layer"), pybind11::arg("threshold"), pybind11::arg("patience"),
      pybind11::arg("last"),
      "One layer's exit decision over the active rows (int32 ids into the batch): patience state update, exiting "
      "rows' logits and layer written at their ids, continuing rows compacted into next_rows / next_local, their "
      "number into count[0]. Addresses are host pointers.");
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
