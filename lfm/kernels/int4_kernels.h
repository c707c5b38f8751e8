// int4-weight GEMV rows (int8 / int16 activations; AVX2, AVX-512 VNNI) and the int4 dispatch, AMX included
// (see gemv_kernels.h for the arithmetic).
#pragma once
#include "int4_prep.h"
#include "amx_kernels.h"

namespace {

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


// int8 activations on AMX from amx_min rows (where the CPU has it), else the row kernels
inline bool use_amx(const XQ4& X, int64_t M, int64_t amx_min) { return !X.a16 && M >= amx_min && amx_int8(); }

template <typename TS, typename TO>
void int4_amx_dispatch(const XQ4& X, int64_t M, int64_t gs, const uint8_t* W, const TS* S, const TS* Z, TO* Y,
                       int64_t N) {
  static thread_local XAmx tls;
  XAmx& A = tls;  // the calling thread's (inside the parallel region the name `tls` would be each thread's own)
  const int nt = pick_threads(N * X.K / 2, N / 2);
  prep_amx_alloc(X, M, A);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t u = 0; u < A.U; u += 8) prep_amx_units(X, M, u, std::min(A.U, u + 8), A);  // by units (see there)
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

}  // namespace
