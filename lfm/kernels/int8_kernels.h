// int8-weight GEMV rows with int16 activations (see gemv_kernels.h for the arithmetic of every kernel).
#pragma once
#include "common.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// int8 weights, per-output-channel scale

constexpr int64_t XB8 = 64;  // activation block: one int16 scale per 64 inputs

struct XQ8 {          // quantized activations of M rows (reused between calls: no allocation in steady state)
  int64_t K, Kp, nb;  // Kp: K rounded up to 64 (zero padded); nb = Kp / 64
  std::vector<int16_t> q;  // [M, Kp]
  std::vector<float> s;    // [M, nb]
  std::vector<float> xf;   // one row as float
};

// allocation (once per call) and rows [m0, m1) (any thread, disjoint rows), so the fused step can split rows
inline void prep_x8_alloc(int64_t M, int64_t K, XQ8& X) {
  X.K = K;
  X.Kp = round_up(K, XB8);
  X.nb = X.Kp / XB8;
  X.q.resize(M * X.Kp);
  X.s.resize(M * X.nb);
  X.xf.resize(X.Kp);
}

template <typename TX>
void prep_x8_rows(const TX* x, int64_t m0, int64_t m1, XQ8& X, float* xf) {
  const int64_t K = X.K;
  for (int64_t m = m0; m < m1; ++m) {
    to_float_row(x + m * K, xf, K, X.Kp);
    int16_t* q = X.q.data() + m * X.Kp;
    for (int64_t b = 0; b < X.nb; ++b) {
      const float* xb = xf + b * XB8;
      __m256 v[8], vmax = _mm256_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        vmax = _mm256_max_ps(vmax, abs8(v[i]));
      }
      float sc, inv;
      block_scale(hmax(vmax), 32767.0f, sc, inv);
      X.s[m * X.nb + b] = sc;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int i = 0; i < 8; i += 2) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], vinv));
        // packs works within 128-bit lanes: [a0-3 c0-3 | a4-7 c4-7] -> reorder the 64-bit quarters
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * XB8 + 8 * i), p);
      }
    }
  }
}

template <typename TX>
void prep_x8(const TX* x, int64_t M, int64_t K, XQ8& X) {
  prep_x8_alloc(M, K, X);
  prep_x8_rows(x, 0, M, X, X.xf.data());
}

template <int MT, typename TS, typename TO>
void int8_rows(const XQ8& X, int64_t m0, const int8_t* W, const TS* scale, TO* Y, int64_t N, int64_t n0,
               int64_t n1) {
  const int64_t K = X.K, Kp = X.Kp, nb = X.nb;
  const int64_t nfull = K / XB8;  // blocks fully inside K
  const int16_t* xq[MT];
  const float* xs[MT];
  for (int m = 0; m < MT; ++m) {
    xq[m] = X.q.data() + (m0 + m) * Kp;
    xs[m] = X.s.data() + (m0 + m) * nb;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m256 facc[MT];
    for (int m = 0; m < MT; ++m) facc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nfull; ++b) {
      const int8_t* wb = w + b * XB8;
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T0);
      __m256i iacc[MT];
      for (int m = 0; m < MT; ++m) iacc[m] = _mm256_setzero_si256();
      for (int c = 0; c < 4; c += 2) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * c)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * c + 16)));
        for (int m = 0; m < MT; ++m) {
          const __m256i* xp = reinterpret_cast<const __m256i*>(xq[m] + b * XB8 + 16 * c);
          __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xp)),
                                       _mm256_madd_epi16(w1, _mm256_loadu_si256(xp + 1)));
          iacc[m] = _mm256_add_epi32(iacc[m], d);
        }
      }
      for (int m = 0; m < MT; ++m)
        facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_broadcast_ss(xs[m] + b), facc[m]);
    }
    float tail[MT] = {};
    if (nfull * XB8 < K) {  // last partial block: 16-wide chunks, then scalar (never reading past the row)
      int64_t k = nfull * XB8;
      __m256i iacc[MT];
      int32_t isum[MT] = {};
      for (int m = 0; m < MT; ++m) iacc[m] = _mm256_setzero_si256();
      for (; k + 16 <= K; k += 16) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
        for (int m = 0; m < MT; ++m)
          iacc[m] = _mm256_add_epi32(
              iacc[m], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + k))));
      }
      for (; k < K; ++k)
        for (int m = 0; m < MT; ++m) isum[m] += int32_t(w[k]) * int32_t(xq[m][k]);
      for (int m = 0; m < MT; ++m) {
        facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_broadcast_ss(xs[m] + nfull), facc[m]);
        tail[m] = float(isum[m]) * xs[m][nfull];
      }
    }
    const float sc = to_f(scale[n]);
    for (int m = 0; m < MT; ++m) store_out(Y + (m0 + m) * N + n, (hsum(facc[m]) + tail[m]) * sc);
  }
}

template <typename TS, typename TO>
void int8_dispatch(const XQ8& X, int64_t M, const int8_t* W, const TS* scale, TO* Y, int64_t N) {
  const int nt = pick_threads(N * X.K, N);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t n0, n1;
    split_rows(N, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    by_row_tiles(M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      int8_rows<decltype(mt)::value>(X, m0, W, scale, Y, N, r0, r1);
    });
  }
}

}  // namespace
