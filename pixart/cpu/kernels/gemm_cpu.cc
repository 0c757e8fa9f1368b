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

#include "gelu.h"
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

// A scratch buffer kept by its thread for the next call, grown as needed (up to kKeptMaxFloats; a larger request is
// allocated for the call alone): a fresh block of megabytes each call would be page-faulted in every time, and
// glibc serves such blocks from its heap once it has raised its mmap threshold, where per-call blocks between
// longer-lived allocations fragment it (a sampling run's RSS then grew by tens of MB).
constexpr int64_t kKeptMaxFloats = int64_t{8} << 20;  // 32 MB

struct KeptFloats {
  float *data = nullptr;
  int64_t size = 0;
  // `count` floats, valid until this thread's next get(); call release() with the pointer when done
  float *get(int64_t count) {
    if (count > kKeptMaxFloats) return aligned_floats(count);
    if (count > size) {
      std::free(data);
      data = aligned_floats(count);
      size = data == nullptr ? 0 : count;
    }
    return data;
  }
  void release(float *p) const {
    if (p != data) std::free(p);
  }
  ~KeptFloats() { std::free(data); }
};

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
  void prefetch_b(int64_t, int64_t, int64_t, int, int64_t, int64_t) const {}  // the fp32 GEMM as it was
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
  static thread_local KeptFloats kept;
  float *ap_floats = kept.get(blocks * tiles * kw * kRows);
  auto *ap = static_cast<Packed *>(static_cast<void *>(ap_floats));
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
        // the weights this item packs next (the next K block, else the panel this thread likely takes next),
        // requested from memory a share per tile while this block's tiles compute
        const bool last = s + 1 == blocks;
        const int64_t next_n0 = last ? (item + omp_get_num_threads()) / chunks * kCols : n0, next_k0 = last ? 0 : k0 + kb;
        const int next_kc = static_cast<int>(k - next_k0 < kb ? k - next_k0 : kb);
        for (int64_t t = t_lo; t < t_hi; ++t) {
          if (next_n0 < n) kind.prefetch_b(n, next_n0, next_k0, next_kc, t - t_lo, t_hi - t_lo);
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
  kept.release(ap_floats);
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

  // Part `part` of `parts` of the cache lines pack_b(n, n0, k0, kc) reads, prefetched into L2: a panel's 32 rows of W
  // are 32 streams far apart (a row is K x 2 bytes), too many for the hardware prefetchers, so without this the
  // packing waits on memory once per K block.
  void prefetch_b(int64_t n, int64_t n0, int64_t k0, int kc, int64_t part, int64_t parts) const {
    const int64_t cols = n - n0 < kCols ? n - n0 : kCols, lines = (kc * 2 + 63) / 64 + 1, total = cols * lines;
    for (int64_t idx = total * part / parts; idx < total * (part + 1) / parts; ++idx)
      _mm_prefetch(reinterpret_cast<const char *>(w + (n0 + idx / lines) * ldw + k0) + (idx % lines) * 64,
                   _MM_HINT_T1);
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

// The bf16 product for few rows (a text encoder's prompt, a short sequence): C^T's tiles in registers instead of
// C's. A vector holds 32 rows of x (two zmm) and each W value is broadcast from W's (N, K) layout: a W row is
// already a sequence of the (k, k + 1) pairs vdpbf16ps multiplies, so W is never transposed, only x is packed (once
// per call, as bf16 pairs: xp[block][tile][pair][32 rows]); transposing W panels costs as much as the products when
// few rows share each panel (measurements: docs/benchmarks.md, 'bf16 on CPU'). A W block (kRowsW rows of one K
// block) is copied as it is into a contiguous buffer (with K a multiple of 2048, W's rows lie a multiple of 4 KB
// apart: read in place, the kRowsW rows fall on the same L1 sets and evict each other) and reused from L1 across the
// row tiles. A work item is a group of kGroup W blocks (columns of C), run through all K blocks by one thread: each
// K block's x tiles (<= 64 KB at 128 rows) are reused kGroup times from L2, and the next K block's W rows are
// prefetched into L2 while this one computes. Its C^T partial sums stay in a per-thread buffer across K blocks and
// are transposed into C (+ bias) once at the end.
constexpr int kRowsW = 14;       // W rows per micro-tile: 14 x 2 accumulators + 2 x vectors = 30 zmm
constexpr int kGroup = 4;        // W blocks per work item
constexpr int kPairsK = 128;     // largest K block, in pairs: an x tile <= 128 x 32 x 4 B = 16 KB
constexpr int64_t kFewRowsMax = 512;  // up to this many rows of x, this kernel; more: Bf16Kind's (W packed per panel)

// acc (NB x 32, column j of C^T = row n0 + j of W) [+]= xp (pairs x 32 rows) . W[n0 .. n0 + NB)[pairs]^T, on the
// first R rows of the tile only (R = 32: two zmm; 24: a zmm and a ymm; 16: a zmm; 8: a ymm): the last row tile of
// x computes only the rows it has (a ymm's vdpbf16ps does half a zmm's work in as much time or less).
template <int NB, int R>
void rows_tile(const uint32_t *__restrict xp, const uint16_t *__restrict w, int64_t ldw, int pairs,
               float *__restrict acc_io, bool accumulate) {
  constexpr bool wide0 = R >= 16, has1 = R == 24 || R == 32, wide1 = R == 32;
  // rows 0-15 (or 0-7) in z0 (y0), rows 16-31 (16-23) in z1 (y1); the unused arrays compile away
  __m512 z0[NB], z1[NB];
  __m256 y0[NB], y1[NB];
  for (int j = 0; j < NB; ++j) {
    const float *a = acc_io + j * 32;
    if constexpr (wide0) z0[j] = accumulate ? _mm512_load_ps(a) : _mm512_setzero_ps();
    else y0[j] = accumulate ? _mm256_load_ps(a) : _mm256_setzero_ps();
    if constexpr (wide1) z1[j] = accumulate ? _mm512_load_ps(a + 16) : _mm512_setzero_ps();
    else if constexpr (has1) y1[j] = accumulate ? _mm256_load_ps(a + 16) : _mm256_setzero_ps();
  }
  const auto *w32 = reinterpret_cast<const int32_t *>(w);  // (k, k + 1) pairs; W rows are ldw / 2 words apart
  const int64_t ldw32 = ldw / 2;
  for (int p = 0; p < pairs; ++p) {
    const uint32_t *xr = xp + p * 32;
    if constexpr (wide0) {
      const __m512bh v0 = reinterpret_cast<__m512bh>(_mm512_load_si512(xr));
      __m512bh v1z{};
      __m256bh v1y{};
      if constexpr (wide1) v1z = reinterpret_cast<__m512bh>(_mm512_load_si512(xr + 16));
      else if constexpr (has1)
        v1y = reinterpret_cast<__m256bh>(_mm256_load_si256(reinterpret_cast<const __m256i *>(xr + 16)));
#pragma GCC unroll 14
      for (int j = 0; j < NB; ++j) {
        const __m512i b = _mm512_set1_epi32(w32[j * ldw32 + p]);
        z0[j] = _mm512_dpbf16_ps(z0[j], reinterpret_cast<__m512bh>(b), v0);
        if constexpr (wide1) z1[j] = _mm512_dpbf16_ps(z1[j], reinterpret_cast<__m512bh>(b), v1z);
        else if constexpr (has1)
          y1[j] = _mm256_dpbf16_ps(y1[j], reinterpret_cast<__m256bh>(_mm512_castsi512_si256(b)), v1y);
      }
    } else {
      const __m256bh v0 = reinterpret_cast<__m256bh>(_mm256_load_si256(reinterpret_cast<const __m256i *>(xr)));
#pragma GCC unroll 14
      for (int j = 0; j < NB; ++j)
        y0[j] = _mm256_dpbf16_ps(y0[j], reinterpret_cast<__m256bh>(_mm256_set1_epi32(w32[j * ldw32 + p])), v0);
    }
  }
  for (int j = 0; j < NB; ++j) {
    float *a = acc_io + j * 32;
    if constexpr (wide0) _mm512_store_ps(a, z0[j]); else _mm256_store_ps(a, y0[j]);
    if constexpr (wide1) _mm512_store_ps(a + 16, z1[j]);
    else if constexpr (has1) _mm256_store_ps(a + 16, y1[j]);
  }
}

template <int NB>
void rows_tile_upto(int nb, int rows, const uint32_t *xp, const uint16_t *w, int64_t ldw, int pairs, float *acc,
                    bool accumulate) {
  if constexpr (NB > 1) {
    if (nb < NB) return rows_tile_upto<NB - 1>(nb, rows, xp, w, ldw, pairs, acc, accumulate);
  }
  if (rows > 24) return rows_tile<NB, 32>(xp, w, ldw, pairs, acc, accumulate);
  if (rows > 16) return rows_tile<NB, 24>(xp, w, ldw, pairs, acc, accumulate);
  if (rows > 8) return rows_tile<NB, 16>(xp, w, ldw, pairs, acc, accumulate);
  rows_tile<NB, 8>(xp, w, ldw, pairs, acc, accumulate);
}

// x (m, k) fp32 rows [m0, m0 + 32) (zeros past m), K values [k0, k0 + kc) -> xp[p * 32 + i] = bf16 pair p of row i.
void pack_x_pairs(const float *x, int64_t ldx, int64_t m, int64_t m0, int64_t k0, int kc, uint32_t *xp) {
  for (int kk = 0; kk < kc; kk += 32) {
    const int left = kc - kk;
    const __mmask16 lo = Bf16Kind::mask16(left), hi = Bf16Kind::mask16(left - 16);
    const int pairs = left >= 32 ? 16 : (left + 1) / 2;
    for (int h = 0; h < 2; ++h) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = m0 + h * 16 + i;
        if (row < m) {
          const float *src = x + row * ldx + k0 + kk;
          r[i] = reinterpret_cast<__m512>(
              _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 16), _mm512_maskz_loadu_ps(lo, src)));
        } else {
          r[i] = _mm512_setzero_ps();
        }
      }
      transpose16(r);
      for (int q = 0; q < pairs; ++q) _mm512_store_ps(reinterpret_cast<float *>(xp + (kk / 2 + q) * 32 + h * 16), r[q]);
    }
  }
}

// y (m, n) = x (m, k) fp32 rounded to bf16 . W (n, k) bf16 ^T (+ bias), for m <= kFewRowsMax and even k > 0 (a W
// row is then whole pairs). Returns false when out of memory.
bool gemm_bf16_few_rows(const float *x, int64_t ldx, const uint16_t *w, int64_t ldw, const float *bias, float *c,
                        int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0) return true;
  const int64_t tiles = (m + 31) / 32;
  const int64_t pairs_k = k / 2, blocks = (pairs_k + kPairsK - 1) / kPairsK;
  const int64_t kp = ((pairs_k + blocks - 1) / blocks + 15) / 16 * 16;  // pairs per K block (16: one transpose)
  const int64_t span = kRowsW * kGroup, items = (n + span - 1) / span;
  static thread_local KeptFloats keep;  // x's packing
  auto *xp = reinterpret_cast<uint32_t *>(keep.get(blocks * tiles * kp * 32));
  if (xp == nullptr) return false;
  bool ok = true;
  // dynamic: on shared cores a descheduled thread would otherwise hold the other at the barrier for its share
#pragma omp parallel for collapse(2) schedule(dynamic, 2)
  for (int64_t s = 0; s < blocks; ++s)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t k0 = s * kp * 2;
      const int kc = static_cast<int>(k - k0 < kp * 2 ? k - k0 : kp * 2);
      pack_x_pairs(x, ldx, m, t * 32, k0, kc, xp + (s * tiles + t) * kp * 32);
    }
#pragma omp parallel
  {
    float *acc = aligned_floats(kGroup * tiles * kRowsW * 32);
    auto *wbuf = reinterpret_cast<uint16_t *>(aligned_floats(kRowsW * kp));
    if (acc == nullptr || wbuf == nullptr) {
#pragma omp atomic write
      ok = false;
    }
    const int64_t threads = omp_get_num_threads();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      if (acc == nullptr || wbuf == nullptr) continue;
      const int64_t n0 = item * span, rows_w = n - n0 < span ? n - n0 : span;
      for (int64_t s = 0; s < blocks; ++s) {
        const int64_t p0 = s * kp, pairs = pairs_k - p0 < kp ? pairs_k - p0 : kp;
        // the W rows this item reads next (next K block, else the next item this thread likely takes), into L2
        const int64_t next_n0 = s + 1 < blocks ? n0 : (item + threads) * span, next_p0 = s + 1 < blocks ? p0 + kp : 0;
        const int64_t next_rows = next_n0 < n ? (n - next_n0 < span ? n - next_n0 : span) : 0;
        const int64_t next_pairs = pairs_k - next_p0 < kp ? pairs_k - next_p0 : kp;
        const int64_t lines = (next_pairs * 4 + 63) / 64 + 1;
        const int64_t total = next_rows * lines, calls = kGroup * tiles;
        int64_t call = 0;
        for (int g = 0; g < kGroup; ++g) {
          const int64_t nb0 = g * kRowsW;
          if (nb0 >= rows_w) break;
          const int nb = static_cast<int>(rows_w - nb0 < kRowsW ? rows_w - nb0 : kRowsW);
          for (int j = 0; j < nb; ++j) std::memcpy(wbuf + j * kp * 2, w + (n0 + nb0 + j) * ldw + p0 * 2, pairs * 4);
          for (int64_t t = 0; t < tiles; ++t, ++call) {
            const int64_t idx_end = total * (call + 1) / calls;
            for (int64_t idx = total * call / calls; idx < idx_end; ++idx)
              _mm_prefetch(reinterpret_cast<const char *>(w + (next_n0 + idx / lines) * ldw + next_p0 * 2) +
                               (idx % lines) * 64, _MM_HINT_T1);
            rows_tile_upto<kRowsW>(nb, static_cast<int>(m - t * 32), xp + (s * tiles + t) * kp * 32, wbuf, kp * 2,
                                   static_cast<int>(pairs), acc + (g * tiles + t) * kRowsW * 32, s > 0);
          }
        }
      }
      // C^T partial sums -> C rows, 16 x 16 at a time
      for (int g = 0; g < kGroup; ++g) {
        const int64_t nb0 = g * kRowsW;
        if (nb0 >= rows_w) break;
        const int nb = static_cast<int>(rows_w - nb0 < kRowsW ? rows_w - nb0 : kRowsW);
        const __mmask16 cols = Bf16Kind::mask16(nb);
        const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(cols, bias + n0 + nb0) : _mm512_setzero_ps();
        for (int64_t t = 0; t < tiles; ++t)
          for (int h = 0; h < 2; ++h) {
            const float *a = acc + (g * tiles + t) * kRowsW * 32 + h * 16;
            __m512 r[16];
            for (int j = 0; j < 16; ++j) r[j] = j < nb ? _mm512_load_ps(a + j * 32) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; ++i) {
              const int64_t row = t * 32 + h * 16 + i;
              if (row < m) _mm512_mask_storeu_ps(c + row * n + n0 + nb0, cols, _mm512_add_ps(r[i], b));
            }
          }
      }
    }
    std::free(acc);
    std::free(wbuf);
  }
  keep.release(reinterpret_cast<float *>(xp));
  return ok;
}
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

// Attention on token-major operands, inference: out (B, Nq, H*dv) = per head softmax(scale q k^T + bias, masked by
// keep) v for q rows (B, Nq) of H*d at stride sq, k and v rows (B, Nk) of H*d / H*dv at strides sk / sv, keep (B, Nk)
// or null, bias (1 or B, H, Nq, Nk) or null. No head-layout copies: q, k and v are read in place from the Linear
// layers that made them, fused qkv / kv projections included (on MindSpore's CPU backend each layout copy is a
// tokens-sized temporary that a graph keeps to its end). T5 passes its relative position bias (padded keys already
// at -finfo.max as HF adds them: their probability then underflows to ~0, and a row with every key padded comes out
// uniform, as HF's) and scale 1; PixArt passes 1/sqrt(d) and the caption's keep. Work items as in attention():
// blocks of query rows of one (batch, head), two single-threaded GEMMs around the softmax.
bool attention_tokens(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv,
                      const float *keep, const float *bias, int64_t bias_batch, float scale, float *out, int64_t b,
                      int64_t h, int64_t nq, int64_t nk, int64_t d, int64_t dv) {
  const int64_t tiles = (nq + kRows - 1) / kRows, blocks = (nq + 255) / 256;
  const int64_t block_rows = (tiles + blocks - 1) / blocks * kRows;
  bool ok = true;
#pragma omp parallel
  {
    float *s = aligned_floats(block_rows * (nk + dv)), *o = s == nullptr ? nullptr : s + block_rows * nk;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < b * h; ++bh)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t bi = bh / h, hi = bh % h, q0 = blk * block_rows;
        const int64_t rows = nq - q0 < block_rows ? nq - q0 : block_rows;
        if (rows <= 0) continue;
        const Operand qa{q + (bi * nq + q0) * sq + hi * d, sq, false}, kt{k + bi * nk * sk + hi * d, sk, true};
        const Operand pa{s, nk, false}, va{v + bi * nk * sv + hi * dv, sv, false};
        // nested inside this parallel region, each gemm runs on the calling thread alone
        bool done = s != nullptr && gemm(qa, kt, nullptr, s, rows, nk, d);
        if (done) {
          if (bias != nullptr) {
            const float *br = bias + ((bias_batch > 1 ? bi : 0) * h + hi) * nq * nk + q0 * nk;
#pragma omp simd
            for (int64_t i = 0; i < rows * nk; ++i) s[i] = s[i] * scale + br[i];
          } else {
#pragma omp simd
            for (int64_t i = 0; i < rows * nk; ++i) s[i] *= scale;
          }
          softmax_rows(s, s, rows, nk, keep == nullptr ? nullptr : keep + bi * nk);
          done = gemm(pa, va, nullptr, o, rows, dv, nk);
        }
        if (!done) {
#pragma omp atomic write
          ok = false;
          continue;
        }
        for (int64_t i = 0; i < rows; ++i)
          std::memcpy(out + (bi * nq + q0 + i) * h * dv + hi * dv, o + i * dv, dv * 4);
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
  if (std::strcmp(dtypes[1], "bfloat16") == 0) {
    if (m <= kFewRowsMax && k > 0 && k % 2 == 0) return gemm_bf16_few_rows(x, k, w, k, b, y, m, n, k) ? 0 : 1;
    return gemm_kind(Bf16Kind{x, k, w, k}, b, y, m, n, k) ? 0 : 1;
  }
#endif
  return 1;
}

// The same with the bias required (a second name, as LinearXWtBias).
int LinearXWtHalfBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a,
                      void *b) {
  return nparam == 4 ? LinearXWtHalf(nparam, params, ndims, shapes, dtypes, a, b) : 1;
}

#if defined(__AVX512BF16__)
// The timm Mlp of a block with bf16 weights, inference: y = gelu_tanh(x W1^T + b1) W2^T + b2; x (M, C) fp32, W1
// (H, C) and W2 (O, H) bf16, b1 (H), b2 (O) fp32, y (M, O) fp32. The rows go through in blocks of at most kMlpRows
// (equal blocks), so the hidden layer exists a block at a time (H floats per row of the block, not per row of x):
// on MindSpore's CPU backend fc1's and GELU's outputs, each 4x the tokens', were a graph's largest temporaries.
// Each block computes exactly as LinearXWtHalf then BiasGeluTanh then LinearXWtHalfBias on its rows would.
constexpr int64_t kMlpRows = 256;

bool half_product(const float *x, const uint16_t *w, const float *bias, float *y, int64_t m, int64_t n, int64_t k) {
  if (m <= kFewRowsMax && k > 0 && k % 2 == 0) return gemm_bf16_few_rows(x, k, w, k, bias, y, m, n, k);
  return gemm_kind(Bf16Kind{x, k, w, k}, bias, y, m, n, k);
}

int MlpHalf(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || ndims[3] != 2 || std::strcmp(dtypes[0], "float32") != 0 ||
      std::strcmp(dtypes[1], "bfloat16") != 0 || std::strcmp(dtypes[3], "bfloat16") != 0 ||
      std::strcmp(dtypes[2], "float32") != 0 || std::strcmp(dtypes[4], "float32") != 0)
    return 1;
  const int64_t m = shapes[0][0], c = shapes[0][1], h = shapes[1][0], o = shapes[3][0];
  if (shapes[1][1] != c || shapes[2][0] != h || shapes[3][1] != h || shapes[4][0] != o) return 1;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *w1 = static_cast<const uint16_t *>(params[1]), *w2 = static_cast<const uint16_t *>(params[3]);
  const auto *b1 = static_cast<const float *>(params[2]), *b2 = static_cast<const float *>(params[4]);
  auto *y = static_cast<float *>(params[5]);
  const int64_t blocks = (m + kMlpRows - 1) / kMlpRows, rows = blocks == 0 ? 0 : (m + blocks - 1) / blocks;
  static thread_local KeptFloats kept;
  float *hidden = kept.get(rows * h);
  if (hidden == nullptr && m > 0) return 1;
  bool ok = true;
  for (int64_t r0 = 0; r0 < m && ok; r0 += rows) {
    const int64_t mr = m - r0 < rows ? m - r0 : rows;
    ok = half_product(x + r0 * c, w1, nullptr, hidden, mr, h, c);
    if (!ok) break;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < mr; ++r) bias_gelu_tanh_row(hidden + r * h, b1, hidden + r * h, h);
    ok = half_product(hidden, w2, b2, y + r0 * o, mr, o, h);
  }
  kept.release(hidden);
  return ok ? 0 : 1;
}
#else
int MlpHalf(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
#endif

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

// T5's attention (see attention_tokens()): q, k (B, N, H*d), v (B, N, H*dv), bias (1 or B, H, N, N) -> (B, N, H*dv).
int AttendBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 4) return 1;
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 1;
  const int64_t *qs = shapes[0], *ks = shapes[1], *vs = shapes[2], *bs = shapes[3];
  const int64_t b = qs[0], n = qs[1], h = bs[1];
  if (h <= 0 || qs[2] % h != 0 || vs[2] % h != 0) return 1;
  for (int i = 0; i < 3; ++i)
    if (ks[i] != qs[i] || (i < 2 && vs[i] != qs[i])) return 1;
  if ((bs[0] != 1 && bs[0] != b) || bs[2] != n || bs[3] != n) return 1;
  const int64_t d = qs[2] / h, dv = vs[2] / h;
  return attention_tokens(static_cast<const float *>(params[0]), h * d, static_cast<const float *>(params[1]), h * d,
                          static_cast<const float *>(params[2]), h * dv, nullptr,
                          static_cast<const float *>(params[3]), bs[0], 1.0f, static_cast<float *>(params[4]), b, h,
                          n, n, d, dv)
             ? 0
             : 1;
}

// Self-attention on a fused projection (see attention_tokens()): qkv (B, N, 3C) (queries, keys, values side by
// side), scale_heads (2,) = [scale, H] -> (B, N, C).
int AttendQKV(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] != 3 || std::strcmp(dtypes[0], "float32") != 0 ||
      std::strcmp(dtypes[1], "float32") != 0)
    return 1;
  const float *sh = static_cast<const float *>(params[1]);
  const int64_t b = shapes[0][0], n = shapes[0][1], c3 = shapes[0][2], h = static_cast<int64_t>(sh[1]);
  if (c3 % 3 != 0 || h <= 0 || (c3 / 3) % h != 0) return 1;
  const int64_t c = c3 / 3;
  const auto *qkv = static_cast<const float *>(params[0]);
  return attention_tokens(qkv, c3, qkv + c, c3, qkv + 2 * c, c3, nullptr, nullptr, 0, sh[0],
                          static_cast<float *>(params[2]), b, h, n, n, c / h, c / h)
             ? 0
             : 1;
}

// Cross-attention on token-major queries and a fused keys/values projection: q (B, Nq, C), kv (B, Nk, 2C) (keys,
// values side by side) [, keep (B, Nk)], scale_heads (2,) = [scale, H] -> (B, Nq, C).
int AttendKV(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  const bool masked = nparam == 5;
  if ((nparam != 4 && !masked) || ndims[0] != 3 || ndims[1] != 3) return 1;
  for (int i = 0; i < nparam - 1; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 1;
  const float *sh = static_cast<const float *>(params[nparam - 2]);
  const int64_t b = shapes[0][0], nq = shapes[0][1], c = shapes[0][2], nk = shapes[1][1];
  const int64_t h = static_cast<int64_t>(sh[1]);
  if (shapes[1][0] != b || shapes[1][2] != 2 * c || h <= 0 || c % h != 0) return 1;
  if (masked && (ndims[2] != 2 || shapes[2][0] != b || shapes[2][1] != nk)) return 1;
  const auto *kv = static_cast<const float *>(params[1]);
  return attention_tokens(static_cast<const float *>(params[0]), c, kv, 2 * c, kv + c, 2 * c,
                          masked ? static_cast<const float *>(params[2]) : nullptr, nullptr, 0, sh[0],
                          static_cast<float *>(params[nparam - 1]), b, h, nq, nk, c / h, c / h)
             ? 0
             : 1;
}

// The same with keep required (a second name, as AttendMasked).
int AttendKVMasked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *a, void *b) {
  return nparam == 5 ? AttendKV(nparam, params, ndims, shapes, dtypes, a, b) : 1;
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
int MlpHalf(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int GatherRowsHalf(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int LinearXWt(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int LinearXWtBias(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int MatMulXW(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int MatMulXtW(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int Attend(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendMasked(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendGrad(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendBias(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendQKV(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendKV(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendKVMasked(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
int AttendMaskedGrad(int, void **, int *, int64_t **, const char **, void *, void *) { return 1; }
}

#endif
