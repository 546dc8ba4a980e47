// Defensive checks at the binding boundary. The Python wrappers validate first; these catch direct misuse of the
// extension and raise ValueError (pybind11 maps std::invalid_argument) instead of touching bad memory.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace effbert {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// For checks inside loops: `if (!ok) fail(...)` builds the message only on failure (require's argument is built on
// every call, which costs more than the kernel for a small input).
[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline void require_dtype(int dtype, const char* arg) {
  require(dtype >= 0 && dtype <= 2, std::string(arg) + ": dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                        std::to_string(dtype));
}

}  // namespace effbert
