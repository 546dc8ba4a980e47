// CUDA kernels of the TNF family. The math is notes.h, shared with the CPU build.
//
// note_mix: a warp per token, 16-byte loads and stores where the layout allows.
// note_update_: a check kernel (first bad row -> flag), then window means (a block per sequence, a thread per 16
// bytes of columns walking the sequence's sorted window boundaries with a running prefix sum), then the ordered fold
// (a block per slot segment). Both update passes read the flag first and do nothing when a row was bad, so a bad
// call never writes outside `notes` and leaves it unchanged; the wrapper reads the flag back and raises.
#include <cuda_runtime.h>

#include <string>

#include "effbert/checks.h"
#include "effbert/notes.h"

namespace {

constexpr int kWarp = 32;
constexpr int kMixTokensPerBlock = 8;
constexpr int kMeansThreads = 128;
constexpr int kFoldThreads = 128;
constexpr int kCheckThreads = 256;

template <int DTYPE>
__host__ __device__ constexpr int vec_elems() {
  return DTYPE == effbert::kFloat32 ? 4 : 8;
}

// 16 bytes of a row of DTYPE as floats.
template <int DTYPE>
__device__ __forceinline__ void unpack(const uint4& w, float (&out)[vec_elems<DTYPE>()]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  if constexpr (DTYPE == effbert::kFloat32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(words[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = static_cast<uint16_t>(words[i] & 0xffffu), hi = static_cast<uint16_t>(words[i] >> 16);
      out[2 * i] = DTYPE == effbert::kFloat16 ? effbert::half_bits_to_float(lo) : effbert::bf16_bits_to_float(lo);
      out[2 * i + 1] = DTYPE == effbert::kFloat16 ? effbert::half_bits_to_float(hi) : effbert::bf16_bits_to_float(hi);
    }
  }
}

template <int DTYPE>
__device__ __forceinline__ uint4 pack(const float (&v)[vec_elems<DTYPE>()]) {
  uint32_t words[4];
  if constexpr (DTYPE == effbert::kFloat32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = __float_as_uint(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = DTYPE == effbert::kFloat16 ? effbert::float_to_half_bits(v[2 * i])
                                                     : effbert::float_to_bf16_bits(v[2 * i]);
      const uint32_t hi = DTYPE == effbert::kFloat16 ? effbert::float_to_half_bits(v[2 * i + 1])
                                                     : effbert::float_to_bf16_bits(v[2 * i + 1]);
      words[i] = lo | (hi << 16);
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

template <int DTYPE, bool HAS_NOTES, bool VEC>
__global__ void note_mix_kernel(const char* __restrict__ x, int64_t tokens, int64_t dim, int64_t stride_x,
                                const float* __restrict__ notes, int64_t num_slots, const int64_t* __restrict__ slots,
                                float lam, char* __restrict__ out, int64_t stride_out) {
  constexpr int es = DTYPE == effbert::kFloat32 ? 4 : 2;
  constexpr int V = vec_elems<DTYPE>();
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kMixTokensPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const char* xr = x + t * stride_x * es;
  char* orow = out + t * stride_out * es;
  const int64_t slot = slots[t];
  const bool rare = slot >= 0;
  const bool valid = rare && (!HAS_NOTES || slot < num_slots);  // the wrapper rejects slots >= num_slots; never read past notes
  const float* note = HAS_NOTES && valid ? notes + slot * dim : nullptr;
  if constexpr (VEC) {
    for (int64_t c = static_cast<int64_t>(lane) * V; c < dim; c += kWarp * V) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(xr + c * es));
      if (!rare) {  // a copy: no conversion, bit for bit
        *reinterpret_cast<uint4*>(orow + c * es) = w;
        continue;
      }
      float v[V], n[V];
      unpack<DTYPE>(w, v);
#pragma unroll
      for (int k = 0; k < V; k += 4) {  // note rows are 16-byte aligned here (dim % V == 0, notes aligned)
        const float4 q = note ? __ldg(reinterpret_cast<const float4*>(note + c + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
        n[k] = q.x, n[k + 1] = q.y, n[k + 2] = q.z, n[k + 3] = q.w;
      }
#pragma unroll
      for (int k = 0; k < V; ++k)
        v[k] = !valid ? NAN : (HAS_NOTES ? effbert::note_mix_value(v[k], n[k], lam) : (1.f - lam) * v[k]);
      *reinterpret_cast<uint4*>(orow + c * es) = pack<DTYPE>(v);
    }
  } else {
    for (int64_t c = lane; c < dim; c += kWarp) {
      const float xv = effbert::load_as_float(xr, DTYPE, c);
      float y = xv;
      if (rare) {
        const float n = note ? __ldg(note + c) : 0.f;
        y = !valid ? NAN : (HAS_NOTES ? effbert::note_mix_value(xv, n, lam) : (1.f - lam) * xv);
      }
      effbert::store_from_float(orow, DTYPE, c, y);
    }
  }
}

// Also writes the window boundaries' sort keys when `keys` is given: b * (seq + 1) + lo at keys[r], the hi one at
// keys[rows + r] (garbage for a bad row, which the flag makes unused).
__global__ void note_check_rows_kernel(const int64_t* __restrict__ spans, const int64_t* __restrict__ lengths,
                                       int* __restrict__ flag, int64_t* __restrict__ keys, int64_t rows, int64_t batch,
                                       int64_t seq, int64_t num_slots, int64_t window, bool check_spans,
                                       bool check_slots) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCheckThreads + threadIdx.x;
  if (r >= rows) return;
  const int64_t* row = spans + 4 * r;
  const int problem = effbert::note_row_problem(row, lengths, batch, seq, num_slots, check_spans, check_slots);
  if (problem != 0) atomicMin(flag, static_cast<int>(r));
  if (keys && check_spans) {
    const int64_t b = row[0];
    const int64_t length = problem == 0 ? lengths[b] : 0;  // never read lengths at a bad batch index
    const effbert::NoteWindow w = effbert::note_window(row, length, window);
    keys[r] = b * (seq + 1) + w.lo;
    keys[rows + r] = b * (seq + 1) + w.hi;
  }
}

template <int DTYPE, int V>
__global__ void __launch_bounds__(kMeansThreads)
    note_window_means_kernel(const char* __restrict__ hidden, int64_t seq, int64_t dim, int64_t stride_b,
                             int64_t stride_n, const int64_t* __restrict__ spans, const int64_t* __restrict__ lengths,
                             int64_t window, const int64_t* __restrict__ ev_off, const int64_t* __restrict__ ev_idx,
                             const int* __restrict__ flag, int64_t rows, float* __restrict__ means) {
  constexpr int es = DTYPE == effbert::kFloat32 ? 4 : 2;
  if (*flag < rows) return;
  const int64_t b = blockIdx.x;
  const int64_t d = (static_cast<int64_t>(blockIdx.y) * kMeansThreads + threadIdx.x) * V;
  if (d >= dim) return;
  const int64_t e0 = ev_off[b], e1 = ev_off[b + 1];
  const char* base = hidden + b * stride_b * es;
  auto load = [&](int64_t t, int64_t c, float (&h)[V]) {
    if constexpr (V == vec_elems<DTYPE>()) {
      unpack<DTYPE>(__ldg(reinterpret_cast<const uint4*>(base + (t * stride_n + c) * es)), h);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) h[k] = effbert::load_as_float(base, DTYPE, t * stride_n + c + k);
    }
  };
  effbert::note_window_walk<V>(load, seq, lengths[b], window, d, dim, spans, rows, ev_idx, e0, e1, means);
}

// A block per sorted row; only the first row of each slot segment works. Every thread reads the count before
// thread 0 writes it (the barrier between), so the block owns note row and count alone.
template <int V>
__global__ void __launch_bounds__(kFoldThreads)
    note_fold_kernel(float* __restrict__ notes, int64_t* __restrict__ counts, int64_t num_slots, int64_t dim,
                     const float* __restrict__ means, const int64_t* __restrict__ order,
                     const int64_t* __restrict__ sorted_slots, const int* __restrict__ flag, int64_t rows,
                     float gamma) {
  if (*flag < rows) return;
  const int64_t i = blockIdx.x;
  const int64_t slot = sorted_slots[i];
  if (slot < 0 || slot >= num_slots) return;  // the check kernel already stopped this call
  const int64_t m = effbert::note_segment_length(sorted_slots, i, rows);
  if (m == 0) return;  // not a segment head: the whole block leaves together
  const int64_t n = counts[slot];
  float* row = notes + slot * dim;
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * V; d < dim; d += kFoldThreads * V)
    effbert::note_fold_segment<V>(row, means, order, i, m, n, gamma, d, dim);
  __syncthreads();
  if (threadIdx.x == 0) counts[slot] = n + m;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int DTYPE, bool HAS_NOTES>
void launch_mix(const char* x, int64_t tokens, int64_t dim, int64_t stride_x, const float* notes, int64_t num_slots,
                const int64_t* slots, float lam, char* out, int64_t stride_out, cudaStream_t s) {
  constexpr int V = vec_elems<DTYPE>();
  const int64_t blocks = (tokens + kMixTokensPerBlock - 1) / kMixTokensPerBlock;
  effbert::require(blocks < (int64_t(1) << 31), "too many tokens for one launch");
  const bool vec = dim % V == 0 && stride_x % V == 0 && stride_out % V == 0 && aligned16(x) && aligned16(out) &&
                   (!HAS_NOTES || aligned16(notes));
  const dim3 grid(static_cast<unsigned>(blocks)), block(kMixTokensPerBlock * kWarp);
  if (vec)
    note_mix_kernel<DTYPE, HAS_NOTES, true><<<grid, block, 0, s>>>(x, tokens, dim, stride_x, notes, num_slots, slots,
                                                                    lam, out, stride_out);
  else
    note_mix_kernel<DTYPE, HAS_NOTES, false><<<grid, block, 0, s>>>(x, tokens, dim, stride_x, notes, num_slots,
                                                                     slots, lam, out, stride_out);
  check_launch("note_mix");
}

[[maybe_unused]] void note_mix_cuda(uintptr_t x, int dtype, int64_t tokens, int64_t dim, int64_t stride_x,
                                    uintptr_t notes, int64_t num_slots, uintptr_t slots, float lam, uintptr_t out,
                                    int64_t stride_out, uintptr_t stream) {
  effbert::require_dtype(dtype, "x");
  effbert::require(tokens >= 0 && dim >= 0 && num_slots >= 0, "tokens, dim and num_slots must be >= 0");
  effbert::require(tokens <= 1 || (stride_x >= dim && stride_out >= dim), "row strides must be >= dim");
  if (tokens == 0 || dim == 0) return;
  effbert::require(x != 0 && slots != 0 && out != 0, "x, slots and out must be non-null");
  const char* xp = reinterpret_cast<const char*>(x);
  char* op = reinterpret_cast<char*>(out);
  const float* np = reinterpret_cast<const float*>(notes);
  const int64_t* sp = reinterpret_cast<const int64_t*>(slots);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
#define EFFBERT_MIX(DT)                                                                             \
  (notes ? launch_mix<DT, true>(xp, tokens, dim, stride_x, np, num_slots, sp, lam, op, stride_out, s) \
         : launch_mix<DT, false>(xp, tokens, dim, stride_x, np, num_slots, sp, lam, op, stride_out, s))
  switch (dtype) {
    case effbert::kFloat32: EFFBERT_MIX(effbert::kFloat32); break;
    case effbert::kFloat16: EFFBERT_MIX(effbert::kFloat16); break;
    default: EFFBERT_MIX(effbert::kBFloat16); break;
  }
#undef EFFBERT_MIX
}

[[maybe_unused]] void note_check_rows_cuda(uintptr_t spans, uintptr_t lengths, uintptr_t flag, uintptr_t keys,
                                           int64_t rows, int64_t batch, int64_t seq, int64_t num_slots,
                                           int64_t window, bool check_spans, bool check_slots, uintptr_t stream) {
  effbert::require(rows >= 0 && rows < (int64_t(1) << 31), "rows must be in [0, 2^31)");
  if (rows == 0) return;
  effbert::require(spans != 0 && flag != 0, "spans and flag must be non-null");
  effbert::require(!check_spans || lengths != 0, "lengths must be non-null when spans are checked");
  const int64_t blocks = (rows + kCheckThreads - 1) / kCheckThreads;
  note_check_rows_kernel<<<static_cast<unsigned>(blocks), kCheckThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const int64_t*>(spans), reinterpret_cast<const int64_t*>(lengths),
      reinterpret_cast<int*>(flag), reinterpret_cast<int64_t*>(keys), rows, batch, seq, num_slots, window,
      check_spans, check_slots);
  check_launch("note_check_rows");
}

template <int DTYPE, int V>
void launch_means(const char* h, int64_t batch, int64_t seq, int64_t dim, int64_t stride_b, int64_t stride_n,
                  const int64_t* spans, const int64_t* lengths, int64_t window, const int64_t* off,
                  const int64_t* idx, const int* flag, int64_t rows, float* means, cudaStream_t s) {
  const int64_t col_blocks = (dim + int64_t(kMeansThreads) * V - 1) / (int64_t(kMeansThreads) * V);
  effbert::require(batch < (int64_t(1) << 31) && col_blocks < 65536, "too many sequences or columns for one launch");
  note_window_means_kernel<DTYPE, V><<<dim3(static_cast<unsigned>(batch), static_cast<unsigned>(col_blocks)),
                                       kMeansThreads, 0, s>>>(h, seq, dim, stride_b, stride_n, spans, lengths, window,
                                                              off, idx, flag, rows, means);
  check_launch("note_window_means");
}

[[maybe_unused]] void note_window_means_cuda(uintptr_t hidden, int dtype, int64_t batch, int64_t seq, int64_t dim,
                                             int64_t stride_b, int64_t stride_n, uintptr_t spans, uintptr_t lengths,
                                             int64_t window, uintptr_t ev_off, uintptr_t ev_idx, uintptr_t flag,
                                             int64_t rows, uintptr_t means, uintptr_t stream) {
  effbert::require_dtype(dtype, "hidden");
  effbert::require(batch >= 0 && seq >= 0 && dim >= 0 && rows >= 0 && window >= 0, "sizes must be >= 0");
  if (rows == 0 || dim == 0 || batch == 0) return;
  effbert::require(hidden != 0 && spans != 0 && lengths != 0 && ev_off != 0 && ev_idx != 0 && flag != 0 && means != 0,
                   "pointers must be non-null (flag included: the check kernel's result)");
  const char* h = reinterpret_cast<const char*>(hidden);
  const auto* sp = reinterpret_cast<const int64_t*>(spans);
  const auto* len = reinterpret_cast<const int64_t*>(lengths);
  const auto* off = reinterpret_cast<const int64_t*>(ev_off);
  const auto* idx = reinterpret_cast<const int64_t*>(ev_idx);
  const auto* fl = reinterpret_cast<const int*>(flag);
  auto* out = reinterpret_cast<float*>(means);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  window = window < seq ? window : seq;
  const int es = effbert::dtype_size(dtype), V = 16 / es;
  // 16-byte loads when every row start is 16-byte aligned.
  const bool vec = dim % V == 0 && stride_b % V == 0 && stride_n % V == 0 && aligned16(h);
#define EFFBERT_MEANS(DT, VV) \
  launch_means<DT, VV>(h, batch, seq, dim, stride_b, stride_n, sp, len, window, off, idx, fl, rows, out, s)
  switch (dtype) {
    case effbert::kFloat32: vec ? EFFBERT_MEANS(effbert::kFloat32, 4) : EFFBERT_MEANS(effbert::kFloat32, 1); break;
    case effbert::kFloat16: vec ? EFFBERT_MEANS(effbert::kFloat16, 8) : EFFBERT_MEANS(effbert::kFloat16, 1); break;
    default: vec ? EFFBERT_MEANS(effbert::kBFloat16, 8) : EFFBERT_MEANS(effbert::kBFloat16, 1); break;
  }
#undef EFFBERT_MEANS
}

[[maybe_unused]] void note_fold_cuda(uintptr_t notes, uintptr_t counts, int64_t num_slots, int64_t dim,
                                     uintptr_t means, uintptr_t order, uintptr_t sorted_slots, uintptr_t flag,
                                     int64_t rows, float gamma, uintptr_t stream) {
  effbert::require(num_slots >= 0 && dim >= 0 && rows >= 0, "sizes must be >= 0");
  if (rows == 0 || dim == 0) return;
  effbert::require(rows < (int64_t(1) << 31), "too many rows for one launch");
  effbert::require(notes != 0 && counts != 0 && means != 0 && order != 0 && sorted_slots != 0 && flag != 0,
                   "pointers must be non-null (flag included: the check kernel's result)");
  auto* np = reinterpret_cast<float*>(notes);
  auto* cp = reinterpret_cast<int64_t*>(counts);
  const auto* mp = reinterpret_cast<const float*>(means);
  const auto* ord = reinterpret_cast<const int64_t*>(order);
  const auto* ss = reinterpret_cast<const int64_t*>(sorted_slots);
  const auto* fl = reinterpret_cast<const int*>(flag);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(rows);
  if (dim % 4 == 0 && aligned16(np) && aligned16(mp))
    note_fold_kernel<4><<<grid, kFoldThreads, 0, s>>>(np, cp, num_slots, dim, mp, ord, ss, fl, rows, gamma);
  else
    note_fold_kernel<1><<<grid, kFoldThreads, 0, s>>>(np, cp, num_slots, dim, mp, ord, ss, fl, rows, gamma);
  check_launch("note_fold");
}

}  // namespace

#ifndef EFFBERT_KERNELS_ONLY
#include "effbert/registry.h"

EFFBERT_BIND(notes) {
  namespace py = pybind11;
  m.def("note_mix", &note_mix_cuda, py::arg("x"), py::arg("dtype"), py::arg("tokens"), py::arg("dim"),
        py::arg("stride_x"), py::arg("notes"), py::arg("num_slots"), py::arg("slots"), py::arg("lam"), py::arg("out"),
        py::arg("stride_out"), py::arg("stream"),
        "out[t] = x[t] where slots[t] < 0, else (1 - lam) x[t] + lam notes[slots[t]] (notes = 0: (1 - lam) x[t]), "
        "queued on `stream`. Device pointers.");
  m.def("note_check_rows", &note_check_rows_cuda, py::arg("spans"), py::arg("lengths"), py::arg("flag"),
        py::arg("keys"), py::arg("rows"), py::arg("batch"), py::arg("seq"), py::arg("num_slots"), py::arg("window"),
        py::arg("check_spans"), py::arg("check_slots"), py::arg("stream"),
        "flag = min(flag, first span row out of range); the update passes do nothing when flag < rows. With keys "
        "(else 0): the window boundaries' sort keys too.");
  m.def("note_window_means", &note_window_means_cuda, py::arg("hidden"), py::arg("dtype"), py::arg("batch"),
        py::arg("seq"), py::arg("dim"), py::arg("stride_b"), py::arg("stride_n"), py::arg("spans"),
        py::arg("lengths"), py::arg("window"), py::arg("ev_off"), py::arg("ev_idx"), py::arg("flag"), py::arg("rows"),
        py::arg("means"), py::arg("stream"),
        "Window means of span rows into float32 means[rows, dim], queued on `stream`.");
  m.def("note_fold", &note_fold_cuda, py::arg("notes"), py::arg("counts"), py::arg("num_slots"), py::arg("dim"),
        py::arg("means"), py::arg("order"), py::arg("sorted_slots"), py::arg("flag"), py::arg("rows"),
        py::arg("gamma"), py::arg("stream"),
        "Ordered EMA fold of means rows into notes, a block per slot segment, queued on `stream`.");
}
#endif  // EFFBERT_KERNELS_ONLY
