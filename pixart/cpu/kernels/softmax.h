// Softmax over the last axis, shared by fused_cpu.cc (the Softmax / MaskedSoftmax operators) and gemm_cpu.cc (inside
// the attention kernels). Included by each source; pixart/kernels/__init__.py keys its build cache on this file too.
#pragma once

#include <cmath>
#include <cstdint>

// y = softmax of each of `rows` rows of x (row stride nk; y may be x), keys where keep[j] == 0 excluded (probability
// 0; a row with no key kept gets uniform weights, as adding -1e9 before the softmax gives); keep may be null.
// Branch-free loops (they vectorise); exp's argument is clamped to [-80, 80] (glibc's vectorised expf keeps its fast
// path, and a masked key's e^(x - m) stays finite before it is zeroed).
static inline void softmax_rows(const float *x, float *y, int64_t rows, int64_t nk, const float *keep) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * nk;
    float *yr = y + r * nk;
    float m = -3.0e38f;
    if (keep == nullptr) {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < nk; ++j) m = std::fmax(m, xr[j]);
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < nk; ++j) m = std::fmax(m, keep[j] != 0.0f ? xr[j] : -3.0e38f);
    }
    if (m == -3.0e38f) {  // no key kept
      for (int64_t j = 0; j < nk; ++j) yr[j] = 1.0f / static_cast<float>(nk);
      continue;
    }
    float sum = 0.0f;
    if (keep == nullptr) {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nk; ++j) {
        const float e = std::exp(std::fmax(xr[j] - m, -80.0f));
        yr[j] = e;
        sum += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nk; ++j) {
        const float e = std::exp(std::fmin(std::fmax(xr[j] - m, -80.0f), 80.0f)) * (keep[j] != 0.0f ? 1.0f : 0.0f);
        yr[j] = e;
        sum += e;
      }
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) yr[j] *= inv;
  }
}
