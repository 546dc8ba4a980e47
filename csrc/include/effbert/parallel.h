// Host threads for the CPU kernels: fn(begin, end) over [0, n) on up to `threads` threads (the caller's
// torch.get_num_threads(), passed in from Python: a process that limits torch to one thread, or shares the machine,
// gets no more from effbert) when the work (elements touched) is large enough to pay for starting them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace effbert {

// The number of threads parallel_for starts for n items of `work` elements on at most `threads` threads.
inline int64_t parallel_threads(int64_t n, int64_t work, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>({threads, n, std::max<int64_t>(1, work >> 16)}));
}

template <typename Fn>
void parallel_for(int64_t n, int64_t work, int64_t threads, Fn fn) {
  const int64_t n_threads = parallel_threads(n, work, threads);
  if (n_threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  // the calling thread takes the first chunk: n_threads - 1 threads are started
  std::vector<std::thread> pool;
  const int64_t chunk = (n + n_threads - 1) / n_threads;
  for (int64_t b = chunk; b < n; b += chunk) pool.emplace_back(fn, b, std::min(n, b + chunk));
  fn(int64_t(0), std::min(n, chunk));
  for (auto& t : pool) t.join();
}

}  // namespace effbert
