// The GEMV kernels (templates, no torch types): quantized activations, row kernels and their OpenMP dispatchers.
// Included by gemv.cpp (the torch-facing ops) and decode.cpp (the fused decode step).
//
// Weight-only quantized GEMV for decode (a few rows of activations times a big int8 / int4 weight), AVX2 + FMA.
//
// Three ways to multiply, chosen by the caller (act_bits) from the activations' dtype:
//
// - 32, float32 activations: the weights are converted to float and multiplied in float, 8 per FMA; the result is
//   x @ dequantized.T up to float rounding (what PyTorch's own kernels give).
// - 16, bfloat16 / float16 activations, int8 weights: activations quantized to int16 with one scale per 64 inputs
//   (~1e-5 relative error, far below bfloat16's own), integer products 16 at a time (_mm256_madd_epi16):
//     y[m,n] = c[n] * sum_b sx[m,b] * sum_{k in b} xq[m,k] q[n,k]
// - 8, bfloat16 / float16 activations, int4 weights: activations quantized to int8 with one scale per 64 inputs
//   (an error of the order of bfloat16's own rounding; what llama.cpp does for Q4 x Q8), nibbles times activations
//   32 at a time (_mm256_maddubs_epi16). With w = (q - 8) s + z per group (q in 0..15, two per byte: byte j of a
//   row holds q[2j] in its low nibble and q[2j+1] in its high one), per block b of 64 inputs (or of 32 in group 32):
//     y[m,n] = sum_b s[n,g(b)] sx[m,b] (sum_{k in b} xq[m,k] q[n,k] - 8 sum_{k in b} xq[m,k])
//              + sum_g z[n,g] xsum[m,g]                           (xsum: the exact float sum of x over the group)
//   (16 is available for int4 too: one scale per 32 inputs, nibbles widened to int16, _mm256_madd_epi16.)
//   The int4 weights are read in the portable layout as they are: instead of re-packing them, the quantized
//   activations are stored once per call in the order in which the nibbles come out of the registers (prep_x4).
//
// Activations are converted / quantized once per call (a few microseconds); weight rows are split over OpenMP
// threads (at::get_num_threads(); one for small problems). Rows of x are processed in tiles of up to 4 (more rows:
// each weight row is read from memory once, and from L1 for the other tiles; see by_row_tiles).

// Light headers (not <torch/extension.h>): the build takes a fraction of the time.
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

// ---------------------------------------------------------------------------------------------------------------
// int4 weights, group-wise asymmetric
//
// A row is processed in chunks of 64 inputs = 32 weight bytes = one 256-bit load; 128-bit lane l of a chunk holds
// inputs 32 l .. 32 l + 31 (bytes 16 l .. 16 l + 15). Both integer dot products below keep the lanes apart, so of
// their 8 int32 results lanes 0-3 belong to inputs 0-31 of the chunk and lanes 4-7 to inputs 32-63: for group 32 the
// two lanes are two groups.
//
// int8 activations: one scale per chunk (64 inputs). A "unit" is what one float scale multiplies: a group for group
// 32, a chunk otherwise; per output row, comb[u] = s[group of u] * sx[chunk of u] is computed 8 units at a time, so
// that a chunk costs one conversion and one FMA, and the -8 offset is one dot product per row:
//   y = sum_c comb . (int dot of chunk c) + sum_u comb[u] (-8 sum_{k in u} xq[k]) + sum_g z[g] xsum[g]
// int16 activations: one scale per 32 inputs (per lane), applied with the -8 offset in the chunk's float step.

struct XQ4 {                 // quantized activations of M rows, in the kernel's order (reused between calls)
  int64_t K, Kp, G, gs, nc, U;  // Kp: K rounded up to 64 (zero padded); nc = Kp / 64 chunks; U: units (int8)
  bool a16;                  // int16 activations (else int8)
  std::vector<int16_t> q16;  // [M, Kp]
  std::vector<int8_t> q8;    // [M, Kp]
  std::vector<float> s;      // int16: [M, nc * 8] per-lane scales; int8: [M, U + 8] each unit's activation scale
  std::vector<float> corr;   // int16: [M, nc * 8] per-lane -8 offsets (-2 s sum xq); int8: [M, U + 8] -8 sum xq
  std::vector<float> sum;    // [M, G]: exact float sum of x over each weight group
  std::vector<float> xf;     // one row as float
};

// Activation order per 64-input chunk.
// int8: [x0 x2 .. x30 | x32 x34 .. x62 | x1 x3 .. x31 | x33 .. x63]: bytes 0-31 meet the low nibbles (even inputs),
//   bytes 32-63 the high nibbles (odd inputs), lanes as above.
// int16: the nibbles are widened with unpacklo/unpackhi_epi8, which take bytes 0-7 / 8-15 of each lane; so the four
//   16 x int16 vectors are [even inputs of 0-15 | of 32-47], [of 16-31 | of 48-63], then the same for odd inputs.
//   Equivalently: inputs 16 h .. 16 h + 15 put their evens at 16 (h & 1) + 8 (h >> 1) and odds 32 further.
inline void prep_x4_alloc(int64_t M, int64_t K, int64_t gs, bool a16, XQ4& X) {
  X.K = K;
  X.Kp = round_up(K, 64);
  X.G = K / gs;
  X.gs = gs;
  X.nc = X.Kp / 64;
  X.U = gs == 32 ? X.nc * 2 : X.nc;
  X.a16 = a16;
  const int64_t srow = a16 ? X.nc * 8 : X.U + 8;
  (a16 ? X.q16.resize(M * X.Kp) : X.q8.resize(M * X.Kp));
  X.s.resize(M * srow);
  X.corr.resize(M * srow);
  X.sum.resize(M * X.G);
  X.xf.resize(X.Kp);
}

// rows [m0, m1) (any thread, disjoint rows; xf: Kp floats of the caller's)
template <typename TX>
void prep_x4_rows(const TX* x, int64_t m0, int64_t m1, XQ4& X, float* xf) {
  const int64_t K = X.K, gs = X.gs;
  const bool a16 = X.a16;
  const int64_t srow = a16 ? X.nc * 8 : X.U + 8;
  const int64_t kb = K / 32;  // real 32-blocks (K is a multiple of the group size, so of 32)
  // within a 128-bit lane: 8 even bytes then 8 odd bytes / 4 even words then 4 odd words
  const __m256i even_odd8 = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                             0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i even_odd16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                              0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; ++m) {
    to_float_row(x + m * K, xf, K, X.Kp);
    float* s = X.s.data() + m * srow;
    float* corr = X.corr.data() + m * srow;
    std::fill(s, s + srow, 0.0f);
    std::fill(corr, corr + srow, 0.0f);
    float* sum = X.sum.data() + m * X.G;
    std::fill(sum, sum + X.G, 0.0f);
    for (int64_t c = 0; c < X.nc; ++c) {
      const float* xc = xf + c * 64;
      __m256 v[8], vmax[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, vsum[2];
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_loadu_ps(xc + 8 * i);
        vmax[i >> 2] = _mm256_max_ps(vmax[i >> 2], abs8(v[i]));
      }
      for (int l = 0; l < 2; ++l)
        vsum[l] = _mm256_add_ps(_mm256_add_ps(v[4 * l], v[4 * l + 1]), _mm256_add_ps(v[4 * l + 2], v[4 * l + 3]));
      for (int l = 0; l < 2; ++l)
        if (2 * c + l < kb) sum[(2 * c + l) * 32 / gs] += hsum(vsum[l]);
      if (a16) {  // a scale per 32-input lane
        int16_t* dst = X.q16.data() + m * X.Kp + c * 64;
        for (int l = 0; l < 2; ++l) {
          float sc, inv;
          block_scale(hmax(vmax[l]), 32767.0f, sc, inv);
          const __m256 vinv = _mm256_set1_ps(inv);
          __m256i qv[4], isum = _mm256_setzero_si256();
          for (int i = 0; i < 4; ++i) {
            qv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * l + i], vinv));
            isum = _mm256_add_epi32(isum, qv[i]);
          }
          for (int h2 = 0; h2 < 2; ++h2) {  // inputs 16 h .. 16 h + 15 of the chunk, h = 2 l + h2
            const int h = 2 * l + h2;
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(qv[2 * h2], qv[2 * h2 + 1]), 0xD8);  // natural
            p = _mm256_shuffle_epi8(p, even_odd16);  // per lane: 4 evens, 4 odds
            __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
            const int64_t pos = 16 * (h & 1) + 8 * (h >> 1);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + pos), _mm_unpacklo_epi64(lo, hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 + pos), _mm_unpackhi_epi64(lo, hi));
          }
          const float cr = -2.0f * sc * float(hsum_i32(isum));  // 4 lanes: -8 sc sum xq
          for (int r = 0; r < 4; ++r) {
            s[c * 8 + 4 * l + r] = sc;
            corr[c * 8 + 4 * l + r] = cr;
          }
        }
      } else {  // one scale per chunk
        float sc, inv;
        block_scale(hmax(_mm256_max_ps(vmax[0], vmax[1])), 127.0f, sc, inv);
        const __m256 vinv = _mm256_set1_ps(inv);
        int8_t* dst = X.q8.data() + m * X.Kp + c * 64;
        for (int l = 0; l < 2; ++l) {
          __m256i qv[4], isum = _mm256_setzero_si256();
          for (int i = 0; i < 4; ++i) {
            qv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * l + i], vinv));
            isum = _mm256_add_epi32(isum, qv[i]);
          }
          __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qv[0], qv[1]), _mm256_packs_epi32(qv[2], qv[3]));
          p = _mm256_permutevar8x32_epi32(p, dword_order);  // natural order
          p = _mm256_shuffle_epi8(p, even_odd8);            // per lane: 8 evens, 8 odds
          __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * l), _mm_unpacklo_epi64(lo, hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 + 16 * l), _mm_unpackhi_epi64(lo, hi));
          const float cr = -8.0f * float(hsum_i32(isum));
          const int64_t u = gs == 32 ? 2 * c + l : c;
          s[u] = sc;
          corr[u] += cr;
        }
      }
    }
  }
}

template <typename TX>
void prep_x4(const TX* x, int64_t M, int64_t K, int64_t gs, bool a16, XQ4& X) {
  prep_x4_alloc(M, K, gs, a16, X);
  prep_x4_rows(x, 0, M, X, X.xf.data());
}

// unpack 32 bytes of nibbles into the four int16 vectors that match the int16 activation order
struct Nibbles16 {
  __m256i a, b, c, d;
  inline Nibbles16(__m256i lo, __m256i hi) {
    const __m256i zero = _mm256_setzero_si256();
    a = _mm256_unpacklo_epi8(lo, zero);
    b = _mm256_unpackhi_epi8(lo, zero);
    c = _mm256_unpacklo_epi8(hi, zero);
    d = _mm256_unpackhi_epi8(hi, zero);
  }
  inline __m256i dot(const int16_t* x) const {
    const __m256i* xp = reinterpret_cast<const __m256i*>(x);
    __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(xp)),
                                  _mm256_madd_epi16(b, _mm256_loadu_si256(xp + 1)));
    __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(c, _mm256_loadu_si256(xp + 2)),
                                  _mm256_madd_epi16(d, _mm256_loadu_si256(xp + 3)));
    return _mm256_add_epi32(s0, s1);
  }
};

inline float dot_f(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// sum_g z[g] * xsum[g], z in the checkpoint's dtype
template <typename TS>
inline float dot_z(const TS* z, const float* xsum, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(load8(z + g), _mm256_loadu_ps(xsum + g), acc);
  float r = hsum(acc);
  for (; g < G; ++g) r += to_f(z[g]) * xsum[g];
  return r;
}

// comb[u] = s[u / R] * sx[u] for the Ureal = G R real units (R units per group: 1, 2 or 4), 0 up to comb[U]
// (group 32 with an odd number of groups has a padding unit, and reads a pair past it)
template <int R, typename TS>
inline void combine_scales(const TS* s, const float* sx, int64_t U, int64_t Ureal, float* comb) {
  int64_t u = 0;
  if constexpr (R == 1) {
    for (; u + 8 <= Ureal; u += 8) _mm256_storeu_ps(comb + u, _mm256_mul_ps(load8(s + u), _mm256_loadu_ps(sx + u)));
  } else {
    const __m256i idx0 = R == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (; u + 8 * R <= Ureal; u += 8 * R) {  // 8 groups = 8 R units
      const __m256 s8 = load8(s + u / R);
      for (int j = 0; j < R; ++j) {
        const __m256i idx = _mm256_add_epi32(idx0, _mm256_set1_epi32(j * 8 / R));
        const __m256 sj = _mm256_permutevar8x32_ps(s8, idx);
        _mm256_storeu_ps(comb + u + 8 * j, _mm256_mul_ps(sj, _mm256_loadu_ps(sx + u + 8 * j)));
      }
    }
  }
  for (; u < Ureal; ++u) comb[u] = to_f(s[u / R]) * sx[u];
  for (; u <= U; ++u) comb[u] = 0.0f;
}

// The int8-activation rows of one tile: quantized values, scales, -8 corrections, group sums, combined scales.
template <int MT>
struct A8Rows {
  const int8_t* xq[MT];
  const float* xs[MT];
  const float* xc[MT];
  const float* xsum[MT];
  float* cb[MT];
  A8Rows(const XQ4& X, int64_t m0, float* comb) {
    const int64_t srow = X.U + 8, cstride = round_up(X.U + 1, 8);
    for (int m = 0; m < MT; ++m) {
      xq[m] = X.q8.data() + (m0 + m) * X.Kp;
      xs[m] = X.s.data() + (m0 + m) * srow;
      xc[m] = X.corr.data() + (m0 + m) * srow;
      xsum[m] = X.sum.data() + (m0 + m) * X.G;
      cb[m] = comb + m * cstride;
    }
  }
};

// one 64-input chunk c of one weight row (32 bytes v) into the tile's accumulators, AVX2: maddubs + madd
template <int MT, int CPG>
inline __attribute__((always_inline)) void a8_chunk(const A8Rows<MT>& r, int64_t c, __m256i v, __m256* acc) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, lo4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
  for (int m = 0; m < MT; ++m) {
    const __m256i* xp = reinterpret_cast<const __m256i*>(r.xq[m] + c * 64);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xp)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xp + 1)));
    __m256 vs;
    if constexpr (CPG == 0) {
      __m128 two = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.cb[m] + 2 * c)));
      vs = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    } else {
      vs = _mm256_broadcast_ss(r.cb[m] + c);
    }
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1))), vs, acc[m]);
  }
}

// after the chunks: a leftover even chunk, group 32's last half chunk (upper lane zero, as its activations), and
// the row's outputs (the scales' dot products for the -8 offsets and the zeros)
template <int MT, int CPG, typename TS, typename TO>
inline __attribute__((always_inline)) void a8_finish(const A8Rows<MT>& r, const XQ4& X, int64_t c, const uint8_t* w,
                                                     const TS* Z, TO* Y, int64_t N, int64_t m0, int64_t n,
                                                     __m256* acc0, __m256* acc1) {
  const int64_t chunks = X.K / 64;
  if (c < chunks) a8_chunk<MT, CPG>(r, c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)), acc0);
  if (X.K & 32)
    a8_chunk<MT, CPG>(r, chunks, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                     w + chunks * 32))), acc1);
  for (int m = 0; m < MT; ++m)
    store_out(Y + (m0 + m) * N + n, hsum(_mm256_add_ps(acc0[m], acc1[m])) + dot_f(r.cb[m], r.xc[m], X.U) +
                                        dot_z(Z + n * X.G, r.xsum[m], X.G));
}

// int8 activations. CPG: 64-input chunks per weight group (1, 2, 4), or 0 for group 32.
template <int MT, int CPG, typename TS, typename TO>
void int4a8_rows(const XQ4& X, int64_t m0, const uint8_t* W, const TS* S, const TS* Z, TO* Y, int64_t N,
                 int64_t n0, int64_t n1, float* comb) {
  constexpr int R = CPG == 0 ? 1 : CPG;  // units per group
  const int64_t K = X.K, G = X.G, chunks = K / 64;
  const A8Rows<MT> r(X, m0, comb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    for (int m = 0; m < MT; ++m) combine_scales<R>(S + n * G, r.xs[m], X.U, G * R, r.cb[m]);
    __m256 acc0[MT], acc1[MT];  // even / odd chunks: the FMA latency stays off the critical path
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * 32 + kPrefetch), _MM_HINT_T0);
      a8_chunk<MT, CPG>(r, c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)), acc0);
      a8_chunk<MT, CPG>(r, c + 1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32 + 32)), acc1);
    }
    a8_finish<MT, CPG>(r, X, c, w, Z, Y, N, m0, n, acc0, acc1);
  }
}

// int4a8_rows on AVX-512 VNNI (chosen at run time where the CPU has it): two 64-input chunks per zmm, each 4-byte
// group's u8 x s8 products summed by vpdpbusd instead of maddubs + madd (the same integers: no int16 saturation
// is possible at 15 x 127 x 2), lanes 0-7 = the even chunk and 8-15 = the odd one, i.e. exactly the AVX2 path's
// acc0 / acc1: the float sums, their order and so the output bits are the same.
template <int MT, int CPG, typename TS, typename TO>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4a8_rows_vnni(
    const XQ4& X, int64_t m0, const uint8_t* W, const TS* S, const TS* Z, TO* Y, int64_t N, int64_t n0, int64_t n1,
    float* comb) {
  constexpr int R = CPG == 0 ? 1 : CPG;
  const int64_t K = X.K, G = X.G, chunks = K / 64;
  const A8Rows<MT> r(X, m0, comb);
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    for (int m = 0; m < MT; ++m) combine_scales<R>(S + n * G, r.xs[m], X.U, G * R, r.cb[m]);
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * 32 + kPrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + c * 32);
      const __m512i lo = _mm512_and_si512(v, lo4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
      for (int m = 0; m < MT; ++m) {
        const int8_t* xp = r.xq[m] + c * 64;  // chunk c: xp[0..63], chunk c + 1: xp[64..127]
        const __m512i xl = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xp))), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64)), 1);
        const __m512i xh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xp + 32))), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 96)), 1);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
        const __m512 vs = CPG == 0
            ? _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(_mm_loadu_ps(r.cb[m] + 2 * c)))
            : _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castsi128_ps(
                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.cb[m] + c)))));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), vs, acc[m]);
      }
    }
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) {
      acc0[m] = _mm512_castps512_ps256(acc[m]);
      acc1[m] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m]), 1));
    }
    a8_finish<MT, CPG>(r, X, c, w, Z, Y, N, m0, n, acc0, acc1);
  }
}

// one row's group scales as float (sf has room for G + 1 values: group 32 reads a pair past an odd G)
template <typename TS>
inline void row_scales(const TS* s, int64_t G, float* sf) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) _mm256_storeu_ps(sf + g, load8(s + g));
  for (; g < G; ++g) sf[g] = to_f(s[g]);
  sf[G] = 0.0f;
}

// int16 activations. CPG as above.
template <int MT, int CPG, typename TS, typename TO>
void int4a16_rows(const XQ4& X, int64_t m0, const uint8_t* W, const TS* S, const TS* Z, TO* Y, int64_t N,
                  int64_t n0, int64_t n1, float* sf) {
  const int64_t K = X.K, Kp = X.Kp, G = X.G, srow = X.nc * 8;
  const int64_t chunks = K / 64;
  const int16_t* xq[MT];
  const float* xs[MT];
  const float* xc[MT];
  const float* xsum[MT];
  for (int m = 0; m < MT; ++m) {
    xq[m] = X.q16.data() + (m0 + m) * Kp;
    xs[m] = X.s.data() + (m0 + m) * srow;
    xc[m] = X.corr.data() + (m0 + m) * srow;
    xsum[m] = X.sum.data() + (m0 + m) * G;
  }
  const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * (K / 2);
    row_scales(S + n * G, G, sf);
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    auto step = [&](int64_t c, __m256i v, __m256* acc) __attribute__((always_inline)) {
      const __m256i lo = _mm256_and_si256(v, lo4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
      __m256 vs;
      if constexpr (CPG == 0) {
        __m128 two = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sf + 2 * c)));
        vs = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), lanes);
      } else {
        vs = _mm256_broadcast_ss(sf + c / CPG);
      }
      Nibbles16 nb16(lo, hi);
      for (int m = 0; m < MT; ++m) {
        __m256 d = _mm256_cvtepi32_ps(nb16.dot(xq[m] + c * 64));
        __m256 t = _mm256_fmadd_ps(d, _mm256_loadu_ps(xs[m] + c * 8), _mm256_loadu_ps(xc[m] + c * 8));
        acc[m] = _mm256_fmadd_ps(t, vs, acc[m]);
      }
    };
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * 32 + kPrefetch), _MM_HINT_T0);
      step(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)), acc0);
      step(c + 1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32 + 32)), acc1);
    }
    if (c < chunks) step(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)), acc0);
    if (K & 32)
      step(chunks, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + chunks * 32))), acc1);
    for (int m = 0; m < MT; ++m)
      store_out(Y + (m0 + m) * N + n, hsum(_mm256_add_ps(acc0[m], acc1[m])) + dot_z(Z + n * G, xsum[m], G));
  }
}

// AVX-512 VNNI present (checked once; LFM_KERNELS_NO_VNNI=1 forces the AVX2 path, to compare)
inline bool vnni512() {
  static const bool ok = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("LFM_KERNELS_NO_VNNI") == nullptr;
  return ok;
}

#include "amx_kernels.h"

// int8 activations on AMX from amx_min rows (where the CPU has it), else the row kernels
inline bool use_amx(const XQ4& X, int64_t M, int64_t amx_min) { return !X.a16 && M >= amx_min && amx_int8(); }

template <typename TS, typename TO>
void int4_amx_dispatch(const XQ4& X, int64_t M, int64_t gs, const uint8_t* W, const TS* S, const TS* Z, TO* Y,
                       int64_t N) {
  static thread_local XAmx tls;
  XAmx& A = tls;  // the calling thread's (inside the parallel region the name `tls` would be each thread's own)
  prep_amx(X, M, A);
  const int nt = pick_threads(N * X.K / 2, N / 2);
  const int64_t bytes = amx_scratch_bytes(X.K);
  std::vector<uint8_t> scratch(static_cast<size_t>(bytes * nt + 64));
  uint8_t* base = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t blocks = (N + 15) / 16;
    const int64_t n0 = std::min(N, blocks * t / T * 16), n1 = std::min(N, blocks * (t + 1) / T * 16);
    if (n0 < n1) int4a8_amx(A, M, X.K, gs, W, S, Z, Y, N, n0, n1, base + bytes * t);
  }
  if (M > kKeepRows) A = XAmx{};
}

template <typename TS, typename TO>
void int4_dispatch(const XQ4& X, int64_t M, int64_t gs, const uint8_t* W, const TS* S, const TS* Z, TO* Y,
                   int64_t N, int64_t amx_min) {
  if (use_amx(X, M, amx_min)) return int4_amx_dispatch(X, M, gs, W, S, Z, Y, N);
  const int nt = pick_threads(N * X.K / 2, N);
  const int64_t stride = 4 * round_up(std::max(X.G, X.U) + 1, 8);  // per thread: up to 4 rows' comb, or sf
  std::vector<float> scratch(static_cast<size_t>(stride * nt));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    float* buf = scratch.data() + stride * t;
    int64_t n0, n1;
    split_rows(N, t, omp_get_num_threads(), n0, n1);
    by_row_tiles(M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      constexpr int MT = decltype(mt)::value;
      if (X.a16) {
        if (gs == 32) int4a16_rows<MT, 0>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 64) int4a16_rows<MT, 1>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 128) int4a16_rows<MT, 2>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else int4a16_rows<MT, 4>(X, m0, W, S, Z, Y, N, r0, r1, buf);
      } else if (vnni512()) {
        if (gs == 32) int4a8_rows_vnni<MT, 0>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 64) int4a8_rows_vnni<MT, 1>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 128) int4a8_rows_vnni<MT, 2>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else int4a8_rows_vnni<MT, 4>(X, m0, W, S, Z, Y, N, r0, r1, buf);
      } else {
        if (gs == 32) int4a8_rows<MT, 0>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 64) int4a8_rows<MT, 1>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else if (gs == 128) int4a8_rows<MT, 2>(X, m0, W, S, Z, Y, N, r0, r1, buf);
        else int4a8_rows<MT, 4>(X, m0, W, S, Z, Y, N, r0, r1, buf);
      }
    });
  }
}

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
