// Shared definitions for the CPU (g++) and CUDA (nvcc) builds. No torch headers: tensors cross the boundary as
// raw addresses, sizes, element strides and a dtype code, so one build serves every torch version.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define EFFBERT_HD __host__ __device__ __forceinline__
#else
#define EFFBERT_HD inline
#endif

namespace effbert {

// dtype codes; effbert/_ext.py holds the same table.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

EFFBERT_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// IEEE half -> float by bit manipulation (exact, subnormals, inf and NaN included); the host has no half type.
EFFBERT_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#endif
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);  // signed zero
    // subnormal: normalise the mantissa
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_to_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (man << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

EFFBERT_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Element i of a row stored as `dtype`, widened to float.
EFFBERT_HD float load_as_float(const void* base, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t bits = static_cast<const uint16_t*>(base)[i];
  return dtype == kFloat16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

EFFBERT_HD int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace effbert
