// Host threads for the CPU kernels: fn(begin, end) over [0, n) on up to hardware_threads() threads when the work
// (elements touched) is large enough to pay for starting them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace effbert {

// std::thread::hardware_concurrency asks the kernel (~10 us): once per process.
inline int64_t hardware_threads() {
  static const int64_t n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

template <typename Fn>
void parallel_for(int64_t n, int64_t work, Fn fn) {
  const int64_t n_threads = std::min<int64_t>({hardware_threads(), n, std::max<int64_t>(1, work >> 16)});
  if (n_threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + n_threads - 1) / n_threads;
  for (int64_t b = 0; b < n; b += chunk) pool.emplace_back(fn, b, std::min(n, b + chunk));
  for (auto& t : pool) t.join();
}

}  // namespace effbert
