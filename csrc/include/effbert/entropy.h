// Per-row Shannon entropy in one pass, shared by the CPU and CUDA kernels.
//
// For a row z with running maximum m, keep S = sum exp(z - m) and T = sum exp(z - m) * (z - m). Then
// H = log S - T / S. Two partial states merge exactly (rescale to the larger maximum), so a row can be split across
// threads in any order. Everything is fp32 and every exponent is <= 0, so logits of magnitude 1e4 are safe.
#pragma once
#include <cmath>
#include "effbert/common.h"

namespace effbert {

struct EntropyState {
  float m;  // running maximum (-inf before the first finite element)
  float s;  // sum of exp(z - m)
  float t;  // sum of exp(z - m) * (z - m)
  bool nan;  // a NaN (or +inf, which makes the softmax undefined) was seen
};

EFFBERT_HD EntropyState entropy_init() { return EntropyState{-INFINITY, 0.f, 0.f, false}; }

EFFBERT_HD void entropy_push(EntropyState& st, float z) {
  if (!(z < INFINITY)) {  // NaN or +inf
    st.nan = true;
    return;
  }
  if (z == -INFINITY) return;  // probability exactly 0: contributes nothing to S, T or H
  if (z > st.m) {
    const float scale = expf(st.m - z);  // 0 when m is still -inf
    const float shift = st.m - z;        // <= 0
    st.t = st.s > 0.f ? scale * (st.t + shift * st.s) : 0.f;
    st.s = st.s * scale;
    st.m = z;
  }
  const float d = z - st.m;
  const float e = expf(d);
  st.s += e;
  st.t += e * d;
}

EFFBERT_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx: ~2 ulp, plenty for a 1e-4 tolerance, and no branchy slow path
#else
  return expf(x);
#endif
}

// Push N consecutive values (one 16-byte vector's worth): one maximum and at most one rescale for the whole chunk,
// then branch-free exponentials. Same result as N entropy_push calls, up to rounding.
template <int N>
EFFBERT_HD void entropy_push_chunk(EntropyState& st, const float (&z)[N]) {
  float cm = -INFINITY;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    bad |= !(z[i] < INFINITY);
    cm = z[i] > cm ? z[i] : cm;
  }
  if (bad) {
    st.nan = true;
    return;
  }
  if (cm == -INFINITY) return;
  if (cm > st.m) {
    const float shift = st.m - cm;
    const float scale = fast_exp(shift);
    st.t = st.s > 0.f ? scale * (st.t + shift * st.s) : 0.f;
    st.s *= scale;
    st.m = cm;
  }
  float e[N], ed[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {  // independent lanes first (instruction-level parallelism), then the sums
    const float d = z[i] - st.m;
    e[i] = fast_exp(d);
    ed[i] = z[i] == -INFINITY ? 0.f : e[i] * d;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    st.s += e[i];
    st.t += ed[i];
  }
}

EFFBERT_HD EntropyState entropy_merge(const EntropyState& a, const EntropyState& b) {
  EntropyState r;
  r.nan = a.nan || b.nan;
  r.m = a.m > b.m ? a.m : b.m;
  r.s = 0.f;
  r.t = 0.f;
  if (a.s > 0.f) {
    const float sa = expf(a.m - r.m), da = a.m - r.m;
    r.s += sa * a.s;
    r.t += sa * (a.t + da * a.s);
  }
  if (b.s > 0.f) {
    const float sb = expf(b.m - r.m), db = b.m - r.m;
    r.s += sb * b.s;
    r.t += sb * (b.t + db * b.s);
  }
  return r;
}

// NaN for a row holding NaN or +inf, and for a row with no finite logit (the softmax is undefined there).
EFFBERT_HD float entropy_finish(const EntropyState& st) {
  if (st.nan || !(st.s > 0.f)) return NAN;
  const float h = logf(st.s) - st.t / st.s;
  return h > 0.f ? h : 0.f;  // rounding can leave -1e-7 for a one-hot row
}

}  // namespace effbert
