// Token-level early exit for sequence labeling (Li et al., ACL 2021), the per-token parts shared by the CPU and CUDA
// kernels: normalised entropy of one row of logits, and the exit rule.
#pragma once
#include <cmath>
#include <cstdint>

#include "effbert/common.h"
#include "effbert/entropy.h"

namespace effbert {

// token_threshold rules; effbert/ops/token_exit.py and effbert/kernels/token_exit.py hold the same table.
enum TokenRule : int { kRuleNone = 0, kRuleAnd = 1, kRuleOr = 2 };

// H(softmax(z)) / log(C) for one row of `cols` logits stored as `dtype`; NaN where the softmax is undefined.
EFFBERT_HD float token_uncertainty(const void* row, int dtype, int64_t cols, float log_c) {
  EntropyState st = entropy_init();
  for (int64_t c = 0; c < cols; ++c) entropy_push(st, load_as_float(row, dtype, c));
  return entropy_finish(st) / log_c;
}

// What a token adds to its neighbours' window maximum: -inf when it takes no part, +inf for an undefined (NaN) u,
// so that an undefined prediction never lets its neighbours exit.
EFFBERT_HD float window_value(float u, bool takes_part) {
  if (!takes_part) return -INFINITY;
  return u != u ? INFINITY : u;
}

EFFBERT_HD bool token_exits(float u, float u_win, float threshold, int rule, float token_threshold) {
  bool exits = u_win < threshold;
  if (rule == kRuleAnd) exits = exits && u < token_threshold;
  if (rule == kRuleOr) exits = exits || u < token_threshold;
  return exits;
}

}  // namespace effbert
