// int8 / int4 GEMV rows for float32 activations: weights converted to float (see gemv_kernels.h).
#pragma once
#include "common.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// float32 activations: the weights are converted to float and multiplied in float (the torch ops' precision: the
// result differs from x @ dequantized.T by float rounding only), 8 weights per FMA.

template <int MT, typename TS, typename TO>
void int8f_rows(const float* x, int64_t K, int64_t m0, const int8_t* W, const TS* scale, TO* Y, int64_t N,
                int64_t n0, int64_t n1) {
  constexpr int U = MT <= 2 ? 4 : 2;  // independent accumulators per row (FMA latency)
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = x + (m0 + m) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    __m256 acc[MT][U];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        __m256 wf = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8 * u))));
        for (int m = 0; m < MT; ++m) acc[m][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xr[m] + k + 8 * u), acc[m][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xr[m] + k), acc[m][0]);
    }
    float tail[MT] = {};
    for (; k < K; ++k)
      for (int m = 0; m < MT; ++m) tail[m] += float(w[k]) * xr[m][k];
    const float sc = to_f(scale[n]);
    for (int m = 0; m < MT; ++m) {
      __m256 a = acc[m][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
      store_out(Y + (m0 + m) * N + n, (hsum(a) + tail[m]) * sc);
    }
  }
}

template <typename TS, typename TO>
void int8f_dispatch(const float* x, int64_t M, int64_t K, const int8_t* W, const TS* scale, TO* Y, int64_t N) {
  const int nt = pick_threads(N * K, N);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t n0, n1;
    split_rows(N, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    by_row_tiles(M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      int8f_rows<decltype(mt)::value>(x, K, m0, W, scale, Y, N, r0, r1);
    });
  }
}

// int4: 4 weight bytes = 8 nibbles in input order; broadcast the 32-bit word and shift lane i right by 4 i.
// Per group: dot = sum x q in float, then y = sum_g s dot + sum_g (z - 8 s) xsum.
template <int MT, typename TS, typename TO>
void int4f_rows(const float* x, const float* xsum_all, int64_t K, int64_t gs, int64_t m0, const uint8_t* W,
                const TS* S, const TS* Z, TO* Y, int64_t N, int64_t n0, int64_t n1, float* sf) {
  const int64_t G = K / gs;
  const float* xr[MT];
  const float* xsum[MT];
  for (int m = 0; m < MT; ++m) {
    xr[m] = x + (m0 + m) * K;
    xsum[m] = xsum_all + (m0 + m) * G;
  }
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  auto nib8 = [&](const uint8_t* p) __attribute__((always_inline)) {
    int32_t word;
    std::memcpy(&word, p, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask));
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    row_scales(S + n * G, G, sf);
    __m256 facc[MT];
    for (int m = 0; m < MT; ++m) facc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + g * gs / 2;
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetch), _MM_HINT_T0);
      __m256 d0[MT], d1[MT];
      for (int m = 0; m < MT; ++m) d0[m] = d1[m] = _mm256_setzero_ps();
      for (int64_t v = 0; v < gs / 8; v += 2) {
        const __m256 q0 = nib8(wg + 4 * v), q1 = nib8(wg + 4 * v + 4);
        for (int m = 0; m < MT; ++m) {
          const float* xg = xr[m] + g * gs + 8 * v;
          d0[m] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xg), d0[m]);
          d1[m] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xg + 8), d1[m]);
        }
      }
      const __m256 vs = _mm256_broadcast_ss(sf + g);
      for (int m = 0; m < MT; ++m) facc[m] = _mm256_fmadd_ps(_mm256_add_ps(d0[m], d1[m]), vs, facc[m]);
    }
    for (int m = 0; m < MT; ++m)  // + sum_g (z - 8 s) xsum
      store_out(Y + (m0 + m) * N + n,
                hsum(facc[m]) + dot_z(Z + n * G, xsum[m], G) - 8.0f * dot_f(sf, xsum[m], G));
  }
}

template <typename TS, typename TO>
void int4f_dispatch(const float* x, const float* xsum, int64_t M, int64_t K, int64_t gs, const uint8_t* W,
                    const TS* S, const TS* Z, TO* Y, int64_t N) {
  const int nt = pick_threads(N * K / 2, N);
  const int64_t G = K / gs, stride = round_up(G + 1, 8);
  std::vector<float> scratch(static_cast<size_t>(stride * nt));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    float* sf = scratch.data() + stride * t;
    int64_t n0, n1;
    split_rows(N, t, omp_get_num_threads(), n0, n1);
    by_row_tiles(M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      int4f_rows<decltype(mt)::value>(x, xsum, K, gs, m0, W, S, Z, Y, N, r0, r1, sf);
    });
  }
}

}  // namespace
