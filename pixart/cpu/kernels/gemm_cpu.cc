// Strict fp32 GEMM on AVX-512 for MindSpore's CPU backend (ops.Custom, func_type "aot"; same calling convention as
// fused_cpu.cc).
//
// Why: a PixArt-XL/2 step is ~80% Linear matmuls, and MindSpore's CPU MatMul reaches ~90-140 GFLOP/s on the
// step's shapes on the 2-core VM measured, where PyTorch's MKL reaches ~160-210 and the FMA units ~260. This is the
// textbook blocked GEMM (Goto / BLIS): operands packed into panels, a register-blocked micro-kernel of 14 rows x 32
// columns (28 zmm accumulators, one broadcast per row and k, two vector loads per k), the packed B panel (384 x 32
// fp32, 48 KB) in L1, each thread's C slice in L2 across K blocks. Every product is an fp32 FMA: the result
// differs from MindSpore's MatMul only by summation order.
//
// C (M, N) = op(A) op(B) (+ bias), row-major; op(A) is A (M, K) or A^T for A (K, M), op(B) is B (K, N) or B^T for
// B (N, K). Entry points: LinearXWt / LinearXWtBias (x W^T [+ b], PyTorch's Linear layout), MatMulXW (dY W: a
// Linear's input gradient), MatMulXtW (dY^T X: its weight gradient).
//
// Half-precision weights (inference): LinearXWtHalf / LinearXWtHalfBias take x (M, K) fp32 and W (N, K) stored in
// bf16 or fp16, y fp32. bf16 W (on CPUs with AVX512_BF16): x is rounded to bf16 (nearest even) while packing and
// the micro-kernel is vdpbf16ps (two bf16 products per fp32 lane and instruction, accumulated in fp32: twice the
// FMA's rate), the same blocking as the fp32 GEMM with K taken in pairs. fp16 W: each W panel is widened to fp32 as
// it is packed and the fp32 micro-kernel runs (fp16 has more mantissa than bf16; the packing is amortised over
// every row of x, so this runs at the fp32 GEMM's speed from half the memory).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "softmax.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

namespace {

constexpr int kRows = 14;     // micro-tile rows (MR): 14 x 2 accumulators + 2 B vectors + a broadcast = 31 zmm
constexpr int kCols = 32;     // micro-tile columns (NR): two zmm
constexpr int kBlockK = 384;  // largest K block (KC; K is cut into equal blocks): a B panel <= 384 x 32 x 4 B = 48 KB

struct Operand {
  const float *data;
  int64_t ld;  // row stride
  bool transposed;
  float at(int64_t r, int64_t c) const { return transposed ? data[c * ld + r] : data[r * ld + c]; }
};

// A transposed (N, K) operand stored in fp16 (B of LinearXWtHalf with fp16 weights): widened to fp32 when packed.
struct HalfOperand {
  const uint16_t *data;
  int64_t ld;
  static constexpr bool transposed = true;
  float at(int64_t r, int64_t c) const { return _cvtsh_ss(data[c * ld + r]); }
};

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t *p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}

float *aligned_floats(int64_t count) {
  return static_cast<float *>(std::aligned_alloc(64, ((count * 4 + 63) / 64) * 64));
}

// In-register 16 x 16 transpose of r[0..15].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// A micro-panel: ap[kk * kRows + i] = op(A)(m0 + i, k0 + kk), zeros past M.
void pack_a(const Operand &a, int64_t m, int64_t m0, int64_t k0, int kc, float *ap) {
  const int rows = static_cast<int>(m - m0 < kRows ? m - m0 : kRows);
  if (a.transposed) {  // op(A) row i is column m0 + i of A: contiguous along i for each k
    for (int kk = 0; kk < kc; ++kk) {
      const float *src = a.data + (k0 + kk) * a.ld + m0;
      for (int i = 0; i < kRows; ++i) ap[kk * kRows + i] = i < rows ? src[i] : 0.0f;
    }
    return;
  }
  int kk = 0;
  for (; kk + 16 <= kc; kk += 16) {  // rows of A along k: 16 x 16 blocks transposed in registers, 14 lanes stored
    __m512 r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_loadu_ps(a.data + (m0 + i) * a.ld + k0 + kk) : _mm512_setzero_ps();
    transpose16(r);
    for (int q = 0; q < 16; ++q) _mm512_mask_storeu_ps(ap + (kk + q) * kRows, (1u << kRows) - 1, r[q]);
  }
  for (; kk < kc; ++kk)
    for (int i = 0; i < kRows; ++i) ap[kk * kRows + i] = i < rows ? a.data[(m0 + i) * a.ld + k0 + kk] : 0.0f;
}

// B panel: bp[kk * kCols + j] = op(B)(k0 + kk, n0 + j), zeros past N.
template <class B>
void pack_b(const B &b, int64_t n, int64_t n0, int64_t k0, int kc, float *bp) {
  const int cols = static_cast<int>(n - n0 < kCols ? n - n0 : kCols);
  if constexpr (std::is_same_v<B, Operand>) {
    if (!b.transposed) {  // rows of B are contiguous along n: masked copies
    const __mmask16 lo = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 hi = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    for (int kk = 0; kk < kc; ++kk) {
      const float *src = b.data + (k0 + kk) * b.ld + n0;
      _mm512_store_ps(bp + kk * kCols, _mm512_maskz_loadu_ps(lo, src));
      _mm512_store_ps(bp + kk * kCols + 16, _mm512_maskz_loadu_ps(hi, src + 16));
    }
    return;
    }
  }
  for (int j0 = 0; j0 < kCols; j0 += 16) {  // B (N, K): 16 x 16 blocks transposed in registers
    int kk = 0;
    for (; kk + 16 <= kc; kk += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = j0 + j < cols ? load16(b.data + (n0 + j0 + j) * b.ld + k0 + kk) : _mm512_setzero_ps();
      transpose16(r);
      for (int q = 0; q < 16; ++q) _mm512_store_ps(bp + (kk + q) * kCols + j0, r[q]);
    }
    for (; kk < kc; ++kk)
      for (int j = 0; j < 16; ++j) bp[kk * kCols + j0 + j] = j0 + j < cols ? b.at(k0 + kk, n0 + j0 + j) : 0.0f;
  }
}

// A micro-tile's accumulators: C's tile (accumulate), else the bias (32 values), else zeros.
__attribute__((always_inline)) inline void start_tile(__m512 (&acc)[kRows][2], const float *c, int64_t ldc,
                                                      bool accumulate, const float *bias) {
  const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int i = 0; i < kRows; ++i) {
    acc[i][0] = accumulate ? _mm512_loadu_ps(c + i * ldc) : b0;
    acc[i][1] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16) : b1;
  }
}

__attribute__((always_inline)) inline void store_tile(const __m512 (&acc)[kRows][2], float *c, int64_t ldc) {
  for (int i = 0; i < kRows; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

// One 14 x 32 tile of C (row stride ldc): C = [C or bias or 0] + ap bp over kc.
void micro_tile(const float *__restrict ap, const float *__restrict bp, int kc, float *c, int64_t ldc,
                bool accumulate, const float *bias) {
  __m512 acc[kRows][2];
  start_tile(acc, c, ldc, accumulate, bias);
  for (int kk = 0; kk < kc; ++kk) {
    const __m512 v0 = _mm512_load_ps(bp + kk * kCols), v1 = _mm512_load_ps(bp + kk * kCols + 16);
#pragma GCC unroll 14
    for (int i = 0; i < kRows; ++i) {
      const __m512 a = _mm512_set1_ps(ap[kk * kRows + i]);
      acc[i][0] = _mm512_fmadd_ps(a, v0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, v1, acc[i][1]);
    }
  }
  store_tile(acc, c, ldc);
}

// The fp32 product: op(A) and op(B) packed as fp32, the FMA micro-kernel. `B` is an Operand or a HalfOperand
// (fp16 widened while packing).
template <class B>
struct Fp32Kind {
  using Packed = float;
  static constexpr int kPerWord = 1;  // K values per packed element
  static constexpr int kGrain = 16;   // K blocks are multiples of this
  const Operand &a;
  const B &b;
  void pack_a(int64_t m, int64_t m0, int64_t k0, int kc, float *ap) const { ::pack_a(a, m, m0, k0, kc, ap); }
  void pack_b(int64_t n, int64_t n0, int64_t k0, int kc, float *bp) const { ::pack_b(b, n, n0, k0, kc, bp); }
  static void tile(const float *ap, const float *bp, int kc, float *c, int64_t ldc, bool accumulate,
                   const float *bias) {
    micro_tile(ap, bp, kc, c, ldc, accumulate, bias);
  }
};

// C (m, n) = op(A) op(B) (+ bias (n)) with inner dimension k, for a packing kind (Fp32Kind, Bf16Kind).
// Returns false when out of memory.
template <class Kind>
bool gemm_kind(const Kind &kind, const float *bias, float *c, int64_t m, int64_t n, int64_t k) {
  using Packed = typename Kind::Packed;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] = bias ? bias[j] : 0.0f;
    return true;
  }
  constexpr int g = Kind::kGrain, w = Kind::kPerWord;
  const int64_t tiles = (m + kRows - 1) / kRows, panels = (n + kCols - 1) / kCols;
  const int64_t blocks = (k + kBlockK - 1) / kBlockK;
  const int64_t kb = ((k + blocks - 1) / blocks + g - 1) / g * g;  // even K blocks (512 -> 256 + 256, not 384 + 128)
  const int64_t kw = kb / w;                                      // packed elements per row of a K block
  // op(A) packed once per call, shared by the threads: [K block][row tile][kk][kRows]
  auto *ap = static_cast<Packed *>(static_cast<void *>(aligned_floats(blocks * tiles * kw * kRows)));
  if (ap == nullptr) return false;
  bool ok = true;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t s = 0; s < blocks; ++s)
    for (int64_t t = 0; t < tiles; ++t) {
      const int kc = static_cast<int>(k - s * kb < kb ? k - s * kb : kb);
      kind.pack_a(m, t * kRows, s * kb, kc, ap + (s * tiles + t) * kw * kRows);
    }
#pragma omp parallel
  {
    // Work items: a panel of 32 columns x a chunk of rows (half of M when M is large), each run through all K
    // blocks by one thread (the item's slice of C stays in L2; no two threads write the same C), handed out
    // dynamically: on a shared VM one core often runs slower than the other, and a static split waits for it.
    const int64_t chunks = tiles >= 24 ? 2 : 1;
    auto *bp = static_cast<Packed *>(static_cast<void *>(aligned_floats(kw * kCols)));
    float *scratch = aligned_floats(kRows * kCols + kCols), *bias_pad = scratch + kRows * kCols;
    if (bp == nullptr || scratch == nullptr) {
#pragma omp atomic write
      ok = false;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < panels * chunks; ++item) {
      if (bp == nullptr || scratch == nullptr) continue;
      const int64_t p = item / chunks, chunk = item % chunks;
      const int64_t t_lo = tiles * chunk / chunks, t_hi = tiles * (chunk + 1) / chunks;
      const int64_t n0 = p * kCols;
      const int cols = static_cast<int>(n - n0 < kCols ? n - n0 : kCols);
      if (bias != nullptr)
        for (int j = 0; j < kCols; ++j) bias_pad[j] = j < cols ? bias[n0 + j] : 0.0f;
      for (int64_t s = 0; s < blocks; ++s) {
        const int64_t k0 = s * kb;
        const int kc = static_cast<int>(k - k0 < kb ? k - k0 : kb);
        const int steps = (kc + w - 1) / w;
        kind.pack_b(n, n0, k0, kc, bp);
        const float *tile_bias = bias != nullptr && s == 0 ? bias_pad : nullptr;
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const int64_t m0 = t * kRows;
          const int rows = static_cast<int>(m - m0 < kRows ? m - m0 : kRows);
          const Packed *apt = ap + (s * tiles + t) * kw * kRows;
          float *ct = c + m0 * n + n0;
          if (rows == kRows && cols == kCols) {
            Kind::tile(apt, bp, steps, ct, n, s > 0, tile_bias);
          } else {  // an edge tile goes through a full-size scratch tile
            if (s > 0)
              for (int i = 0; i < rows; ++i) std::memcpy(scratch + i * kCols, ct + i * n, cols * 4);
            Kind::tile(apt, bp, steps, scratch, kCols, s > 0, tile_bias);
            for (int i = 0; i < rows; ++i) std::memcpy(ct + i * n, scratch + i * kCols, cols * 4);
          }
        }
      }
    }
    std::free(bp);
    std::free(scratch);
  }
  std::free(ap);
  return ok;
}

// C (m, n) = op(A) op(B) (+ bias (n)) in fp32 (B: an Operand, or a HalfOperand widened to fp32).
template <class B = Operand>
bool gemm(const Operand &a, const B &b, const float *bias, float *c, int64_t m, int64_t n, int64_t k) {
  return gemm_kind(Fp32Kind<B>{a, b}, bias, c, m, n, k);
}

#if defined(__AVX512BF16__)
// The bf16 product: x (M, K) fp32 rounded to bf16 while packing, W (N, K) bf16; both packed as 32-bit words holding
// a pair of consecutive K values (vdpbf16ps's operand layout), zeros past M, N or K.
struct Bf16Kind {
  using Packed = uint32_t;
  static constexpr int kPerWord = 2;
  static constexpr int kGrain = 32;  // one 16 x 16 word transpose covers 32 K values
  const float *x;
  int64_t ldx;
  const uint16_t *w;
  int64_t ldw;

  static __mmask16 mask16(int count) {
    return count >= 16 ? static_cast<__mmask16>(0xffff) : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
  }

  // ap[p * kRows + i] = (x[m0 + i][k0 + 2p], x[m0 + i][k0 + 2p + 1]) in bf16.
  void pack_a(int64_t m, int64_t m0, int64_t k0, int kc, uint32_t *ap) const {
    const int rows = static_cast<int>(m - m0 < kRows ? m - m0 : kRows);
    for (int kk = 0; kk < kc; kk += 32) {
      const int left = kc - kk;
      const __mmask16 lo = mask16(left), hi = mask16(left - 16);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        if (i < rows) {
          const float *src = x + (m0 + i) * ldx + k0 + kk;
          const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 16), _mm512_maskz_loadu_ps(lo, src));
          r[i] = reinterpret_cast<__m512>(h);
        } else {
          r[i] = _mm512_setzero_ps();
        }
      }
      transpose16(r);
      const int pairs = left >= 32 ? 16 : (left + 1) / 2;
      for (int q = 0; q < pairs; ++q)
        _mm512_mask_storeu_ps(reinterpret_cast<float *>(ap + (kk / 2 + q) * kRows), (1u << kRows) - 1, r[q]);
    }
  }

  // bp[p * kCols + j] = (W[n0 + j][k0 + 2p], W[n0 + j][k0 + 2p + 1]).
  void pack_b(int64_t n, int64_t n0, int64_t k0, int kc, uint32_t *bp) const {
    const int cols = static_cast<int>(n - n0 < kCols ? n - n0 : kCols);
    for (int j0 = 0; j0 < kCols; j0 += 16)
      for (int kk = 0; kk < kc; kk += 32) {
        const int left = kc - kk;
        const __mmask32 mask = left >= 32 ? 0xffffffffu : static_cast<__mmask32>((1ull << left) - 1);
        __m512 r[16];
        for (int j = 0; j < 16; ++j)
          r[j] = j0 + j < cols
                     ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, w + (n0 + j0 + j) * ldw + k0 + kk))
                     : _mm512_setzero_ps();
        transpose16(r);
        const int pairs = left >= 32 ? 16 : (left + 1) / 2;
        for (int q = 0; q < pairs; ++q) _mm512_store_ps(reinterpret_cast<float *>(bp + (kk / 2 + q) * kCols + j0), r[q]);
      }
  }

  // One 14 x 32 tile of C over `pairs` K pairs, as micro_tile.
  static void tile(const uint32_t *__restrict ap, const uint32_t *__restrict bp, int pairs, float *c, int64_t ldc,
                   bool accumulate, const float *bias) {
    __m512 acc[kRows][2];
    start_tile(acc, c, ldc, accumulate, bias);
    for (int p = 0; p < pairs; ++p) {
      const __m512bh v0 = reinterpret_cast<__m512bh>(_mm512_load_si512(bp + p * kCols));
      const __m512bh v1 = reinterpret_cast<__m512bh>(_mm512_load_si512(bp + p * kCols + 16));
#pragma GCC unroll 14
      for (int i = 0; i < kRows; ++i) {
        const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(ap[p * kRows + i])));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, v0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, v1);
      }
    }
    store_tile(acc, c, ldc);
  }
};
constexpr bool kHasBf16 = true;
#else
constexpr bool kHasBf16 = false;
#endif

// Attention, inference only: out (B, H, Nq, dv) = softmax(q k^T, masked by keep) v for heads-first q (B, H, Nq, d)
// (already scaled by 1/sqrt(d)), k (B, H, Nk, d), v (B, H, Nk, dv), keep (B, Nk) or null. Work items are blocks of
// whole row tiles of queries (<= 256 rows) of one (batch, head), one per thread at a time, each two single-threaded
// GEMMs around a softmax: only a block's scores (rows x Nk) are ever live, never all of (B, H, Nq, Nk) (2 GiB at
// 1024 px, 34 GiB at 2K), and they stay in the thread's cache between the products.
bool attention(const float *q, const float *k, const float *v, const float *keep, float *out, int64_t b, int64_t h,
               int64_t nq, int64_t nk, int64_t d, int64_t dv) {
  const int64_t tiles = (nq + kRows - 1) / kRows, blocks = (nq + 255) / 256;
  const int64_t block_rows = (tiles + blocks - 1) / blocks * kRows;
  bool ok = true;
#pragma omp parallel
  {
    float *s = aligned_floats(block_rows * nk);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < b * h; ++bh)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t q0 = blk * block_rows, rows = nq - q0 < block_rows ? nq - q0 : block_rows;
        if (rows <= 0) continue;
        const Operand qa{q + (bh * nq + q0) * d, d, false}, kt{k + bh * nk * d, d, true};
        const Operand pa{s, nk, false}, va{v + bh * nk * dv, dv, false};
        // nested inside this parallel region, each gemm runs on the calling thread alone
        if (s == nullptr || !gemm(qa, kt, nullptr, s, rows, nk, d)) {
#pragma omp atomic write
          ok = false;
          continue;
        }
        softmax_rows(s, s, rows, nk, keep == nullptr ? nullptr : keep + (bh / h) * nk);
        if (!gemm(pa, va, nullptr, out + (bh * nq + q0) * dv, rows, dv, nk)) {
#pragma omp atomic write
          ok = false;
        }
      }
    std::free(s);
  }
  return ok;
}

// attention()'s gradient, for training: q, k, v, out (its output), dout, keep as there -> dq, dk, dv. One (sample,
// head) per thread at a time, all its queries at once (its scores p and their gradient, 2 x Nq x Nk, are live):
// p = softmax(q k^T) recomputed, dp = dout v^T, ds = p (dp - rowsum(dout * out)), dq = ds k, dk = ds^T q,
// dv = p^T dout. Masked keys have p = 0, hence no gradient; a row with no key kept is uniform, as in attention().
bool attention_grad(const float *q, const float *k, const float *v, const float *keep, const float *out,
                    const float *dout, float *dq, float *dk, float *dv, int64_t b, int64_t h, int64_t nq, int64_t nk,
                    int64_t d, int64_t dvn) {
  bool ok = true;
#pragma omp parallel
  {
    float *p = aligned_floats(2 * nq * nk), *ds = p == nullptr ? nullptr : p + nq * nk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < b * h; ++bh) {
      const float *qb = q + bh * nq * d, *kb = k + bh * nk * d, *vb = v + bh * nk * dvn;
      const float *ob = out + bh * nq * dvn, *gb = dout + bh * nq * dvn;
      // nested inside this parallel region, each gemm runs on the calling thread alone
      bool done = p != nullptr && gemm({qb, d, false}, {kb, d, true}, nullptr, p, nq, nk, d);
      if (done) {
        softmax_rows(p, p, nq, nk, keep == nullptr ? nullptr : keep + (bh / h) * nk);
        done = gemm({gb, dvn, false}, {vb, dvn, true}, nullptr, ds, nq, nk, dvn);
      }
      if (done) {
        for (int64_t i = 0; i < nq; ++i) {
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < dvn; ++c) dot += gb[i * dvn + c] * ob[i * dvn + c];
          float *dsr = ds + i * nk;
          const float *pr = p + i * nk;
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) dsr[j] = pr[j] * (dsr[j] - dot);
        }
        done = gemm({ds, nk, false}, {kb, d, false}, nullptr, dq + bh * nq * d, nq, d, nk) &&
               gemm({ds, nk, true}, {qb, d, false}, nullptr, dk + bh * nk * d, nk, d, nq) &&
               gemm({p, nk, true}, {gb, dvn, false}, nullptr, dv + bh * nk * dvn, nk, dvn, nq);
      }
      if (!done) {
#pragma omp atomic write
        ok = false;
      }
    }
    std::free(p);
  }
  return ok;
}

bool float32_2d(int count, int *ndims, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (ndims[i] != 2 || std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

}  // namespace

extern "C" {

int GemmAvailable() { return 1; }

// 1 where the library was built with the bf16 product (the compiler targeted a CPU with AVX512_BF16).
int GemmBf16Available() { return kHasBf16 ? 1 : 0; }

// y = x W^T (+ b); x (M, K), W (N, K), b (N), y (M, N).
int LinearXWt(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  const bool with_bias = nparam == 4;
  if ((nparam != 3 && !with_bias) || !float32_2d(2, ndims, dtypes)) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || (with_bias && shapes[2][0] != n)) return 1;
  const Operand x{static_cast<const float *>(params[0]), k, false}, w{static_cast<const float *>(params[1]), k, true};
  const float *b = with_bias ? static_cast<const float *>(params[2]) : nullptr;
  return gemm(x, w, b, static_cast<float *>(params[nparam - 1]), m, n, k) ? 0 : 1;
}

// The same with the bias required: a second name, because MindSpore takes two Custom primitives of one kernel name
// for the same operator and would give both the same gradient function (which differs with and without a bias).
int LinearXWtBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a, void *b) {
  return nparam == 4 ? LinearXWt(nparam, params, ndims, shapes, dtypes, a, b) : 1;
}

// y = x W; x (M, K), W (K, N), y (M, N).
int MatMulXW(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !float32_2d(2, ndims, dtypes)) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][1];
  if (shapes[1][0] != k) return 1;
  const Operand x{static_cast<const float *>(params[0]), k, false}, w{static_cast<const float *>(params[1]), n, false};
  return gemm(x, w, nullptr, static_cast<float *>(params[2]), m, n, k) ? 0 : 1;
}

// y = x^T W; x (K, M), W (K, N), y (M, N).
int MatMulXtW(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !float32_2d(2, ndims, dtypes)) return 1;
  const int64_t k = shapes[0][0], m = shapes[0][1], n = shapes[1][1];
  if (shapes[1][0] != k) return 1;
  const Operand x{static_cast<const float *>(params[0]), m, true}, w{static_cast<const float *>(params[1]), n, false};
  return gemm(x, w, nullptr, static_cast<float *>(params[2]), m, n, k) ? 0 : 1;
}

// y = x W^T (+ b) for W stored in bf16 or fp16 (see the header); x (M, K) fp32, W (N, K), b (N) fp32, y (M, N) fp32.
int LinearXWtHalf(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  const bool with_bias = nparam == 4;
  if ((nparam != 3 && !with_bias) || ndims[0] != 2 || ndims[1] != 2 || std::strcmp(dtypes[0], "float32") != 0)
    return 1;
  if (with_bias && (ndims[2] != 1 || std::strcmp(dtypes[2], "float32") != 0)) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || (with_bias && shapes[2][0] != n)) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const uint16_t *>(params[1]);
  const float *b = with_bias ? static_cast<const float *>(params[2]) : nullptr;
  auto *y = static_cast<float *>(params[nparam - 1]);
  if (std::strcmp(dtypes[1], "float16") == 0)
    return gemm(Operand{x, k, false}, HalfOperand{w, k}, b, y, m, n, k) ? 0 : 1;
#if defined(__AVX512BF16__)
  if (std::strcmp(dtypes[1], "bfloat16") == 0) return gemm_kind(Bf16Kind{x, k, w, k}, b, y, m, n, k) ? 0 : 1;
#endif
  return 1;
}

// The same with the bias required (a second name, as LinearXWtBias).
int LinearXWtHalfBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a,
                      void *b) {
  return nparam == 4 ? LinearXWtHalf(nparam, params, ndims, shapes, dtypes, a, b) : 1;
}

// out (..., D) fp32 = rows `ids` (...) of a table (V, D) stored in bf16 or fp16 (an embedding in half precision);
// an id outside [0, V) gives zeros.
int GatherRowsHalf(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] != 2 || std::strcmp(dtypes[2], "float32") != 0) return 1;
  const bool bf16 = std::strcmp(dtypes[0], "bfloat16") == 0;
  if (!bf16 && std::strcmp(dtypes[0], "float16") != 0) return 1;
  const bool ids64 = std::strcmp(dtypes[1], "int64") == 0;
  if (!ids64 && std::strcmp(dtypes[1], "int32") != 0) return 1;
  const int64_t v = shapes[0][0], d = shapes[0][1];
  int64_t count = 1;
  for (int i = 0; i < ndims[1]; ++i) count *= shapes[1][i];
  const auto *table = static_cast<const uint16_t *>(params[0]);
  auto *out = static_cast<float *>(params[2]);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < count; ++r) {
    const int64_t id = ids64 ? static_cast<const int64_t *>(params[1])[r] : static_cast<const int32_t *>(params[1])[r];
    float *dst = out + r * d;
    if (id < 0 || id >= v) {
      std::memset(dst, 0, d * 4);
      continue;
    }
    const uint16_t *src = table + id * d;
    if (bf16) {
      for (int64_t c = 0; c < d; ++c) {
        const uint32_t bits = static_cast<uint32_t>(src[c]) << 16;
        std::memcpy(dst + c, &bits, 4);
      }
    } else {
      for (int64_t c = 0; c < d; ++c) dst[c] = _cvtsh_ss(src[c]);
    }
  }
  return 0;
}

// Attention for inference (see attention()): q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv) -> (B, H, Nq, dv).
int Attend(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  const bool masked = nparam == 5;
  if ((nparam != 4 && !masked) || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4) return 1;
  for (int i = 0; i < nparam - 1; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 1;
  const int64_t *qs = shapes[0], *ks = shapes[1], *vs = shapes[2];
  if (ks[0] != qs[0] || vs[0] != qs[0] || ks[1] != qs[1] || vs[1] != qs[1] || ks[3] != qs[3] || vs[2] != ks[2])
    return 1;
  if (masked && (ndims[3] != 2 || shapes[3][0] != qs[0] || shapes[3][1] != ks[2])) return 1;
  return attention(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                   static_cast<const float *>(params[2]), masked ? static_cast<const float *>(params[3]) : nullptr,
                   static_cast<float *>(params[nparam - 1]), qs[0], qs[1], qs[2], ks[2], qs[3], vs[3])
             ? 0
             : 1;
}

// The same with keep (B, Nk) required (a second name: one Custom operator per kernel name and input count).
int AttendMasked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a, void *b) {
  return nparam == 5 ? Attend(nparam, params, ndims, shapes, dtypes, a, b) : 1;
}

// Attend's gradient (see attention_grad()): q, k, v [, keep], out, dout -> dq, dk, dv.
int AttendGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  const bool masked = nparam == 9;
  if (nparam != 8 && !masked) return 1;
  const int n_in = nparam - 3, o = masked ? 4 : 3;  // o: index of out
  for (int i = 0; i < nparam; ++i)  // every buffer float32 and 4-d, but keep (B, Nk)
    if (std::strcmp(dtypes[i], "float32") != 0 || ndims[i] != (masked && i == 3 ? 2 : 4)) return 1;
  const int64_t *qs = shapes[0], *ks = shapes[1], *vs = shapes[2];
  if (ks[0] != qs[0] || vs[0] != qs[0] || ks[1] != qs[1] || vs[1] != qs[1] || ks[3] != qs[3] || vs[2] != ks[2])
    return 1;
  for (int i = o; i <= o + 1; ++i)  // out and dout: (B, H, Nq, dv)
    if (shapes[i][0] != qs[0] || shapes[i][1] != qs[1] || shapes[i][2] != qs[2] || shapes[i][3] != vs[3]) return 1;
  if (masked && (shapes[3][0] != qs[0] || shapes[3][1] != ks[2])) return 1;
  const auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const auto res = [&](int i) { return static_cast<float *>(params[n_in + i]); };
  return attention_grad(in(0), in(1), in(2), masked ? in(3) : nullptr, in(o), in(o + 1), res(0), res(1), res(2),
                        qs[0], qs[1], qs[2], ks[2], qs[3], vs[3])
             ? 0
             : 1;
}

// The same with keep required (a second name, as AttendMasked).
int AttendMaskedGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a, void *b) {
  return nparam == 9 ? AttendGrad(nparam, params, ndims, shapes, dtypes, a, b) : 1;
}

}  // extern "C"

#else  // no AVX-512: the Python side never selects these kernels (GemmAvailable() == 0)

extern "C" {
int GemmAvailable() { return 0; }
int GemmBf16Available() { return 0; }
int LinearXWtHalf(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int LinearXWtHalfBias(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int GatherRowsHalf(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int LinearXWt(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int LinearXWtBias(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int MatMulXW(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int MatMulXtW(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int Attend(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendMasked(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendGrad(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendMaskedGrad(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
}

#endif
