// CPU kernel of token-level early exit: sequences split across threads; per sequence, every token's normalised
// entropy, then each token's window maximum and its exit decision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "effbert/checks.h"
#include "effbert/parallel.h"
#include "effbert/registry.h"
#include "effbert/token_exit.h"

namespace {

struct TokenExitArgs {
  uintptr_t logits;
  int dtype;
  int64_t total, cols, row_stride;
  uintptr_t cu_seqlens;
  int64_t num_seqs;
  uintptr_t active, exit_layer, keep;  // keep may be 0: first and last token of each sequence
  uintptr_t active_out, exit_layer_out, u_out;
  float threshold;
  int64_t window;
  float token_threshold;
  int rule;
  int32_t layer;
  bool exclude_exited;
};

void token_exit_cpu(const TokenExitArgs& a, int64_t threads) {
  const auto* cu = reinterpret_cast<const int32_t*>(a.cu_seqlens);
  const auto* active = reinterpret_cast<const bool*>(a.active);
  const auto* keep = reinterpret_cast<const bool*>(a.keep);
  const auto* layer_in = reinterpret_cast<const int32_t*>(a.exit_layer);
  auto* active_out = reinterpret_cast<bool*>(a.active_out);
  auto* layer_out = reinterpret_cast<int32_t*>(a.exit_layer_out);
  auto* u = reinterpret_cast<float*>(a.u_out);
  const auto* base = reinterpret_cast<const char*>(a.logits);
  const int64_t elem = effbert::dtype_size(a.dtype);
  const float log_c = std::log(static_cast<float>(a.cols));
  const int64_t half = a.window / 2;
  effbert::parallel_for(a.num_seqs, a.total * a.cols, threads, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      // offsets bounded by the token count: unchecked offsets give wrong numbers, never accesses outside
      const int64_t start = std::min<int64_t>(std::max<int64_t>(cu[s], 0), a.total);
      const int64_t end = std::min<int64_t>(std::max<int64_t>(cu[s + 1], start), a.total);
      for (int64_t t = start; t < end; ++t)
        u[t] = effbert::token_uncertainty(base + t * a.row_stride * elem, a.dtype, a.cols, log_c);
      auto kept = [&](int64_t t) { return keep ? keep[t] : (t == start || t == end - 1); };
      auto value = [&](int64_t t) {
        return effbert::window_value(u[t], !kept(t) && (!a.exclude_exited || active[t]));
      };
      for (int64_t t = start; t < end; ++t) {
        bool exits = false;
        if (active[t] && !kept(t)) {
          float u_win = -INFINITY;
          const int64_t lo = std::max(start, t - half), hi = std::min(end - 1, t + half);
          for (int64_t j = lo; j <= hi; ++j) u_win = std::max(u_win, value(j));
          exits = effbert::token_exits(u[t], u_win, a.threshold, a.rule, a.token_threshold);
        }
        active_out[t] = active[t] && !exits;
        layer_out[t] = exits ? a.layer : layer_in[t];
      }
    }
  });
}

}  // namespace

EFFBERT_BIND(token_exit) {
  m.def(
      "token_exit_decision",
      [](uintptr_t logits, int dtype, int64_t total, int64_t cols, int64_t row_stride, uintptr_t cu_seqlens,
         int64_t num_seqs, uintptr_t active, uintptr_t exit_layer, uintptr_t keep, uintptr_t active_out,
         uintptr_t exit_layer_out, uintptr_t u_out, float threshold, int64_t window, float token_threshold, int rule,
         int32_t layer, bool exclude_exited, int64_t threads) {
        effbert::require_dtype(dtype, "logits");
        effbert::require(total >= 0 && cols >= 2 && row_stride >= cols && num_seqs >= 0,
                         "token_exit_decision: need total >= 0, cols >= 2, row_stride >= cols, num_seqs >= 0");
        effbert::require(window >= 1 && window % 2 == 1, "window must be odd and >= 1, got " + std::to_string(window));
        effbert::require(rule >= 0 && rule <= 2, "rule must be 0, 1 or 2, got " + std::to_string(rule));
        pybind11::gil_scoped_release release;
        token_exit_cpu(TokenExitArgs{logits, dtype, total, cols, row_stride, cu_seqlens, num_seqs, active,
                                     exit_layer, keep, active_out, exit_layer_out, u_out, threshold, window,
                                     token_threshold, rule, layer, exclude_exited},
                       threads);
      },
      pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("total"), pybind11::arg("cols"),
      pybind11::arg("row_stride"), pybind11::arg("cu_seqlens"), pybind11::arg("num_seqs"), pybind11::arg("active"),
      pybind11::arg("exit_layer"), pybind11::arg("keep"), pybind11::arg("active_out"),
      pybind11::arg("exit_layer_out"), pybind11::arg("u_out"), pybind11::arg("threshold"), pybind11::arg("window"),
      pybind11::arg("token_threshold"), pybind11::arg("rule"), pybind11::arg("layer"),
      pybind11::arg("exclude_exited"), pybind11::arg("threads"),
      "One layer's token-level exit decision over packed tokens (int32 cu_seqlens, bool masks, int32 exit layers, "
      "float32 u). keep = 0: the first and last token of each sequence are kept. Addresses are host pointers.");
}
