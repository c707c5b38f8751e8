// int4 GEMV: the activations quantized once per call in the order the kernels read them (see gemv_kernels.h).
#pragma once
#include "common.h"

namespace {

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

}  // namespace
