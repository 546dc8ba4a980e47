// CUDA kernel of token-level early exit (Li et al., ACL 2021). The per-token math is token_exit.h, shared with the
// CPU build.
//
// One block per (sequence, run of kThreads positions), one launch: the block computes the uncertainty of its
// positions and of `half` positions of halo on each side into shared memory (a thread per row: sequence labeling
// has a handful of classes), then each thread takes the window maximum of its own position from shared memory and
// decides. Offsets are clamped to the token count, so unchecked offsets never make a thread read outside a buffer.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "effbert/checks.h"
#include "effbert/token_exit.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxWindow = 1025;  // shared memory: 2 * (kThreads + window - 1) floats

__global__ void token_exit_kernel(const char* __restrict__ logits, int dtype, int64_t total, int64_t cols,
                                  int64_t row_bytes, const int32_t* __restrict__ cu_seqlens,
                                  const bool* __restrict__ active, const int32_t* __restrict__ layer_in,
                                  const bool* __restrict__ keep, bool* __restrict__ active_out,
                                  int32_t* __restrict__ layer_out, float* __restrict__ u_out, float log_c,
                                  float threshold, int half, float token_threshold, int rule, int32_t layer,
                                  bool exclude_exited) {
  extern __shared__ float shared[];
  const int ext = kThreads + 2 * half;
  float* u_s = shared;         // u of each position of the block, halo included
  float* value_s = shared + ext;  // what it adds to its neighbours' window maximum
  const int64_t seq = blockIdx.x;
  const int64_t start = min(max(static_cast<int64_t>(cu_seqlens[seq]), int64_t(0)), total);
  const int64_t end = min(max(static_cast<int64_t>(cu_seqlens[seq + 1]), start), total);
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads - half;  // position of shared slot 0
  for (int i = threadIdx.x; i < ext; i += kThreads) {
    const int64_t pos = first + i, t = start + pos;
    float u = NAN, value = -INFINITY;
    if (pos >= 0 && t < end) {
      u = effbert::token_uncertainty(logits + t * row_bytes, dtype, cols, log_c);
      const bool kept = keep ? keep[t] : (pos == 0 || t == end - 1);
      value = effbert::window_value(u, !kept && (!exclude_exited || active[t]));
    }
    u_s[i] = u;
    value_s[i] = value;
  }
  __syncthreads();
  const int k = threadIdx.x + half;
  const int64_t pos = first + k, t = start + pos;
  if (t >= end) return;
  const bool kept = keep ? keep[t] : (pos == 0 || t == end - 1);
  bool exits = false;
  if (active[t] && !kept) {
    float u_win = -INFINITY;
    for (int j = k - half; j <= k + half; ++j) u_win = fmaxf(u_win, value_s[j]);  // -inf past the sequence
    exits = effbert::token_exits(u_s[k], u_win, threshold, rule, token_threshold);
  }
  u_out[t] = u_s[k];
  active_out[t] = active[t] && !exits;
  layer_out[t] = exits ? layer : layer_in[t];
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

[[maybe_unused]] void token_exit_cuda(uintptr_t logits, int dtype, int64_t total, int64_t cols, int64_t row_stride,
                                      uintptr_t cu_seqlens, int64_t num_seqs, int64_t max_seqlen, uintptr_t active,
                                      uintptr_t exit_layer, uintptr_t keep, uintptr_t active_out,
                                      uintptr_t exit_layer_out, uintptr_t u_out, float threshold, int64_t window,
                                      float token_threshold, int rule, int32_t layer, bool exclude_exited,
                                      uintptr_t stream) {
  effbert::require_dtype(dtype, "logits");
  effbert::require(total >= 0 && cols >= 2 && row_stride >= cols && num_seqs >= 0 && max_seqlen >= 0,
                   "token_exit_decision: need total >= 0, cols >= 2, row_stride >= cols, num_seqs >= 0, "
                   "max_seqlen >= 0");
  effbert::require(window >= 1 && window % 2 == 1 && window <= kMaxWindow,
                   "window must be odd, >= 1 and <= " + std::to_string(kMaxWindow) + ", got " + std::to_string(window));
  effbert::require(rule >= 0 && rule <= 2, "rule must be 0, 1 or 2, got " + std::to_string(rule));
  effbert::require(num_seqs < (int64_t(1) << 31), "too many sequences for one launch");
  const int64_t blocks_per_seq = (max_seqlen + kThreads - 1) / kThreads;
  effbert::require(blocks_per_seq <= 65535, "max_seqlen too large for one launch (at most 65535 * 256)");
  if (total == 0 || num_seqs == 0 || max_seqlen == 0) return;
  const int half = static_cast<int>(window / 2);
  const size_t smem = 2 * sizeof(float) * (kThreads + 2 * half);
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(blocks_per_seq));
  token_exit_kernel<<<grid, kThreads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const char*>(logits), dtype, total, cols, row_stride * effbert::dtype_size(dtype),
      reinterpret_cast<const int32_t*>(cu_seqlens), reinterpret_cast<const bool*>(active),
      reinterpret_cast<const int32_t*>(exit_layer), reinterpret_cast<const bool*>(keep),
      reinterpret_cast<bool*>(active_out), reinterpret_cast<int32_t*>(exit_layer_out),
      reinterpret_cast<float*>(u_out), logf(static_cast<float>(cols)), threshold, half, token_threshold, rule, layer,
      exclude_exited);
  check_launch("token_exit_decision");
}

}  // namespace

// The compile report builds the kernels alone (EFFBERT_KERNELS_ONLY), without the pybind11 headers.
#ifndef EFFBERT_KERNELS_ONLY
#include "effbert/registry.h"

EFFBERT_BIND(token_exit) {
  m.def("token_exit_decision", &token_exit_cuda, pybind11::arg("logits"), pybind11::arg("dtype"),
        pybind11::arg("total"), pybind11::arg("cols"), pybind11::arg("row_stride"), pybind11::arg("cu_seqlens"),
        pybind11::arg("num_seqs"), pybind11::arg("max_seqlen"), pybind11::arg("active"), pybind11::arg("exit_layer"),
        pybind11::arg("keep"), pybind11::arg("active_out"), pybind11::arg("exit_layer_out"), pybind11::arg("u_out"),
        pybind11::arg("threshold"), pybind11::arg("window"), pybind11::arg("token_threshold"), pybind11::arg("rule"),
        pybind11::arg("layer"), pybind11::arg("exclude_exited"), pybind11::arg("stream"),
        "One layer's token-level exit decision over packed tokens (see the CPU build's docstring), queued on "
        "`stream`. Addresses are device pointers on the current device.");
}
#endif  // EFFBERT_KERNELS_ONLY
