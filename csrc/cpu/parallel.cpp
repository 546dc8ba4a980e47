// A probe of the CPU kernels' threading (effbert/parallel.h), for tests: how many distinct threads ran the chunks
// of a parallel_for over n items of `work` elements when the caller allows `threads`.
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>

#include "effbert/checks.h"
#include "effbert/parallel.h"
#include "effbert/registry.h"

EFFBERT_BIND(parallel) {
  m.def(
      "parallel_threads_used",
      [](int64_t n, int64_t work, int64_t threads) {
        effbert::require(n >= 1 && work >= 0 && threads >= 1, "n and threads must be >= 1, work >= 0");
        std::mutex lock;
        std::set<std::thread::id> ids;
        pybind11::gil_scoped_release release;
        effbert::parallel_for(n, work, threads, [&](int64_t, int64_t) {
          std::lock_guard<std::mutex> guard(lock);
          ids.insert(std::this_thread::get_id());
        });
        return static_cast<int64_t>(ids.size());
      },
      pybind11::arg("n"), pybind11::arg("work"), pybind11::arg("threads"),
      "The number of distinct threads that run a parallel_for of the CPU kernels over n items of `work` elements "
      "when `threads` are allowed (a test probe).");
}
