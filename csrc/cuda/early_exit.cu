// CUDA kernels of the early-exit family. The per-row math is entropy.h, shared with the CPU build.
//
// exit_entropy: a warp per row for short rows (exit heads: C is a handful of classes), a 512-thread block per row
// for long rows (a vocabulary row). 16-byte loads from each row's first 16-byte boundary on.
//
// exit_decision: one block for the whole step, a thread per active row (off-ramp rows are a handful of classes).
// Tiles of kDecisionThreads rows go through in order, and a block-wide scan of the keep flags gives each continuing
// row its slot, so the compacted list keeps the batch order and needs no second launch or host round trip.
#include <cuda_runtime.h>

#include <string>

#include "effbert/checks.h"
#include "effbert/entropy.h"
#include "effbert/exit_decision.h"

namespace {

constexpr int kWarp = 32;
constexpr int kShortRowMax = 2048;  // up to this many columns a warp owns the row
constexpr int kLongRowThreads = 512;
constexpr int kShortRowsPerBlock = 8;

__device__ __forceinline__ effbert::EntropyState shfl_state(const effbert::EntropyState& s, int offset) {
  effbert::EntropyState o;
  o.m = __shfl_xor_sync(0xffffffffu, s.m, offset);
  o.a = __shfl_xor_sync(0xffffffffu, s.a, offset);
  o.u = __shfl_xor_sync(0xffffffffu, s.u, offset);
  o.nan = __shfl_xor_sync(0xffffffffu, static_cast<int>(s.nan), offset) != 0;
  return o;
}

__device__ __forceinline__ effbert::EntropyState warp_merge(effbert::EntropyState s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s = effbert::entropy_merge(s, shfl_state(s, offset));
  return s;
}

// Push the elements packed in one 16-byte word as one chunk.
template <int DTYPE>
__device__ __forceinline__ void push_vec(effbert::EntropyState& st, const uint4& w) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  if constexpr (DTYPE == effbert::kFloat32) {
    float z[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) z[i] = __uint_as_float(words[i]);
    effbert::entropy_push_chunk<4>(st, z);
  } else {
    float z[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = static_cast<uint16_t>(words[i] & 0xffffu), hi = static_cast<uint16_t>(words[i] >> 16);
      z[2 * i] = DTYPE == effbert::kFloat16 ? effbert::half_bits_to_float(lo) : effbert::bf16_bits_to_float(lo);
      z[2 * i + 1] = DTYPE == effbert::kFloat16 ? effbert::half_bits_to_float(hi) : effbert::bf16_bits_to_float(hi);
    }
    effbert::entropy_push_chunk<8>(st, z);
  }
}

// One row's partial state over the columns this thread owns. Scalar loads up to the first 16-byte boundary of the
// row (rows of a [B, 30522] tensor start misaligned), 16-byte loads four at a time in flight, then a scalar tail.
template <int DTYPE>
__device__ effbert::EntropyState row_partial(const char* row, int64_t cols, int lane, int threads) {
  constexpr int kElem = DTYPE == effbert::kFloat32 ? 4 : 2;
  constexpr int kVec = 16 / kElem;
  effbert::EntropyState st = effbert::entropy_init();
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16);
  const int64_t head = min(cols, misalign == 0 ? int64_t(0) : (16 - misalign) / kElem);
  if (lane < head) effbert::entropy_push(st, effbert::load_as_float(row, DTYPE, lane));
  const int64_t n_vec = (cols - head) / kVec;
  const uint4* v = reinterpret_cast<const uint4*>(row + head * kElem);
  int64_t i = lane;
  for (; i + 3 * threads < n_vec; i += 4 * threads) {
    const uint4 a = __ldg(v + i), b = __ldg(v + i + threads), c = __ldg(v + i + 2 * threads),
                d = __ldg(v + i + 3 * threads);
    push_vec<DTYPE>(st, a);
    push_vec<DTYPE>(st, b);
    push_vec<DTYPE>(st, c);
    push_vec<DTYPE>(st, d);
  }
  for (; i < n_vec; i += threads) push_vec<DTYPE>(st, __ldg(v + i));
  for (int64_t c = head + n_vec * kVec + lane; c < cols; c += threads)
    effbert::entropy_push(st, effbert::load_as_float(row, DTYPE, c));
  return st;
}

template <int DTYPE>
__global__ void entropy_short_rows(const char* __restrict__ logits, int64_t rows, int64_t cols, int64_t row_bytes,
                                   float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kShortRowsPerBlock + threadIdx.x / kWarp;
  if (r >= rows) return;  // whole warps leave together, so the shuffles below stay full-warp
  effbert::EntropyState st = warp_merge(row_partial<DTYPE>(logits + r * row_bytes, cols, lane, kWarp));
  if (lane == 0) out[r] = effbert::entropy_finish(st);
}

template <int DTYPE>
__global__ void __launch_bounds__(kLongRowThreads) entropy_long_rows(const char* __restrict__ logits, int64_t cols,
                                                                     int64_t row_bytes,
                                                                     float* __restrict__ out) {
  __shared__ effbert::EntropyState partial[kLongRowThreads / kWarp];
  const int64_t r = blockIdx.x;
  effbert::EntropyState st =
      warp_merge(row_partial<DTYPE>(logits + r * row_bytes, cols, threadIdx.x, kLongRowThreads));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kLongRowThreads / kWarp ? partial[lane] : effbert::entropy_init();
    st = warp_merge(st);
    if (lane == 0) out[r] = effbert::entropy_finish(st);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

template <int DTYPE>
void launch_entropy(const char* logits, int64_t rows, int64_t cols, int64_t row_stride, float* out, cudaStream_t s) {
  const int64_t row_bytes = row_stride * effbert::dtype_size(DTYPE);
  if (cols <= kShortRowMax) {
    const int64_t blocks = (rows + kShortRowsPerBlock - 1) / kShortRowsPerBlock;
    effbert::require(blocks < (int64_t(1) << 31), "too many rows for one launch");
    entropy_short_rows<DTYPE><<<static_cast<unsigned>(blocks), kShortRowsPerBlock * kWarp, 0, s>>>(
        logits, rows, cols, row_bytes, out);
  } else {
    effbert::require(rows < (int64_t(1) << 31), "too many rows for one launch");
    entropy_long_rows<DTYPE><<<static_cast<unsigned>(rows), kLongRowThreads, 0, s>>>(logits, cols, row_bytes, out);
  }
  check_launch("exit_entropy");
}

[[maybe_unused]] void exit_entropy_cuda(uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out,
                       uintptr_t stream) {
  effbert::require_dtype(dtype, "logits");
  effbert::require(rows >= 0, "rows must be >= 0");
  effbert::require(cols >= 1, "cols must be >= 1");
  effbert::require(row_stride >= cols || rows <= 1, "row_stride must be >= cols");
  if (rows == 0) return;
  effbert::require(logits != 0 && out != 0, "logits and out must be non-null");
  const char* src = reinterpret_cast<const char*>(logits);
  float* dst = reinterpret_cast<float*>(out);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case effbert::kFloat32: launch_entropy<effbert::kFloat32>(src, rows, cols, row_stride, dst, s); break;
    case effbert::kFloat16: launch_entropy<effbert::kFloat16>(src, rows, cols, row_stride, dst, s); break;
    default: launch_entropy<effbert::kBFloat16>(src, rows, cols, row_stride, dst, s); break;
  }
}

// ---- the fused exit decision ----

constexpr int kDecisionThreads = 512;
constexpr int kDecisionWarps = kDecisionThreads / kWarp;

template <int DTYPE>
__global__ void __launch_bounds__(kDecisionThreads)
    exit_decision_kernel(const char* __restrict__ logits, int64_t rows, int64_t cols, int64_t row_bytes,
                         const int32_t* __restrict__ ids, float* __restrict__ prev, int32_t* __restrict__ counter,
                         char* __restrict__ out_logits, int64_t out_row_bytes, int32_t* __restrict__ out_layer,
                         int32_t* __restrict__ next_rows, int32_t* __restrict__ next_local,
                         int32_t* __restrict__ count, int32_t out_batch, int criterion, int32_t layer, float threshold,
                         int32_t patience, bool last) {
  __shared__ int32_t warp_base[kDecisionWarps];
  __shared__ int32_t tile_total;
  constexpr int kElem = DTYPE == effbert::kFloat32 ? 4 : 2;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const bool use_state = criterion >= effbert::kCritPatience;
  int32_t kept = 0;  // continuing rows in earlier tiles (the same value in every thread)
  for (int64_t r0 = 0; r0 < rows; r0 += kDecisionThreads) {
    const int64_t r = r0 + threadIdx.x;
    bool keep = false;
    const int32_t id = r < rows ? __ldg(ids + r) : -1;
    if (id >= 0 && id < out_batch) {  // an id outside the batch is skipped, never written through
      const char* row = logits + r * row_bytes;
      effbert::RowSummary s = effbert::summary_init();
      for (int64_t c = 0; c < cols; ++c)
        effbert::summary_push(s, effbert::load_as_float(row, DTYPE, c), static_cast<int32_t>(c));
      const effbert::Decision d = effbert::exit_decide(criterion, s, layer, threshold, patience,
                                                       use_state ? prev[id] : 0.f, use_state ? counter[id] : 0, last);
      if (use_state) {
        prev[id] = d.pred;
        counter[id] = d.counter;
      }
      if (d.exits) {
        char* dst = out_logits + static_cast<int64_t>(id) * out_row_bytes;
        for (int64_t c = 0; c < cols; ++c) {  // a bit copy: logits keep their dtype
          if constexpr (kElem == 4)
            reinterpret_cast<uint32_t*>(dst)[c] = reinterpret_cast<const uint32_t*>(row)[c];
          else
            reinterpret_cast<uint16_t*>(dst)[c] = reinterpret_cast<const uint16_t*>(row)[c];
        }
        out_layer[id] = layer;
      }
      keep = !d.exits;
    }
    // Block-wide exclusive scan of the keep flags: ballots within warps, then a scan of the warp totals.
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int32_t own = lane < kDecisionWarps ? warp_base[lane] : 0;
      int32_t incl = own;
#pragma unroll
      for (int off = 1; off < kWarp; off *= 2) {
        const int32_t up = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += up;
      }
      if (lane < kDecisionWarps) warp_base[lane] = incl - own;
      if (lane == kWarp - 1) tile_total = incl;
    }
    __syncthreads();
    if (keep) {
      const int32_t slot = kept + warp_base[warp] + __popc(ballot & ((1u << lane) - 1u));
      next_rows[slot] = id;
      next_local[slot] = static_cast<int32_t>(r);
    }
    kept += tile_total;
    __syncthreads();  // warp_base and tile_total are rewritten by the next tile
  }
  if (threadIdx.x == 0) *count = kept;
}

[[maybe_unused]] void exit_decision_cuda(uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                        uintptr_t row_ids, uintptr_t prev, uintptr_t counter, uintptr_t out_logits, int64_t out_batch,
                        int64_t out_stride, uintptr_t out_layer, uintptr_t next_rows, uintptr_t next_local,
                        uintptr_t count, int criterion, int32_t layer, float threshold, int32_t patience, bool last,
                        uintptr_t stream) {
  effbert::require_dtype(dtype, "logits");
  effbert::require(rows >= 0, "rows must be >= 0");
  effbert::require(cols >= 1, "cols must be >= 1");
  effbert::require(row_stride >= cols || rows <= 1, "row_stride must be >= cols");
  effbert::require(out_stride >= cols || out_batch <= 1, "out_stride must be >= cols");
  effbert::require(rows <= out_batch, "rows must be <= out_batch (the active rows are a subset of the batch)");
  effbert::require(out_batch < (int64_t(1) << 31), "out_batch must fit in int32");
  effbert::require(criterion >= effbert::kCritEntropy && criterion <= effbert::kCritPatienceRegression,
                   "criterion code must be 0..3");
  effbert::require(criterion != effbert::kCritPatienceRegression || cols == 1,
                   "the regression patience rule takes one column");
  effbert::require(layer >= 1, "layer must be >= 1");
  effbert::require(patience >= 1 || criterion < effbert::kCritPatience, "patience must be >= 1");
  effbert::require(count != 0, "count must be non-null");
  effbert::require(rows == 0 || (logits && row_ids && out_logits && out_layer && next_rows && next_local),
                   "pointers must be non-null");
  effbert::require(rows == 0 || criterion < effbert::kCritPatience || (prev && counter),
                   "prev and counter must be non-null for patience");
  // Row ids outside [0, out_batch) are skipped by the kernel: checking them here would cost a device round trip.
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t esize = effbert::dtype_size(dtype);
  auto launch = [&](auto kernel) {
    kernel<<<1, kDecisionThreads, 0, s>>>(
        reinterpret_cast<const char*>(logits), rows, cols, row_stride * esize, reinterpret_cast<const int32_t*>(row_ids),
        reinterpret_cast<float*>(prev), reinterpret_cast<int32_t*>(counter), reinterpret_cast<char*>(out_logits),
        out_stride * esize, reinterpret_cast<int32_t*>(out_layer), reinterpret_cast<int32_t*>(next_rows),
        reinterpret_cast<int32_t*>(next_local), reinterpret_cast<int32_t*>(count), static_cast<int32_t>(out_batch),
        criterion, layer, threshold,
        patience, last);
  };
  switch (dtype) {
    case effbert::kFloat32: launch(exit_decision_kernel<effbert::kFloat32>); break;
    case effbert::kFloat16: launch(exit_decision_kernel<effbert::kFloat16>); break;
    default: launch(exit_decision_kernel<effbert::kBFloat16>); break;
  }
  check_launch("exit_decision");
}

}  // namespace

// The compile report builds the kernels alone (EFFBERT_KERNELS_ONLY), without the pybind11 headers.
#ifndef EFFBERT_KERNELS_ONLY
#include "effbert/registry.h"

EFFBERT_BIND(early_exit) {
  m.def("exit_entropy", &exit_entropy_cuda, pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_stride"), pybind11::arg("out"), pybind11::arg("stream"),
        "Entropy of softmax(logits[r, :cols]) for each row r into out[r] (float32), queued on `stream`. Addresses are "
        "device pointers on the current device.");
  m.def("exit_decision", &exit_decision_cuda, pybind11::arg("logits"), pybind11::arg("dtype"), pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_stride"), pybind11::arg("row_ids"), pybind11::arg("prev"),
        pybind11::arg("counter"), pybind11::arg("out_logits"), pybind11::arg("out_batch"),
        pybind11::arg("out_stride"), pybind11::arg("out_layer"), pybind11::arg("next_rows"),
        pybind11::arg("next_local"), pybind11::arg("count"), pybind11::arg("criterion"), pybind11::arg("layer"),
        pybind11::arg("threshold"), pybind11::arg("patience"), pybind11::arg("last"), pybind11::arg("stream"),
        "One layer's exit decision in one launch (see the CPU build's docstring), queued on `stream`. Addresses are "
        "device pointers on the current device.");
}
#endif  // EFFBERT_KERNELS_ONLY
