// Per-row Shannon entropy in one pass, shared by the CPU and CUDA kernels.
//
// For a row z with maximum m, one element at the maximum (i*), and e_i = exp(z_i - m) <= 1, keep
//   a = sum_{i != i*} e_i            (so the softmax denominator is S = 1 + a)
//   u = sum_i e_i * (m - z_i)        (>= 0)
// Then H = log1p(a) + u / (1 + a). Every term is >= 0, so nothing cancels: fp32 keeps a relative error near 1e-7
// at any logit scale, even where H is tiny (the usual log S - T / S loses ~log S / H of its digits there; with
// S = 1 + 1e-6, that is 2e-2). Two partial states merge exactly (rescale to the larger maximum), so a row can be
// split across threads in any order. Every exponent is <= 0, so logits of magnitude 1e4 are safe.
#pragma once
#include <cmath>
#include "effbert/common.h"

namespace effbert {

struct EntropyState {
  float m;   // running maximum (-inf before the first finite element: the state is empty)
  float a;   // sum of exp(z - m) over every element but one at the maximum
  float u;   // sum of exp(z - m) * (m - z)
  bool nan;  // a NaN (or +inf, which makes the softmax undefined) was seen
};

EFFBERT_HD EntropyState entropy_init() { return EntropyState{-INFINITY, 0.f, 0.f, false}; }

EFFBERT_HD bool entropy_empty(const EntropyState& st) { return !(st.m > -INFINITY); }

EFFBERT_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx: ~2 ulp, and no branchy slow path
#else
  return expf(x);
#endif
}

// Move a non-empty state to a new maximum big >= st.m: every old element, the old maximum included, now counts
// in a; u gains (big - m) for each old element's weight.
EFFBERT_HD void entropy_rescale(EntropyState& st, float big) {
  if (entropy_empty(st)) {
    st.a = 0.f;
    st.u = 0.f;
  } else {
    const float gap = big - st.m;  // >= 0
    const float alpha = fast_exp(-gap);
    const float s = 1.f + st.a;
    st.u = alpha * (st.u + gap * s);
    st.a = alpha * s;
  }
  st.m = big;
}

EFFBERT_HD void entropy_push(EntropyState& st, float z) {
  if (!(z < INFINITY)) {  // NaN or +inf
    st.nan = true;
    return;
  }
  if (z == -INFINITY) return;  // probability exactly 0: contributes nothing
  if (z > st.m) {
    entropy_rescale(st, z);  // z becomes the excluded maximum: it adds nothing to a or u
    return;
  }
  const float d = st.m - z;  // >= 0
  const float e = fast_exp(-d);
  st.a += e;
  st.u += e * d;
}

// Push N consecutive values (one 16-byte vector's worth): one maximum and at most one rescale for the whole chunk,
// then branch-free exponentials. Same result as N entropy_push calls, up to rounding.
template <int N>
EFFBERT_HD void entropy_push_chunk(EntropyState& st, const float (&z)[N]) {
  float cm = -INFINITY;
  int at = -1;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    bad |= !(z[i] < INFINITY);
    if (z[i] > cm) {
      cm = z[i];
      at = i;
    }
  }
  if (bad) {
    st.nan = true;
    return;
  }
  if (cm == -INFINITY) return;
  int skip = -1;  // the chunk's element that becomes the excluded maximum, if any
  if (cm > st.m) {
    entropy_rescale(st, cm);
    skip = at;
  }
  float e[N], ed[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {  // independent lanes first (instruction-level parallelism), then the sums
    const float d = st.m - z[i];
    const float x = fast_exp(-d);
    const bool keep = i != skip && z[i] != -INFINITY;
    e[i] = keep ? x : 0.f;
    ed[i] = keep ? x * d : 0.f;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    st.a += e[i];
    st.u += ed[i];
  }
}

EFFBERT_HD EntropyState entropy_merge(const EntropyState& x, const EntropyState& y) {
  EntropyState hi = x.m >= y.m ? x : y;
  EntropyState lo = x.m >= y.m ? y : x;
  hi.nan = x.nan || y.nan;
  if (entropy_empty(lo)) return hi;
  entropy_rescale(lo, hi.m);  // lo's maximum now counts in lo.a; hi keeps the excluded one
  hi.a += lo.a;
  hi.u += lo.u;
  return hi;
}

// The softmax denominator sum exp(z - m) (>= 1 for a non-empty row): the largest probability is 1 / S.
EFFBERT_HD float entropy_denominator(const EntropyState& st) { return 1.f + st.a; }

// NaN for a row holding NaN or +inf, and for a row with no finite logit (the softmax is undefined there).
EFFBERT_HD float entropy_finish(const EntropyState& st) {
  if (st.nan || entropy_empty(st)) return NAN;
  return log1pf(st.a) + st.u / (1.f + st.a);
}

}  // namespace effbert
