// fp32 GEMM y = x W^T on Intel AMX tiles, as three bf16 products ("bf16x3"), for MindSpore's CPU backend
// (ops.Custom, func_type "aot"; same calling convention as fused_cpu.cc).
//
// Why: a PixArt-XL/2 step is ~80% Linear matmuls. On an AMX CPU (Sapphire Rapids and later) the fp32 FMA units
// peak at ~130 GFLOP/s per core here while a register-only bf16 tile multiply reached ~1,400; three bf16 products
// per fp32 product keep ~16 bits of mantissa (relative error ~5e-6 per matmul, inside the port's 1e-4 fp32 parity
// contract). Measured, this kernel reaches ~110-180 GFLOP/s fp32-equivalent (it is bound by tile loads: 10 per 12
// multiplies with 8 tile registers), about MKL's level, so it is opt-in (PIXART_CPU_GEMM=bf16x3).
//
// Each fp32 value v splits into hi = bf16(v) and lo = bf16(v - hi) (both rounded to nearest even); then
// x w = xh wh + xh wl + xl wh (+ xl wl, ~2^-16 relative, dropped), accumulated in fp32 by the tile unit.
//
// Layout: x (M, K) and W (N, K) row-major fp32 (PyTorch's Linear layout), y (M, N) fp32. Any M, N, K (edges are
// zero-padded while packing). x is packed once per call into 16-row x 32-column tiles (hi and lo); each thread
// takes a range of 32-column panels of W, packs a panel (hi and lo, in the tile unit's pairwise "VNNI" layout) for
// a K block that stays in L2, and runs it against every 32-row block of x: four 16x16 fp32 accumulator tiles.
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int kTile = 16;     // tile rows (x rows, or W column pairs' rows in VNNI layout)
constexpr int kStep = 32;     // bf16 values along K per tile row
constexpr int kBlockK = 512;  // K block: a W panel (32 x 512 x hi/lo) is 64 KB

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

// 32 fp32 values -> their hi and lo bf16 (round to nearest even), 32 of each.
AMX_TARGET inline void split32(const float *v, uint16_t *hi, uint16_t *lo) {
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const __m512bh h = _mm512_cvtne2ps_pbh(b, a);  // elements 0-15 from a, 16-31 from b
  const __m512i hb = reinterpret_cast<__m512i>(h);
  const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
  const __m512 hb2 =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
  const __m512bh l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb2), _mm512_sub_ps(a, ha));
  _mm512_storeu_si512(hi, hb);
  _mm512_storeu_si512(lo, reinterpret_cast<__m512i>(l));
}

// As split32, for the n <= 32 values left at an edge (zeros after them).
AMX_TARGET inline void split_edge(const float *v, int64_t n, uint16_t *hi, uint16_t *lo) {
  alignas(64) float buf[32] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = v[i];
  split32(buf, hi, lo);
}

// Row `row` of a row-major fp32 matrix with `count` rows of length k, values [k0, k0+32) -> 32 hi and 32 lo bf16;
// zeros beyond the matrix (a padding row, or past k).
AMX_TARGET inline void split_row(const float *a, int64_t count, int64_t k, int64_t row, int64_t k0, uint16_t *hi,
                                 uint16_t *lo) {
  const int64_t valid = k - k0 < kStep ? k - k0 : kStep;
  if (row >= count)
    split_edge(a, 0, hi, lo);
  else if (valid == kStep)
    split32(a + row * k + k0, hi, lo);
  else
    split_edge(a + row * k + k0, valid, hi, lo);
}

// x rows [m0, m0+16) x K block [k0, k0+32) -> one hi and one lo tile (16 rows x 32 bf16), zero beyond M or K.
AMX_TARGET void pack_x_tile(const float *x, int64_t m, int64_t k, int64_t m0, int64_t k0, uint16_t *hi,
                            uint16_t *lo) {
  for (int r = 0; r < kTile; ++r) split_row(x, m, k, m0 + r, k0, hi + r * kStep, lo + r * kStep);
}

// W rows (output columns) [n0, n0+16) x K block [k0, k0+32) -> hi and lo tiles in VNNI layout: tile row p holds,
// for each of the 16 columns c, the pair (W[n0+c][k0+2p], W[n0+c][k0+2p+1]) as one 32-bit word; a 16x16
// transpose of the words each W row gives.
AMX_TARGET void pack_w_tile(const float *w, int64_t n, int64_t k, int64_t n0, int64_t k0, uint16_t *hi,
                            uint16_t *lo) {
  alignas(64) uint32_t rows_hi[kTile][kTile], rows_lo[kTile][kTile];
  for (int c = 0; c < kTile; ++c)
    split_row(w, n, k, n0 + c, k0, reinterpret_cast<uint16_t *>(rows_hi[c]), reinterpret_cast<uint16_t *>(rows_lo[c]));
  auto *th = reinterpret_cast<uint32_t *>(hi), *tl = reinterpret_cast<uint32_t *>(lo);
  for (int p = 0; p < kTile; ++p)
    for (int c = 0; c < kTile; ++c) {
      th[p * kTile + c] = rows_hi[c][p];
      tl[p * kTile + c] = rows_lo[c][p];
    }
}

bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0 && __builtin_cpu_supports("amx-bf16");
  }();
  return ok;
}

AMX_TARGET void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kTile;
  }
  _tile_loadconfig(&cfg);
}

// Accumulator tiles 0-3 (2 x 2 blocks of 16 x 16) += x tiles 4-5 (two row blocks) times W tiles 6-7 (two columns).
AMX_TARGET __attribute__((always_inline)) inline void multiply_2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// y[m0:m0+32, n0:n0+32] (+)= x-block . W-panel over `steps` K steps; the first K block starts from `bias` (32 values
// for these columns, every row; nullptr: zero) unless `accumulate`. xh/xl: this 32-row block's first x tiles of the
// K block (rows m0..m0+15, then m0+16..m0+31; the next step's x_step_stride further); wh/wl: the panel's tiles
// ([s][0..1]). Edge blocks go
// through a 32x32 scratch buffer so that tile loads and stores never touch memory outside y.
AMX_TARGET void micro_block(const uint16_t *xh, const uint16_t *xl, int64_t x_step_stride, const uint16_t *wh,
                            const uint16_t *wl, int steps, float *y, int64_t ldy, int64_t rows, int64_t cols,
                            bool accumulate, const float *bias) {
  alignas(64) float scratch[32 * 32];
  const bool full = rows == 32 && cols == 32;
  float *c = full ? y : scratch;
  const int64_t ldc = full ? ldy : 32;
  if (accumulate) {
    if (!full) {
      std::memset(scratch, 0, sizeof scratch);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(scratch + r * 32, y + r * ldy, cols * 4);
    }
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(1, c + 16, ldc * 4);
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  } else if (bias != nullptr) {  // stride 0: every tile row is the same 16 bias values
    _tile_loadd(0, bias, 0);
    _tile_loadd(1, bias + 16, 0);
    _tile_loadd(2, bias, 0);
    _tile_loadd(3, bias + 16, 0);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int s = 0; s < steps; ++s) {
    const uint16_t *a_hi = xh + s * x_step_stride, *a_lo = xl + s * x_step_stride;
    const uint16_t *b_hi = wh + s * 2 * kTile * kStep, *b_lo = wl + s * 2 * kTile * kStep;
    _tile_loadd(4, a_hi, 64);
    _tile_loadd(5, a_hi + kTile * kStep, 64);
    _tile_loadd(6, b_hi, 64);
    _tile_loadd(7, b_hi + kTile * kStep, 64);
    multiply_2x2();
    _tile_loadd(6, b_lo, 64);
    _tile_loadd(7, b_lo + kTile * kStep, 64);
    multiply_2x2();
    _tile_loadd(4, a_lo, 64);
    _tile_loadd(5, a_lo + kTile * kStep, 64);
    _tile_loadd(6, b_hi, 64);
    _tile_loadd(7, b_hi + kTile * kStep, 64);
    multiply_2x2();
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
  if (!full)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * ldy, scratch + r * 32, cols * 4);
}

AMX_TARGET void gemm(const float *x, const float *w, const float *b, float *y, int64_t m, int64_t n, int64_t k) {
  const int64_t m_tiles = (m + 31) / 32 * 2, k_steps = (k + kStep - 1) / kStep, panels = (n + 31) / 32;
  // x tiles: [32-row block][k step][upper/lower 16 rows]: a micro block reads one contiguous run.
  const int64_t x_size = k_steps * m_tiles * kTile * kStep;
  std::unique_ptr<uint16_t[]> xh_buf(new uint16_t[x_size]), xl_buf(new uint16_t[x_size]);
  uint16_t *xh = xh_buf.get(), *xl = xl_buf.get();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t s = 0; s < k_steps; ++s)
    for (int64_t t = 0; t < m_tiles; ++t) {
      const int64_t at = (((t / 2) * k_steps + s) * 2 + t % 2) * kTile * kStep;
      pack_x_tile(x, m, k, t * kTile, s * kStep, xh + at, xl + at);
    }
  const int64_t x_step_stride = 2 * kTile * kStep;
  constexpr int block_steps = kBlockK / kStep;
#pragma omp parallel
  {
    configure_tiles();
    constexpr int64_t panel = block_steps * 2 * kTile * kStep;  // one W panel's tiles (hi or lo) for a K block
    std::unique_ptr<uint16_t[]> w_buf(new uint16_t[2 * panel]);
    uint16_t *wh = w_buf.get(), *wl = wh + panel;
    // K blocks outside, panels inside: a K block of x (M x 512 x hi/lo, 1 MB at M = 512) stays in L2 while the
    // thread runs all its panels against it. schedule(static) hands a thread the same panels in every K block, so
    // no thread reads a y block another one writes, and no barrier is needed between K blocks.
    for (int64_t s0 = 0; s0 < k_steps; s0 += block_steps) {
      const int steps = static_cast<int>(k_steps - s0 < block_steps ? k_steps - s0 : block_steps);
#pragma omp for schedule(static) nowait
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * 32, cols = n - n0 < 32 ? n - n0 : 32;
        alignas(64) float bias[32] = {};
        if (b != nullptr)
          for (int64_t j = 0; j < cols; ++j) bias[j] = b[n0 + j];
        for (int s = 0; s < steps; ++s)
          for (int half = 0; half < 2; ++half) {
            const int64_t at = (s * 2 + half) * kTile * kStep;
            pack_w_tile(w, n, k, n0 + half * kTile, (s0 + s) * kStep, &wh[at], &wl[at]);
          }
        for (int64_t mb = 0; mb < m_tiles / 2; ++mb) {
          const int64_t m0 = mb * 32, rows = m - m0 < 32 ? m - m0 : 32;
          const int64_t at = (mb * k_steps + s0) * 2 * kTile * kStep;
          micro_block(xh + at, xl + at, x_step_stride, wh, wl, steps, y + m0 * n + n0, n, rows, cols, s0 > 0,
                      b != nullptr ? bias : nullptr);
        }
      }
    }
    _tile_release();
  }
}

}  // namespace

extern "C" {

// 1 where this process may use AMX tiles (CPU support and the kernel's permission), else 0.
int AmxAvailable() { return amx_permitted() ? 1 : 0; }

// y = x W^T (+ b); x (M, K), W (N, K), b (N), y (M, N), fp32.
int LinearBf16x3(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const bool with_bias = nparam == 4;
  if ((nparam != 3 && !with_bias) || ndims[0] != 2 || ndims[1] != 2 || !amx_permitted()) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || (with_bias && shapes[2][0] != n)) return 1;
  gemm(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
       with_bias ? static_cast<const float *>(params[2]) : nullptr, static_cast<float *>(params[nparam - 1]), m, n, k);
  return 0;
}

}  // extern "C"

#else  // not x86-64: no AMX; the Python side never selects these kernels

extern "C" {
int AmxAvailable() { return 0; }
int LinearBf16x3(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
}

#endif
