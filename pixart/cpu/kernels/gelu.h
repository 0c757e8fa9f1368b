// GELU (tanh approximation) of x + b, shared by fused_cpu.cc (BiasGeluTanh) and gemm_cpu.cc (MlpHalf's hidden
// layer), so both compute it alike. Included by each source; pixart/cpu/kernels/__init__.py keys its build cache on
// this file too.
#pragma once

#include <cmath>
#include <cstdint>

// gelu_tanh(v) = v * sigmoid(2 z), z = sqrt(2/pi) (v + 0.044715 v^3); exp's argument clamped to [-80, 80] (glibc's
// vectorised expf keeps its fast path; nothing changes beyond rounding).
static inline void bias_gelu_tanh_row(const float *x, const float *b, float *y, int64_t c) {
  const float c1 = 1.5957691216057308f, c3 = c1 * 0.044715f;  // 2 sqrt(2/pi), its product with 0.044715
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const float v = x[j] + b[j];
    y[j] = v / (1.0f + std::exp(std::fmax(std::fmin(-v * (c1 + c3 * v * v), 80.0f), -80.0f)));
  }
}
