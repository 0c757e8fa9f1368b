// fp16 / fp32 -> bf16 conversion for loading weights into bf16 parameters on CPU (called through ctypes).
//
// Built without -ffast-math, unlike the other kernel libraries: linking with it adds crtfastmath.o, whose
// constructor turns on flush-to-zero in the thread that loads the library, and this one is loaded by the Python
// thread that also runs the user's (or the reference's) fp32 code.
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

extern "C" {

int ConvertAvailable() { return 1; }

// dst (n) bf16 = src (n) fp16 (src_bits 16) or fp32 (32), rounded to nearest even; a NaN stays a (quiet) NaN
// instead of rounding into an infinity. Loading half or fp32 checkpoints into bf16 parameters: MindSpore's cast
// runs on one thread (~300 M elements/s here), this splits the array over the threads and runs at memory speed.
// Plain AVX-512F integer arithmetic (not vcvtneps2bf16, which flushes fp32 subnormals to zero).
int ToBf16(const void *src, int src_bits, uint16_t *dst, int64_t n) {
  if (src_bits != 16 && src_bits != 32) return 1;
  const uint16_t *h = static_cast<const uint16_t *>(src);
  const float *f = static_cast<const float *>(src);
  constexpr int64_t kChunk = 1 << 16;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t end = c0 + kChunk < n ? c0 + kChunk : n;
    for (int64_t i = c0; i < end; i += 16) {
      const __mmask16 in = end - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - i)) - 1);
      const __m512 x = src_bits == 16
          ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, h + i))
          : _mm512_maskz_loadu_ps(in, f + i);
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      _mm256_mask_storeu_epi16(dst + i, in, _mm512_cvtepi32_epi16(r));
    }
  }
  return 0;
}

}  // extern "C"

#else  // no AVX-512: the Python side leaves the conversion to MindSpore's cast

extern "C" {
int ConvertAvailable() { return 0; }
int ToBf16(const void *, int, uint16_t *, int64_t) { return 1; }
}

#endif
