// The extension module; EFFBERT_MODULE_NAME is _C for the CPU build and _cuda for the CUDA build (set by setup.py).
#include "effbert/registry.h"

PYBIND11_MODULE(EFFBERT_MODULE_NAME, m) {
  m.doc() = "effbert native kernels (raw pointers, sizes, strides and dtype codes; no torch headers)";
  pybind11::list families;
  for (auto& entry : effbert::binders()) {
    entry.second(m);
    families.append(entry.first);
  }
  m.attr("families") = families;
}
