// Each op family's source registers its bindings here, so one module file (csrc/module.cpp) serves both the CPU
// build (effbert._C) and the CUDA build (effbert._cuda) and adding an op family touches no shared file.
#pragma once
#include <pybind11/pybind11.h>
#include <utility>
#include <vector>

namespace effbert {

using Binder = void (*)(pybind11::module_&);

inline std::vector<std::pair<const char*, Binder>>& binders() {
  static std::vector<std::pair<const char*, Binder>> all;
  return all;
}

struct RegisterBinder {
  RegisterBinder(const char* name, Binder fn) { binders().emplace_back(name, fn); }
};

}  // namespace effbert

#define EFFBERT_BIND(family)                                                            \
  static void effbert_bind_##family(pybind11::module_&);                                \
  static ::effbert::RegisterBinder effbert_register_##family(#family, effbert_bind_##family); \
  static void effbert_bind_##family(pybind11::module_& m)
