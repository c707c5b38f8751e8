// bfloat16 weights times float activations, for CPUs without bfloat16 arithmetic (AVX2 + FMA only).
//
// There, PyTorch multiplies bfloat16 matrices through an emulation several times slower than float32 GEMM. Here the
// weights stay bfloat16 in memory (half the bytes to read, which is what decode is bound by) and become float32 in
// registers at the cost of one instruction per 8 weights: a 32-bit word holding weights 2i and 2i+1 gives weight
// 2i+1 as a float by masking its low half, and weight 2i by shifting it left 16 bits. So 16 weights are read with one
// load and two integer ops, and the activations are stored once per call in the matching order (per 16 inputs:
// the 8 even ones, then the 8 odd ones). Products and sums are float32, the output is rounded once: the precision
// of a float32 matmul on the bfloat16 values, as PyTorch's own bfloat16 kernels accumulate.
//
// Register tile: up to 4 activation rows x 2 weight rows (8 accumulators; fewer rows get more accumulators per row
// to hide the FMA latency). Weight rows are split over OpenMP threads; with more than 4 activation rows the weight
// rows go 16 at a time through every row tile (by_row_tiles), so each is read from memory once.

#pragma once
#include "common.h"

namespace {

// x [M, K] (any float type) as float32 into xp [M, Kp] (Kp = K rounded up to 16, zero padded), each 16 inputs
// reordered to evens then odds
template <typename TX>
void prep_x(const TX* x, int64_t M, int64_t K, int64_t Kp, float* xp) {
  for (int64_t m = 0; m < M; ++m) {
    const TX* src = x + m * K;
    float* dst = xp + m * Kp;
    for (int64_t k = 0; k < Kp; k += 16)
      for (int i = 0; i < 16; ++i) {
        const int64_t j = k + i;
        dst[k + (i & 1) * 8 + (i >> 1)] = j < K ? to_f(src[j]) : 0.0f;
      }
  }
}

template <int MT, typename TO>
void bf16_rows(const float* xp, int64_t K, int64_t Kp, int64_t m0, const uint16_t* W, const float* bias, TO* Y,
               int64_t N, int64_t n0, int64_t n1) {
  constexpr int U = MT >= 3 ? 1 : (MT == 2 ? 2 : 4);  // accumulators per (row, weight row): FMA latency
  constexpr int NT = 2;
  const int64_t kfull = K / (16 * U) * (16 * U);
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = xp + (m0 + m) * Kp;
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  auto finish = [&](int64_t n, const uint16_t* w, __m256 a, int m) __attribute__((always_inline)) {
    float s = hsum(a);
    for (int64_t k = kfull; k < K; ++k) {  // tail in input order: xr is permuted within each 16
      const int64_t i = k & 15;
      s += to_f(BFloat16(w[k], BFloat16::from_bits())) * xr[m][(k & ~int64_t(15)) + (i & 1) * 8 + (i >> 1)];
    }
    if (bias) s += bias[n];
    store_out(Y + (m0 + m) * N + n, s);
  };
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) {
    const uint16_t* w0 = W + n * K;
    const uint16_t* w1 = w0 + K;
    __m256 acc[MT][NT][U];
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t)
        for (int u = 0; u < U; ++u) acc[m][t][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 16 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + k) + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + k) + kPrefetch, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k + 16 * u));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + k + 16 * u));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
        for (int m = 0; m < MT; ++m) {
          const __m256 xe = _mm256_loadu_ps(xr[m] + k + 16 * u), xo = _mm256_loadu_ps(xr[m] + k + 16 * u + 8);
          acc[m][0][u] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, acc[m][0][u]));
          acc[m][1][u] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, acc[m][1][u]));
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) {
        __m256 a = acc[m][t][0];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][t][u]);
        finish(n + t, t ? w1 : w0, a, m);
      }
  }
  for (; n < n1; ++n) {  // an odd last weight row
    const uint16_t* w0 = W + n * K;
    for (int m = 0; m < MT; ++m) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < kfull; k += 16) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k));
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(xr[m] + k), a);
        a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask)), _mm256_loadu_ps(xr[m] + k + 8), a);
      }
      finish(n, w0, a, m);
    }
  }
}

}  // namespace
