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
#include "effbert/parallel.h"
#include "effbert/registry.h"

namespace {

constexpr int64_t kBlock = 256;
constexpr int kLanes = 8;

// exp(x) for x <= 0, branch-free so that loops over it vectorise: Cephes' expf (degree-6 polynomial on
// [-ln2/2, ln2/2], ~1 ulp) with 2^n applied in two halves, so results down to the subnormal range stay exact to
// float rounding; 0 below -104 (exp(-104) rounds to 0 in float).
inline float exp_nonpositive(float x) {
  const float xc = x < -104.f ? -104.f : x;  // also maps -inf (and NaN, caught by the caller) into range
  const float t = xc * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t - 0.5f));  // t <= 0: truncation of t - 1/2 rounds
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each >= -75: both powers are normal floats
  const float s1 = effbert::bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = effbert::bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  const float v = y * s1 * s2;  // computed unconditionally: a select, not a branch, keeps the loop vectorisable
  return x < -104.f ? 0.f : v;
}

// One block of at most kBlock values (already float) pushed into the entropy state of entropy.h: one maximum,
// at most one rescale, then vectorised exponentials and lane-wise sums.
inline void push_block(effbert::EntropyState& st, const float* z, int n) {
  float cm = -INFINITY;
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    cm = z[i] > cm ? z[i] : cm;
    bad |= z[i] < INFINITY ? 0 : 1;
  }
  if (bad) {
    st.nan = true;
    return;
  }
  if (cm == -INFINITY) return;
  int skip = -1;  // the element that becomes the excluded maximum, if this block holds a new one
  if (cm > st.m) {
    effbert::entropy_rescale(st, cm);
    for (skip = 0; z[skip] != cm; ++skip) {}
  }
  const float m = st.m;
  float e[kBlock], ed[kBlock];
  for (int i = 0; i < n; ++i) {  // element-wise, branch-free: vectorised
    const float d = m - z[i];  // >= 0; +inf for a -inf logit
    const float x = exp_nonpositive(-d);
    const float xd = x * d;  // NaN for a -inf logit (0 * inf): selected away
    e[i] = i == skip ? 0.f : x;  // the excluded maximum adds nothing (d = 0 there: nothing to u either)
    ed[i] = z[i] > -INFINITY ? xd : 0.f;
  }
  // Sums in kLanes independent lanes (vectorisable without reassociating), then the lanes.
  float acc_a[kLanes] = {0.f}, acc_u[kLanes] = {0.f};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_a[j] += e[i + j];
      acc_u[j] += ed[i + j];
    }
  }
  float a = 0.f, u = 0.f;
  for (int j = 0; j < kLanes; ++j) {
    a += acc_a[j];
    u += acc_u[j];
  }
  for (; i < n; ++i) {
    a += e[i];
    u += ed[i];
  }
  st.a += a;
  st.u += u;
}

template <int DTYPE>
void entropy_rows(const char* logits, int64_t row_begin, int64_t row_end, int64_t cols, int64_t row_stride,
                  float* out) {
  const int64_t row_bytes = row_stride * effbert::dtype_size(DTYPE);
  float buf[kBlock];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const char* row = logits + r * row_bytes;
    // Blocks of kBlock columns merged into the row total keep fp32 rounding near that of a tree sum.
    effbert::EntropyState total = effbert::entropy_init();
    if (cols < kLanes) {  // a few classes (an exit head): element by element, no block set-up
      for (int64_t c = 0; c < cols; ++c) effbert::entropy_push(total, effbert::load_as_float(row, DTYPE, c));
      out[r] = effbert::entropy_finish(total);
      continue;
    }
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      effbert::EntropyState st = effbert::entropy_init();
      const int64_t n = std::min(cols, c0 + kBlock) - c0;
      const float* z;
      if (DTYPE == effbert::kFloat32) {
        z = reinterpret_cast<const float*>(row) + c0;
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = effbert::load_as_float(row, DTYPE, c0 + i);
        z = buf;
      }
      push_block(st, z, static_cast<int>(n));
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

void exit_entropy_cpu(uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out,
                      int64_t threads) {
  effbert::require_dtype(dtype, "logits");
  effbert::require(rows >= 0, "rows must be >= 0");
  effbert::require(cols >= 1, "cols must be >= 1");
  effbert::require(row_stride >= cols || rows <= 1, "row_stride must be >= cols");
  if (rows == 0) return;
  effbert::require(logits != 0 && out != 0, "logits and out must be non-null");
  const char* src = reinterpret_cast<const char*>(logits);
  float* dst = reinterpret_cast<float*>(out);
  // Threads only pay off on large inputs; small exit decisions stay on the calling thread.
  effbert::parallel_for(rows, rows * cols, threads, [&](int64_t begin, int64_t end) {
    entropy_rows_any(src, dtype, begin, end, cols, row_stride, dst);
  });
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
    if (!(ids[r] >= 0 && ids[r] < a.out_batch))
      effbert::fail("row_ids[" + std::to_string(r) + "] = " + std::to_string(ids[r]) + " outside [0, out_batch)");
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
         int32_t layer, float threshold, int32_t patience, bool last, int64_t threads) {
        (void)threads;  // one pass in row order on the calling thread: a layer's decision is too small to split
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
      pybind11::arg("last"), pybind11::arg("threads"),
      "One layer's exit decision over the active rows (int32 ids into the batch): patience state update, exiting "
      "rows' logits and layer written at their ids, continuing rows compacted into next_rows / next_local, their "
      "number into count[0]. Addresses are host pointers.");
  m.def(
      "exit_entropy",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out,
         int64_t threads) {
        pybind11::gil_scoped_release release;
        exit_entropy_cpu(logits, dtype, rows, cols, row_stride, out, threads);
      },
      pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("rows"), pybind11::arg("cols"),
      pybind11::arg("row_stride"), pybind11::arg("out"), pybind11::arg("threads"),
      "Entropy of softmax(logits[r, :cols]) for each row r into out[r] (float32), on at most `threads` threads. Addresses are host pointers.");
}
