// The two bf16 GEMM kernels of pixart/cpu/kernels/gemm_cpu.cc called directly on T5 v1.1 XXL's Linear shapes at a
// 120- and a 300-token prompt: the few-rows kernel (gemm_bf16_few_rows, what LinearXWtHalf runs up to 512 rows) and
// the packed-panel one (gemm_kind(Bf16Kind), beyond), alternating call by call; GFLOP per second of the process's
// CPU time (median call), which a shared, loaded machine moves far less than wall time, and the largest difference
// from a float64 product of the bf16-rounded operands over a sample of entries.
//
//   g++ -O3 -march=native -ffast-math -fopenmp bench/gemm_bf16_kernel.cc -o /tmp/gemm_bf16_kernel
//   OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive /tmp/gemm_bf16_kernel 7     # 7 calls of each per shape
#include "../pixart/cpu/kernels/gemm_cpu.cc"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <vector>

namespace {
double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

float bf16_round(float f) {  // nearest even, as the kernels round x
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b = (b + 0x7fff + ((b >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&f, &b, 4);
  return f;
}
}  // namespace

int main(int argc, char **argv) {
#if defined(__AVX512BF16__)
  const int calls = argc > 1 ? std::atoi(argv[1]) : 7;
  const int64_t shapes[][3] = {{120, 4096, 4096}, {120, 4096, 10240}, {120, 10240, 4096},
                               {300, 4096, 4096}, {300, 4096, 10240}, {300, 10240, 4096}};
  std::printf("| M x K by N | few-rows GFLOP per CPU-s | packed-panel GFLOP per CPU-s | max error (both) |\n|---|---|---|---|\n");
  for (const auto &s : shapes) {
    const int64_t m = s[0], k = s[1], n = s[2];
    std::vector<float> x(m * k), y(m * n);
    std::vector<uint16_t> w(n * k);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.f - 0.5f;
    for (size_t i = 0; i < w.size(); ++i) {
      float f = bf16_round(static_cast<float>((i * 40503u) % 997) / 997.f - 0.5f);
      uint32_t b;
      std::memcpy(&b, &f, 4);
      w[i] = static_cast<uint16_t>(b >> 16);
    }
    std::vector<double> t[2];
    double err = 0;
    for (int c = 0; c < calls; ++c)
      for (int kind = 0; kind < 2; ++kind) {
        const double t0 = cpu_seconds();
        if (kind == 0) gemm_bf16_few_rows(x.data(), k, w.data(), k, nullptr, y.data(), m, n, k);
        else gemm_kind(Bf16Kind{x.data(), k, w.data(), k}, nullptr, y.data(), m, n, k);
        t[kind].push_back(cpu_seconds() - t0);
        if (c == 0)
          for (int64_t i = 0; i < m; i += 37)
            for (int64_t j = 0; j < n; j += 101) {
              double ref = 0;
              for (int64_t q = 0; q < k; ++q) {
                uint32_t b = static_cast<uint32_t>(w[j * k + q]) << 16;
                float wf;
                std::memcpy(&wf, &b, 4);
                ref += static_cast<double>(bf16_round(x[i * k + q])) * wf;
              }
              err = std::max(err, std::abs(ref - y[i * n + j]));
            }
      }
    const double gflop = 2.0 * m * n * k / 1e9;
    for (auto &v : t) std::sort(v.begin(), v.end());
    std::printf("| %ld x %ld by %ld | %.0f | %.0f | %.1e |\n", static_cast<long>(m), static_cast<long>(k),
                static_cast<long>(n), gflop / t[0][calls / 2], gflop / t[1][calls / 2], err);
  }
  return 0;
#else
  std::printf("built without AVX512_BF16 (compile with -march=native on a CPU that has it)\n");
  return 1;
#endif
}
