// Per-row early-exit decision, shared by the CPU and CUDA kernels (DESIGN.md, "Early exit").
//
// One pass over a row's off-ramp logits gives its softmax entropy state (entropy.h), its maximum and the first
// index holding it (the argmax). From that summary and the row's patience state, exit_decide says whether the
// sample leaves the batch at this layer and what its patience state becomes.
#pragma once
#include <cmath>
#include <cstdint>

#include "effbert/entropy.h"

namespace effbert {

// Criterion codes; effbert/ops/early_exit.py holds the same table.
enum Criterion : int { kCritEntropy = 0, kCritMaxProb = 1, kCritPatience = 2, kCritPatienceRegression = 3 };

struct RowSummary {
  EntropyState ent;
  float best;      // largest logit seen (NaN never wins a comparison, so it never becomes `best`)
  int32_t argmax;  // first column holding `best`
  float first;     // column 0: the prediction of a one-column regression head
};

EFFBERT_HD RowSummary summary_init() { return RowSummary{entropy_init(), -INFINITY, 0, 0.f}; }

EFFBERT_HD void summary_push(RowSummary& s, float z, int32_t col) {
  entropy_push(s.ent, z);
  if (col == 0) s.first = z;
  if (z > s.best) {  // strict: ties keep the first column, as torch.argmax does
    s.best = z;
    s.argmax = col;
  }
}

struct Decision {
  bool exits;
  float pred;       // the prediction the next layer compares against (NaN when undefined)
  int32_t counter;  // patience counter after this layer
};

// A prediction is undefined for a row holding NaN or +inf or no finite logit (classification), or a non-finite
// value (regression). Such a row never exits early and breaks a patience streak.
EFFBERT_HD bool summary_undefined(const RowSummary& s, int criterion) {
  if (criterion == kCritPatienceRegression) return !(fabsf(s.first) < INFINITY);
  return s.ent.nan || entropy_empty(s.ent);
}

EFFBERT_HD Decision exit_decide(int criterion, const RowSummary& s, int32_t layer, float threshold,
                                int32_t patience, float prev, int32_t counter, bool last) {
  const bool undefined = summary_undefined(s, criterion);
  Decision d{false, NAN, 0};
  if (criterion == kCritEntropy) {
    d.exits = entropy_finish(s.ent) < threshold;  // NaN compares false
  } else if (criterion == kCritMaxProb) {
    d.exits = !undefined && 1.f / entropy_denominator(s.ent) >= threshold;  // the largest probability is 1 / S
  } else {
    const float pred = criterion == kCritPatienceRegression ? s.first : static_cast<float>(s.argmax);
    d.pred = undefined ? NAN : pred;
    // NaN on either side (an undefined row now or at the previous layer) compares false and resets the counter.
    const bool same = layer > 1 && (criterion == kCritPatienceRegression ? fabsf(d.pred - prev) < threshold
                                                                         : d.pred == prev);
    d.counter = same ? counter + 1 : 0;
    d.exits = d.counter >= patience;
  }
  d.exits = (d.exits && !undefined) || last;
  return d;
}

}  // namespace effbert
