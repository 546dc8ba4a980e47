// TNF note dictionary: the per-element and per-sequence math shared by the CPU and CUDA kernels.
//
// note_mix:   out = x where slot < 0, else (1 - lam) * x + lam * notes[slot].
// window means: for one sequence, walk its span rows' window boundaries sorted by position once, keeping a
//   running prefix sum P of the hidden states; at a row's lo boundary park P in means[r], at its hi boundary
//   means[r] = (P - parked) / (hi - lo). Tokens under no open window are skipped, tokens under several are read once.
// fold: the rows of one slot, in row order, by Horner's rule: acc = (1 - gamma) * acc + gamma * c, and a slot's
//   first-ever update sets acc = c. Occurrence r of m thus weighs gamma * (1 - gamma)^(m - r), exactly the
//   sequential definition, with one owner per note row (no races).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "effbert/common.h"

namespace effbert {

EFFBERT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// float -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept quiet).
EFFBERT_HD uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65536 (or inf): inf
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal, round(|f| * 2^24) exactly in float
    const float scaled = bits_to_float(a) * 16777216.f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(scaled)));
  }
  uint32_t h = ((((a >> 23) & 0xffu) - 112u) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent (65520 -> inf)
  return static_cast<uint16_t>(sign | h);
}

// float -> bfloat16, round to nearest even, NaN kept quiet.
EFFBERT_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

EFFBERT_HD void store_from_float(void* base, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(base)[i] = v;
    return;
  }
  static_cast<uint16_t*>(base)[i] = dtype == kFloat16 ? float_to_half_bits(v) : float_to_bf16_bits(v);
}

EFFBERT_HD float note_mix_value(float x, float note, float lam) { return (1.f - lam) * x + lam * note; }

EFFBERT_HD float note_fold_step(float acc, float c, float gamma, bool first) {
  return first ? c : (1.f - gamma) * acc + gamma * c;
}

// V consecutive elements from element i of a row of `dtype`, widened to float. Scalar loads on the host (the
// compiler vectorises the loop); the CUDA kernels use their own 16-byte loads where the layout allows.
template <int DTYPE, int V>
EFFBERT_HD void load_chunk(const void* base, int64_t i, float (&out)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = load_as_float(base, DTYPE, i + k);
}

// The window [lo, hi) of a span row (batch, start, end, slot) in a sequence of `length` real tokens.
struct NoteWindow {
  int64_t lo, hi;
};

EFFBERT_HD NoteWindow note_window(const int64_t* row, int64_t length, int64_t window) {
  const int64_t lo = row[1] - window, hi = row[2] + window;
  return NoteWindow{lo > 0 ? lo : 0, hi < length ? hi : length};
}

// Window means of one sequence's rows for columns [d, d + V). `ev_idx[e0:e1]` are the sequence's window boundaries
// sorted by position: a value r < rows is row r's lo boundary, rows + r its hi boundary. Positions are clamped to
// [0, seq] here as a last guard. `load(t, d, out)` reads V columns of token t.
template <int V, typename Load>
EFFBERT_HD void note_window_walk(Load load, int64_t seq, int64_t length, int64_t window, int64_t d, int64_t dim,
                                 const int64_t* spans, int64_t rows, const int64_t* ev_idx, int64_t e0, int64_t e1,
                                 float* means) {
  float p[V];
#pragma unroll
  for (int k = 0; k < V; ++k) p[k] = 0.f;
  int64_t t = 0;
  int open = 0;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t ev = ev_idx[e];
    const bool is_hi = ev >= rows;
    const int64_t r = is_hi ? ev - rows : ev;
    const NoteWindow w = note_window(spans + 4 * r, length, window);
    int64_t pos = is_hi ? w.hi : w.lo;
    pos = pos < 0 ? 0 : (pos > seq ? seq : pos);
    if (open == 0) t = pos;  // no window open: the tokens before this boundary belong to no row
    for (; t < pos; ++t) {
      float h[V];
      load(t, d, h);
#pragma unroll
      for (int k = 0; k < V; ++k) p[k] += h[k];
    }
    float* out = means + r * dim + d;
    if (!is_hi) {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = p[k];  // park P(lo)
      ++open;
    } else {
      const float inv = 1.f / static_cast<float>(w.hi - w.lo > 1 ? w.hi - w.lo : 1);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = (p[k] - out[k]) * inv;
      if (--open == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = 0.f;  // restart: P stays small, so P(hi) - P(lo) loses nothing
      }
    }
  }
}

// Rows sorted by slot (stable): the length of the slot segment that starts at sorted position i, or 0 when i is not
// the first row of its segment. Only a segment's first row folds it, so one program owns each note row and count.
EFFBERT_HD int64_t note_segment_length(const int64_t* sorted_slots, int64_t i, int64_t rows) {
  const int64_t s = sorted_slots[i];
  if (i > 0 && sorted_slots[i - 1] == s) return 0;
  int64_t m = 1;
  while (i + m < rows && sorted_slots[i + m] == s) ++m;
  return m;
}

// Fold one slot segment (m rows, sorted position i onwards) into note columns [d, d + V). `before` is the slot's
// count before this update.
template <int V>
EFFBERT_HD void note_fold_segment(float* note_row, const float* means, const int64_t* order, int64_t i, int64_t m,
                                  int64_t before, float gamma, int64_t d, int64_t dim) {
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = note_row[d + k];
  for (int64_t j = 0; j < m; ++j) {
    const float* c = means + order[i + j] * dim + d;
    const bool first = before == 0 && j == 0;
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = note_fold_step(acc[k], c[k], gamma, first);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) note_row[d + k] = acc[k];
}

// A span row's problem code: 0 valid, else which field is out of range (the wrappers turn it into a message).
EFFBERT_HD int note_row_problem(const int64_t* row, const int64_t* lengths, int64_t batch, int64_t seq,
                                int64_t num_slots, bool check_spans, bool check_slots) {
  if (check_spans) {
    const int64_t b = row[0], start = row[1], end = row[2];
    if (b < 0 || b >= batch) return 1;
    const int64_t length = lengths ? lengths[b] : seq;
    if (length < 0 || length > seq) return 2;
    if (start >= end) return 3;
    if (start < 0 || end > length) return 4;
  }
  if (check_slots && (row[3] < 0 || row[3] >= num_slots)) return 5;
  return 0;
}

}  // namespace effbert
