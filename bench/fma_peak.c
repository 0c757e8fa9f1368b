// The fp32 FMA peak of this machine: 12 independent AVX-512 FMA chains per thread, register-resident, on every
// OpenMP thread (OMP_NUM_THREADS). No GEMM can beat this in fp32; bench_matmul.py prints it next to the GEMMs.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
  const long iters = 200000000;
  float sink = 0.0f;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    __m512 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(i * 0.001f);
    const __m512 a = _mm512_set1_ps(0.9999f), b = _mm512_set1_ps(0.00001f);
    const long n = iters / omp_get_num_threads();
    for (long k = 0; k < n; ++k)
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  }
  const double seconds = omp_get_wtime() - t0;
  printf("%.1f %f\n", iters * 12.0 * 32.0 / seconds / 1e9, sink);  // GFLOP/s (one FMA = 2 FLOP x 16 lanes)
  return 0;
}
