// Fused fp32 kernels for MindSpore's CPU backend (ops.Custom, func_type "aot").
//
// Why: on MindSpore's CPU backend every elementwise op is one pass over memory with its own launch, and a
// PixArt block at 256 px spends more time in those passes (LayerNorm, adaLN modulation, GELU's six ops, gates,
// layout transposes, softmax) than PyTorch does. Each kernel here does in one pass what took several ops.
// They compute exactly the formulas of the unfused path in pixart/backend.py (tests compare both).
//
// Calling convention (MindSpore AOT): params holds the inputs, then the outputs; ndims/shapes describe each.
// Every buffer is dense and row-major. Return 0 on success. Built with -ffast-math (vectorised expf): no kernel
// relies on infinities or NaNs.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "gelu.h"
#include "softmax.h"

namespace {

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Rows along the last axis of x (N, ..., D): their length, their count, and how many belong to each of the N samples
// (per-sample vectors such as adaLN's shift or a gate are indexed by row / per_sample).
struct Rows {
  int64_t d, count, per_sample;
};

Rows rows_of(int ndim, const int64_t *shape) {
  const int64_t d = shape[ndim - 1], count = numel(ndim, shape) / d;
  return {d, count, count / shape[0]};
}

// Whether the first n buffers are float32 (the training kernels refuse anything else rather than misread it).
bool all_float32(int n, const char **dtypes) {
  for (int i = 0; i < n; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// exp with its argument clamped to [-80, 80]: the result stays a normal float, so glibc's vectorised expf keeps its
// fast path (over- and underflowing inputs take a slow one: a GELU went 4 ms -> 37 ms on large activations); no
// result here changes beyond rounding (v / (1 + e^80) and e^-80 are ~0 next to what they are added to).
inline float clamped_exp(float x) { return std::exp(std::fmax(std::fmin(x, 80.0f), -80.0f)); }

}  // namespace

extern "C" {

// y = gelu_tanh(x + b); x (..., C), b (C) (gelu.h).
int BiasGeluTanh(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t c = shapes[1][0], rows = numel(ndims[0], shapes[0]) / c;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) bias_gelu_tanh_row(x + r * c, b, y + r * c, c);
  return 0;
}

// y = gelu_tanh(a) * b, inference (T5 v1.1's gated feed-forward); a, b, y of one shape.
int GeluTanhMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3 || ndims[0] != ndims[1]) return 1;
  for (int i = 0; i < ndims[0]; ++i)
    if (shapes[0][i] != shapes[1][i]) return 1;
  const float *a = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t count = numel(ndims[0], shapes[0]), chunk = 4096;
  const float c1 = 1.5957691216057308f, c3 = c1 * 0.044715f;  // as BiasGeluTanh
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < count; s += chunk) {
    const int64_t end = s + chunk < count ? s + chunk : count;
#pragma omp simd
    for (int64_t j = s; j < end; ++j) {
      const float v = a[j];
      y[j] = v / (1.0f + clamped_exp(-v * (c1 + c3 * v * v))) * b[j];
    }
  }
  return 0;
}

// BiasGeluTanh's gradient: dx = dy * gelu_tanh'(x + b), with gelu_tanh'(v) = s + v s (1 - s) (c1 + 3 c3 v^2) for
// s = sigmoid(c1 v + c3 v^3) (the gradient for b is dx summed over rows); x, dy, dx (..., C), b (C).
int BiasGeluTanhGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t c = shapes[1][0], rows = numel(ndims[0], shapes[0]) / c;
  const float c1 = 1.5957691216057308f, c3 = c1 * 0.044715f;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * c, *dyr = dy + r * c;
    float *dxr = dx + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float v = xr[j] + b[j], v2 = v * v;
      const float s = 1.0f / (1.0f + clamped_exp(-v * (c1 + c3 * v2)));
      dxr[j] = dyr[j] * (s + v * s * (1.0f - s) * (c1 + 3.0f * c3 * v2));
    }
  }
  return 0;
}

// adaLN: y = LayerNorm(x) * (1 + scale[n]) + shift[n]; x (N, T, D), shift and scale (N, D) (any shape of N*D
// elements), eps (1,). The LayerNorm has no affine parameters (PixArt's norm1 / norm2 / norm_final).
int LayerNormModulate(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *shift = static_cast<const float *>(params[1]);
  const float *scale = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const Rows rows = rows_of(ndims[0], shapes[0]);
  const int64_t d = rows.d;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows.count; ++r) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    const float *sh = shift + (r / rows.per_sample) * d, *sc = scale + (r / rows.per_sample) * d;
    double sum = 0.0;
    for (int64_t j = 0; j < d; ++j) sum += xr[j];
    const float mean = static_cast<float>(sum / d);
    double sq = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const float c = xr[j] - mean;
      sq += c * c;
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(sq / d) + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mean) * inv * (1.0f + sc[j]) + sh[j];
  }
  return 0;
}

// Patch embedding plus position embedding, inference: latents x (N, C, H, W), the stride-p convolution's weight
// (D, C, p, p) and bias (D), pos (T, D), T = (H/p)(W/p) -> tokens (N, T, D) = conv(x) + bias + pos, token-major
// straight away: no (N, D, h, w) output to transpose, no broadcast position add (on MindSpore's CPU backend these
// took a graph ~8 outputs' worth of memory for one (N, T, D) result).
int PatchEmbed(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes) || ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 2) return 1;
  const int64_t n = shapes[0][0], c = shapes[0][1], hh = shapes[0][2], ww = shapes[0][3];
  const int64_t d = shapes[1][0], p = shapes[1][2];
  if (shapes[1][1] != c || shapes[1][3] != p || p <= 0 || hh % p != 0 || ww % p != 0) return 1;
  const int64_t h = hh / p, w = ww / p, t = h * w, k = c * p * p;
  if (shapes[2][0] != d || shapes[3][0] != t || shapes[3][1] != d) return 1;
  const float *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]), *pos = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  float *wt = new (std::nothrow) float[k * d];  // weight as (C*p*p, D): a token's row is then k axpys over D
  if (wt == nullptr) return 1;
  for (int64_t o = 0; o < d; ++o)
    for (int64_t j = 0; j < k; ++j) wt[j * d + o] = weight[o * k + j];
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n * t; ++r) {
    const int64_t b = r / t, tok = r % t, i0 = (tok / w) * p, j0 = (tok % w) * p;
    float *o = out + r * d;
    for (int64_t e = 0; e < d; ++e) o[e] = 0.0f;
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < p; ++j) {
          const float v = x[((b * c + ch) * hh + i0 + i) * ww + j0 + j];
          const float *wr = wt + ((ch * p + i) * p + j) * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) o[e] += v * wr[e];
        }
    const float *pr = pos + tok * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) o[e] = (o[e] + bias[e]) + pr[e];
  }
  delete[] wt;
  return 0;
}

// Gated residual: out = x + gate[n] * y; x, y (N, T, D), gate (N, D) (any shape of N*D elements).
int GatedResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gate = static_cast<const float *>(params[1]);
  const float *y = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const Rows rows = rows_of(ndims[0], shapes[0]);
  const int64_t d = rows.d;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows.count; ++r) {
    const float *g = gate + (r / rows.per_sample) * d;
    const float *xr = x + r * d, *yr = y + r * d;
    float *o = out + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) o[j] = xr[j] + g[j] * yr[j];
  }
  return 0;
}

// Attention's layout change times scale: heads first, x (B, S, H*d) -> out (B, H, S, d), or back, x (B, H, S, d) ->
// out (B, S, H*d); heads_shape is the (B, H, S, d) side's shape.
static void relayout_heads(const float *x, float scale, float *out, const int64_t *heads_shape, bool heads_first) {
  const int64_t b = heads_shape[0], h = heads_shape[1], s = heads_shape[2], d = heads_shape[3];
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t t = 0; t < s; ++t) {
      for (int64_t k = 0; k < h; ++k) {
        const int64_t tokens_major = ((i * s + t) * h + k) * d, heads_major = ((i * h + k) * s + t) * d;
        const float *src = x + (heads_first ? tokens_major : heads_major);
        float *dst = out + (heads_first ? heads_major : tokens_major);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * scale;
      }
    }
  }
}

static void to_heads(const float *x, float scale, float *out, const int64_t *out_shape) {
  relayout_heads(x, scale, out, out_shape, true);
}

static void from_heads(const float *x, float scale, float *out, const int64_t *in_shape) {
  relayout_heads(x, scale, out, in_shape, false);
}

// x (B, S, H*d), scale (1,) -> (B, H, S, d).
int ToHeads(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  to_heads(static_cast<const float *>(params[0]), *static_cast<const float *>(params[1]),
           static_cast<float *>(params[2]), shapes[2]);
  return 0;
}

// ToHeads shaped as a template: x (B, S, H*d), like (B, H, S, d; only its shape is used), scale (1,) ->
// (B, H, S, d) (FromHeads's gradient, which knows H from its input's shape).
int ToHeadsAs(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  to_heads(static_cast<const float *>(params[0]), *static_cast<const float *>(params[2]),
           static_cast<float *>(params[3]), shapes[3]);
  return 0;
}

// x (B, H, S, d) -> (B, S, H*d).
int FromHeads(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 2) return 1;
  from_heads(static_cast<const float *>(params[0]), 1.0f, static_cast<float *>(params[1]), shapes[0]);
  return 0;
}

// x (B, H, S, d), scale (1,) -> (B, S, H*d) times scale (ToHeads's gradient).
int FromHeadsScaled(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  from_heads(static_cast<const float *>(params[0]), *static_cast<const float *>(params[1]),
             static_cast<float *>(params[2]), shapes[0]);
  return 0;
}

// Softmax over the last axis of scores (B, H, Nq, Nk), keys where keep (B, Nk) is 0 excluded (probability 0;
// a row with no key kept gets uniform weights, as adding -1e9 before the softmax gives).
int MaskedSoftmax(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *keep = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t b = shapes[0][0], h = shapes[0][1], nq = shapes[0][2], nk = shapes[0][3];
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < b * h; ++i)
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t row = (i * nq + q) * nk;
      softmax_rows(x + row, y + row, 1, nk, keep + (i / h) * nk);
    }
  return 0;
}

// Softmax over the last axis of scores (B, H, Nq, Nk), no mask.
int Softmax(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t nk = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / nk;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) softmax_rows(x + r * nk, y + r * nk, 1, nk, nullptr);
  return 0;
}

// T5's RMS norm, inference: y = w * x / sqrt(mean(x^2) + eps) over the last axis; x, y (..., D), w (D), eps (1,).
int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t d = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / d;
  if (shapes[1][0] != d) return 1;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d; ++j) sum += static_cast<double>(xr[j]) * xr[j];
    const float inv = 1.0f / std::sqrt(static_cast<float>(sum / d) + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * inv);
  }
  return 0;
}

// GroupNorm over x (N, C, ...) with `groups` groups, per-channel gamma and beta (C), then SiLU when `silu`.
// settings (2,) = [groups, eps].
static int group_norm(void **params, int *ndims, int64_t **shapes, bool silu) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *settings = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t n = shapes[0][0], c = shapes[0][1], groups = static_cast<int64_t>(settings[0]);
  const float eps = settings[1];
  const int64_t spatial = numel(ndims[0], shapes[0]) / (n * c), per_group = c / groups;
  if (groups <= 0 || c % groups) return 1;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t start = (i * c + g * per_group) * spatial, count = per_group * spatial;
      double sum = 0.0, sq = 0.0;
      for (int64_t j = 0; j < count; ++j) sum += x[start + j];
      const double mean = sum / count;
      for (int64_t j = 0; j < count; ++j) {
        const double d = x[start + j] - mean;
        sq += d * d;
      }
      const float inv = 1.0f / std::sqrt(static_cast<float>(sq / count) + eps), m = static_cast<float>(mean);
      for (int64_t ch = 0; ch < per_group; ++ch) {
        const int64_t channel = g * per_group + ch;
        const float a = gamma[channel] * inv, b = beta[channel] - m * a;
        const float *xr = x + start + ch * spatial;
        float *yr = y + start + ch * spatial;
        if (silu) {
#pragma omp simd
          for (int64_t j = 0; j < spatial; ++j) {
            const float v = xr[j] * a + b;
            yr[j] = v / (1.0f + clamped_exp(-v));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < spatial; ++j) yr[j] = xr[j] * a + b;
        }
      }
    }
  }
  return 0;
}

int GroupNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return nparam == 5 ? group_norm(params, ndims, shapes, false) : 1;
}

int GroupNormSiLU(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return nparam == 5 ? group_norm(params, ndims, shapes, true) : 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients of the fused kernels above (training: each kernel's bprop in pixart/kernels/__init__.py). Gradients of
// per-sample vectors (shift, scale, gate) are sums over the sample's rows: the threads split the columns, and each
// adds its columns over the rows in order, so results do not depend on the thread count.
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kColumnChunk = 64;

// LayerNormModulate's gradient: x (N, T, D), shift and scale (N*D elements), eps (1,), dy (N, T, D) -> dx (N, T, D),
// dshift, dscale (shaped as shift and scale). With xhat = (x - mean) * inv and g = dy * (1 + scale):
// dx = inv * (g - mean(g) - xhat * mean(g * xhat)), dshift = sum over T of dy, dscale = sum over T of dy * xhat.
int LayerNormModulateGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (nparam != 8 || !all_float32(8, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]), *dshift = static_cast<float *>(params[6]);
  float *dscale = static_cast<float *>(params[7]);
  const Rows rows = rows_of(ndims[0], shapes[0]);
  const int64_t d = rows.d, samples = rows.count / rows.per_sample;
  float *stats = new (std::nothrow) float[2 * rows.count];  // mean, inv per row
  if (stats == nullptr) return 1;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows.count; ++r) {
    const float *xr = x + r * d, *dyr = dy + r * d, *sc = scale + (r / rows.per_sample) * d;
    float *dxr = dx + r * d;
    double sum = 0.0;
    for (int64_t j = 0; j < d; ++j) sum += xr[j];
    const float mean = static_cast<float>(sum / d);
    double sq = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const float c = xr[j] - mean;
      sq += c * c;
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(sq / d) + eps);
    float g_sum = 0.0f, gx_sum = 0.0f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
    for (int64_t j = 0; j < d; ++j) {
      const float g = dyr[j] * (1.0f + sc[j]);
      g_sum += g;
      gx_sum += g * (xr[j] - mean) * inv;
    }
    const float g_mean = g_sum / d, gx_mean = gx_sum / d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j)
      dxr[j] = inv * (dyr[j] * (1.0f + sc[j]) - g_mean - (xr[j] - mean) * inv * gx_mean);
    stats[2 * r] = mean;
    stats[2 * r + 1] = inv;
  }
  const int64_t chunks = (d + kColumnChunk - 1) / kColumnChunk;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kColumnChunk, j1 = j0 + kColumnChunk < d ? j0 + kColumnChunk : d;
      float *ds = dshift + n * d, *dc = dscale + n * d;
      for (int64_t j = j0; j < j1; ++j) ds[j] = dc[j] = 0.0f;
      for (int64_t r = n * rows.per_sample; r < (n + 1) * rows.per_sample; ++r) {
        const float *xr = x + r * d, *dyr = dy + r * d;
        const float mean = stats[2 * r], inv = stats[2 * r + 1];
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          ds[j] += dyr[j];
          dc[j] += dyr[j] * (xr[j] - mean) * inv;
        }
      }
    }
  delete[] stats;
  return 0;
}

// GatedResidual's gradient for gate and y (x's is dout itself): gate (N*D elements), y (N, T, D), dout (N, T, D)
// -> dgate (shaped as gate) = sum over T of dout * y, dy = gate * dout.
int GatedResidualGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  const float *gate = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[2]);
  float *dgate = static_cast<float *>(params[3]), *dy = static_cast<float *>(params[4]);
  const Rows rows = rows_of(ndims[1], shapes[1]);
  const int64_t d = rows.d, samples = rows.count / rows.per_sample, chunks = (d + kColumnChunk - 1) / kColumnChunk;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kColumnChunk, j1 = j0 + kColumnChunk < d ? j0 + kColumnChunk : d;
      const float *g = gate + n * d;
      float *dg = dgate + n * d;
      for (int64_t j = j0; j < j1; ++j) dg[j] = 0.0f;
      for (int64_t r = n * rows.per_sample; r < (n + 1) * rows.per_sample; ++r) {
        const float *yr = y + r * d, *dr = dout + r * d;
        float *dyr = dy + r * d;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          dg[j] += dr[j] * yr[j];
          dyr[j] = g[j] * dr[j];
        }
      }
    }
  return 0;
}

// Softmax's (and MaskedSoftmax's) gradient over the last axis: p, dp (..., Nk) -> ds = p * (dp - sum(p * dp)).
// Masked keys have p = 0 and get 0.
int SoftmaxGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !all_float32(3, dtypes)) return 1;
  const float *p = static_cast<const float *>(params[0]);
  const float *dp = static_cast<const float *>(params[1]);
  float *ds = static_cast<float *>(params[2]);
  const int64_t nk = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / nk;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *pr = p + r * nk, *dpr = dp + r * nk;
    float *dsr = ds + r * nk;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < nk; ++j) dot += pr[j] * dpr[j];
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) dsr[j] = pr[j] * (dpr[j] - dot);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Training: gradient norm and optimizer / EMA updates in place. MindSpore's CPU graph runtime keeps every
// intermediate of a graph alive until the graph ends, so AdamW written as ~14 elementwise ops per parameter held
// ~15x the parameters' size (measured: +10.6 GB for 0.69 GB of parameters). These kernels write the parameter and
// its state where they are and output one dummy float, which the caller threads into later kernels to order them.
// ---------------------------------------------------------------------------------------------------------------

// out (1,) = sum((x / scale)^2), accumulated in double; x any shape, scale (1,).
int SquareSum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !all_float32(3, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const double inv = 1.0 / static_cast<double>(static_cast<const float *>(params[1])[0]);
  const int64_t n = numel(ndims[0], shapes[0]);
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i] * inv;
    total += v * v;
  }
  static_cast<float *>(params[2])[0] = static_cast<float>(total);
  return 0;
}

// PyTorch's AdamW on param, exp_avg m, exp_avg_sq v (same shape) with g = grad * (coef / scale), in place;
// hyper (9,) = [lr, beta1, beta2, eps, weight_decay, step, scale, coef, after] (`after`: ordering only). out (1,) = 0.
int AdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  float *p = static_cast<float *>(params[0]);
  float *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const float *grad = static_cast<const float *>(params[3]);
  const float *h = static_cast<const float *>(params[4]);
  const float lr = h[0], b1 = h[1], b2 = h[2], eps = h[3], wd = h[4], step = h[5], scale = h[6], coef = h[7];
  const float step_size = lr / (1.0f - std::pow(b1, step)), bc2_sqrt = std::sqrt(1.0f - std::pow(b2, step));
  const float decay = 1.0f - lr * wd;
  const float unscale = static_cast<float>(static_cast<double>(coef) / scale);  // one factor, formed in double
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * unscale;
    const float mi = m[i] + (g - m[i]) * (1.0f - b1);
    const float vi = v[i] * b2 + g * g * (1.0f - b2);
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
  }
  static_cast<float *>(params[5])[0] = 0.0f;
  return 0;
}

// average = average * rate + param * (1 - rate), in place; hyper (2,) = [rate, after]. out (1,) = 0.
int EmaUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  float *avg = static_cast<float *>(params[0]);
  const float *p = static_cast<const float *>(params[1]);
  const float rate = static_cast<const float *>(params[2])[0];
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) avg[i] = avg[i] * rate + p[i] * (1.0f - rate);
  static_cast<float *>(params[3])[0] = 0.0f;
  return 0;
}

}  // extern "C"
