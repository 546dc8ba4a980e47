// CPU kernels of the TNF family: note mix, window means and the ordered fold, the math from notes.h.
//
// The update takes the plan the Python wrapper builds (boundaries sorted per sequence, rows sorted per slot) and
// checks every index it will follow before writing anything, so a bad plan raises instead of touching memory.
#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "effbert/checks.h"
#include "effbert/notes.h"
#include "effbert/parallel.h"
#include "effbert/registry.h"

namespace {

using effbert::parallel_for;

template <int DTYPE>
void mix_rows(const char* x, int64_t t0, int64_t t1, int64_t dim, int64_t stride_x, const float* notes,
              int64_t num_slots, const int64_t* slots, float lam, char* out, int64_t stride_out) {
  const int64_t es = effbert::dtype_size(DTYPE);
  for (int64_t t = t0; t < t1; ++t) {
    const void* xr = x + t * stride_x * es;
    void* orow = out + t * stride_out * es;
    const int64_t slot = slots[t];
    if (slot < 0) {
      for (int64_t d = 0; d < dim; ++d) effbert::store_from_float(orow, DTYPE, d, effbert::load_as_float(xr, DTYPE, d));
    } else if (notes == nullptr) {  // the backward: scale only
      for (int64_t d = 0; d < dim; ++d)
        effbert::store_from_float(orow, DTYPE, d, (1.f - lam) * effbert::load_as_float(xr, DTYPE, d));
    } else {
      const float* note = notes + slot * dim;
      for (int64_t d = 0; d < dim; ++d)
        effbert::store_from_float(orow, DTYPE, d, effbert::note_mix_value(effbert::load_as_float(xr, DTYPE, d),
                                                                          note[d], lam));
    }
  }
}

void note_mix_cpu(uintptr_t x, int dtype, int64_t tokens, int64_t dim, int64_t stride_x, uintptr_t notes,
                  int64_t num_slots, uintptr_t slots, float lam, uintptr_t out, int64_t stride_out, int64_t threads) {
  effbert::require_dtype(dtype, "x");
  effbert::require(tokens >= 0 && dim >= 0 && num_slots >= 0, "tokens, dim and num_slots must be >= 0");
  effbert::require(tokens <= 1 || (stride_x >= dim && stride_out >= dim), "row strides must be >= dim");
  if (tokens == 0 || dim == 0) return;
  effbert::require(x != 0 && slots != 0 && out != 0, "x, slots and out must be non-null");
  const int64_t* s = reinterpret_cast<const int64_t*>(slots);
  if (notes != 0)
    for (int64_t t = 0; t < tokens; ++t)
      if (!(s[t] < num_slots)) effbert::fail("slots[" + std::to_string(t) + "] = " + std::to_string(s[t]) +
                                             " out of range [0, " + std::to_string(num_slots) + ")");
  const char* xp = reinterpret_cast<const char*>(x);
  char* op = reinterpret_cast<char*>(out);
  const float* np = reinterpret_cast<const float*>(notes);
  parallel_for(tokens, tokens * dim, threads, [&](int64_t t0, int64_t t1) {
    switch (dtype) {
      case effbert::kFloat32: return mix_rows<effbert::kFloat32>(xp, t0, t1, dim, stride_x, np, num_slots, s, lam, op, stride_out);
      case effbert::kFloat16: return mix_rows<effbert::kFloat16>(xp, t0, t1, dim, stride_x, np, num_slots, s, lam, op, stride_out);
      default: return mix_rows<effbert::kBFloat16>(xp, t0, t1, dim, stride_x, np, num_slots, s, lam, op, stride_out);
    }
  });
}

constexpr int kCols = 8;  // columns walked together: one pass over the boundaries per 8 columns

template <int DTYPE>
void means_sequences(const char* hidden, int64_t b0, int64_t b1, int64_t seq, int64_t dim, int64_t stride_b,
                     int64_t stride_n, const int64_t* spans, const int64_t* lengths, int64_t window,
                     const int64_t* ev_off, const int64_t* ev_idx, int64_t rows, float* means) {
  const int64_t es = effbert::dtype_size(DTYPE);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t e0 = ev_off[b], e1 = ev_off[b + 1];
    if (e0 == e1) continue;
    const char* base = hidden + b * stride_b * es;
    int64_t d = 0;
    for (; d + kCols <= dim; d += kCols) {
      auto load = [&](int64_t t, int64_t c, float (&h)[kCols]) {
        effbert::load_chunk<DTYPE, kCols>(base, t * stride_n + c, h);
      };
      effbert::note_window_walk<kCols>(load, seq, lengths[b], window, d, dim, spans, rows, ev_idx, e0, e1, means);
    }
    for (; d < dim; ++d) {
      auto load = [&](int64_t t, int64_t c, float (&h)[1]) { h[0] = effbert::load_as_float(base, DTYPE, t * stride_n + c); };
      effbert::note_window_walk<1>(load, seq, lengths[b], window, d, dim, spans, rows, ev_idx, e0, e1, means);
    }
  }
}

bool flag_set(uintptr_t flag, int64_t rows) {
  return flag != 0 && *reinterpret_cast<const int32_t*>(flag) < rows;
}

void note_window_means_cpu(uintptr_t hidden, int dtype, int64_t batch, int64_t seq, int64_t dim, int64_t stride_b,
                           int64_t stride_n, uintptr_t spans, uintptr_t lengths, int64_t window, uintptr_t ev_off,
                           uintptr_t ev_idx, uintptr_t flag, int64_t rows, uintptr_t means, int64_t threads) {
  effbert::require_dtype(dtype, "hidden");
  effbert::require(batch >= 0 && seq >= 0 && dim >= 0 && rows >= 0 && window >= 0, "sizes must be >= 0");
  if (rows == 0 || dim == 0 || batch == 0 || flag_set(flag, rows)) return;
  effbert::require(hidden != 0 && spans != 0 && lengths != 0 && ev_off != 0 && ev_idx != 0 && means != 0,
                   "pointers must be non-null");
  const int64_t* off = reinterpret_cast<const int64_t*>(ev_off);
  const int64_t* idx = reinterpret_cast<const int64_t*>(ev_idx);
  const int64_t* sp = reinterpret_cast<const int64_t*>(spans);
  const int64_t* len = reinterpret_cast<const int64_t*>(lengths);
  // Every index followed below, checked before the first write (positions are clamped to [0, seq] in the walk).
  effbert::require(off[0] >= 0 && off[batch] <= 2 * rows, "ev_off out of range");
  for (int64_t b = 0; b < batch; ++b) {
    effbert::require(off[b] <= off[b + 1], "ev_off must be non-decreasing");
    if (!(len[b] >= 0 && len[b] <= seq)) effbert::fail("lengths[" + std::to_string(b) + "] = " + std::to_string(len[b]) +
                                                       " out of range [0, " + std::to_string(seq) + "]");
  }
  for (int64_t e = off[0]; e < off[batch]; ++e)
    if (!(idx[e] >= 0 && idx[e] < 2 * rows)) effbert::fail("boundary index " + std::to_string(idx[e]) +
                                                             " out of range [0, " + std::to_string(2 * rows) + ")");
  const char* h = reinterpret_cast<const char*>(hidden);
  float* out = reinterpret_cast<float*>(means);
  window = std::min(window, seq);
  parallel_for(batch, 2 * rows * dim * 16, threads, [&](int64_t b0, int64_t b1) {
    switch (dtype) {
      case effbert::kFloat32: return means_sequences<effbert::kFloat32>(h, b0, b1, seq, dim, stride_b, stride_n, sp, len, window, off, idx, rows, out);
      case effbert::kFloat16: return means_sequences<effbert::kFloat16>(h, b0, b1, seq, dim, stride_b, stride_n, sp, len, window, off, idx, rows, out);
      default: return means_sequences<effbert::kBFloat16>(h, b0, b1, seq, dim, stride_b, stride_n, sp, len, window, off, idx, rows, out);
    }
  });
}

void note_fold_cpu(uintptr_t notes, uintptr_t counts, int64_t num_slots, int64_t dim, uintptr_t means,
                   uintptr_t order, uintptr_t sorted_slots, uintptr_t flag, int64_t rows, float gamma,
                   int64_t threads) {
  effbert::require(num_slots >= 0 && dim >= 0 && rows >= 0, "sizes must be >= 0");
  if (rows == 0 || dim == 0 || flag_set(flag, rows)) return;
  effbert::require(notes != 0 && counts != 0 && means != 0 && order != 0 && sorted_slots != 0,
                   "pointers must be non-null");
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  const int64_t* ss = reinterpret_cast<const int64_t*>(sorted_slots);
  for (int64_t i = 0; i < rows; ++i) {
    if (!(ss[i] >= 0 && ss[i] < num_slots)) effbert::fail("slot " + std::to_string(ss[i]) + " out of range [0, " +
                                                           std::to_string(num_slots) + ")");
    effbert::require(ord[i] >= 0 && ord[i] < rows, "order out of range");
  }
  float* np = reinterpret_cast<float*>(notes);
  int64_t* cp = reinterpret_cast<int64_t*>(counts);
  const float* mp = reinterpret_cast<const float*>(means);
  // Threads split the sorted rows; only a segment's first row folds it, so each note row has one writer.
  parallel_for(rows, rows * dim * 8, threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = effbert::note_segment_length(ss, i, rows);
      if (m == 0) continue;
      const int64_t slot = ss[i], before = cp[slot];
      float* row = np + slot * dim;
      int64_t d = 0;
      for (; d + kCols <= dim; d += kCols) effbert::note_fold_segment<kCols>(row, mp, ord, i, m, before, gamma, d, dim);
      for (; d < dim; ++d) effbert::note_fold_segment<1>(row, mp, ord, i, m, before, gamma, d, dim);
      cp[slot] = before + m;
    }
  });
}

}  // namespace

EFFBERT_BIND(notes) {
  namespace py = pybind11;
  m.def(
      "note_mix",
      [](uintptr_t x, int dtype, int64_t tokens, int64_t dim, int64_t stride_x, uintptr_t notes, int64_t num_slots,
         uintptr_t slots, float lam, uintptr_t out, int64_t stride_out, int64_t threads) {
        py::gil_scoped_release release;
        note_mix_cpu(x, dtype, tokens, dim, stride_x, notes, num_slots, slots, lam, out, stride_out, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("tokens"), py::arg("dim"), py::arg("stride_x"), py::arg("notes"),
      py::arg("num_slots"), py::arg("slots"), py::arg("lam"), py::arg("out"), py::arg("stride_out"), py::arg("threads"),
      "out[t] = x[t] where slots[t] < 0, else (1 - lam) x[t] + lam notes[slots[t]] (notes = 0: (1 - lam) x[t]). "
      "Host pointers; x and out of `dtype`, notes float32, slots int64; at most `threads` threads.");
  m.def(
      "note_window_means",
      [](uintptr_t hidden, int dtype, int64_t batch, int64_t seq, int64_t dim, int64_t stride_b, int64_t stride_n,
         uintptr_t spans, uintptr_t lengths, int64_t window, uintptr_t ev_off, uintptr_t ev_idx, uintptr_t flag,
         int64_t rows, uintptr_t means, int64_t threads) {
        py::gil_scoped_release release;
        note_window_means_cpu(hidden, dtype, batch, seq, dim, stride_b, stride_n, spans, lengths, window, ev_off,
                              ev_idx, flag, rows, means, threads);
      },
      py::arg("hidden"), py::arg("dtype"), py::arg("batch"), py::arg("seq"), py::arg("dim"), py::arg("stride_b"),
      py::arg("stride_n"), py::arg("spans"), py::arg("lengths"), py::arg("window"), py::arg("ev_off"),
      py::arg("ev_idx"), py::arg("flag"), py::arg("rows"), py::arg("means"), py::arg("threads"),
      "Window means of span rows into float32 means[rows, dim] by a prefix-sum walk over each sequence's sorted "
      "window boundaries (ev_idx: r = row r's lo boundary, rows + r its hi one). Does nothing when *flag < rows.");
  m.def(
      "note_fold",
      [](uintptr_t notes, uintptr_t counts, int64_t num_slots, int64_t dim, uintptr_t means, uintptr_t order,
         uintptr_t sorted_slots, uintptr_t flag, int64_t rows, float gamma, int64_t threads) {
        py::gil_scoped_release release;
        note_fold_cpu(notes, counts, num_slots, dim, means, order, sorted_slots, flag, rows, gamma, threads);
      },
      py::arg("notes"), py::arg("counts"), py::arg("num_slots"), py::arg("dim"), py::arg("means"), py::arg("order"),
      py::arg("sorted_slots"), py::arg("flag"), py::arg("rows"), py::arg("gamma"), py::arg("threads"),
      "Ordered EMA fold of means rows into notes, one slot segment (rows sorted by slot, stable) at a time. Does "
      "nothing when *flag < rows.");
}
