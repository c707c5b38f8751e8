// Shared by the kernel files: includes, vector helpers, threading and row tiling.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
using at::Half;

// ---------------------------------------------------------------------------------------------------------------
// helpers

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <typename F>
void by_float_type(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    case at::kHalf: f(Half{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
  }
}

inline float to_f(float v) { return v; }
inline float to_f(BFloat16 v) { return static_cast<float>(v); }
inline float to_f(Half v) { return static_cast<float>(v); }

// 8 consecutive values of T as 8 floats
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// src[0..n) as float into dst[0..round_up(n, 64)), zero padded
template <typename T>
void to_float_row(const T* src, float* dst, int64_t n, int64_t padded) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = to_f(src[i]);
  for (; i < padded; ++i) dst[i] = 0.0f;
}

inline void store_out(float* p, float v) { *p = v; }
inline void store_out(BFloat16* p, float v) { *p = BFloat16(v); }  // round to nearest even
inline void store_out(Half* p, float v) { *p = Half(v); }

inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// per-thread activation buffers are kept between calls of at most this many rows (decode), freed after larger ones
constexpr int64_t kKeepRows = 64;

// software prefetch distance in the weight stream, bytes (measured: ~10% on one thread with cold weights)
constexpr int64_t kPrefetch = 1024;

// scale and its inverse for a block whose largest magnitude is amax, quantized to +-qmax (a zero block: 0, 0;
// NaN / inf propagate through the scale)
inline void block_scale(float amax, float qmax, float& scale, float& inv) {
  if (amax > 0.0f && std::isfinite(amax)) {
    scale = amax / qmax;
    inv = qmax / amax;
  } else {
    scale = amax == 0.0f ? 0.0f : NAN;
    inv = 0.0f;
  }
}

// how many threads for a problem of `bytes` weight bytes and n output rows
int pick_threads(int64_t bytes, int64_t n) {
  int nt = at::get_num_threads();
  if (nt < 1) nt = 1;
  if (bytes < (int64_t(1) << 18)) nt = 1;  // < 256 KiB: the fork/join costs more than it saves
  if (nt > n / 8) nt = static_cast<int>(std::max<int64_t>(1, n / 8));
  return nt;
}

// rows [n0, n1) of thread t out of T, in multiples of 8 rows
inline void split_rows(int64_t N, int t, int T, int64_t& n0, int64_t& n1) {
  const int64_t blocks = (N + 7) / 8;
  n0 = std::min(N, blocks * t / T * 8);
  n1 = std::min(N, blocks * (t + 1) / T * 8);
}

// f(m0, std::integral_constant<int, MT>, r0, r1): the output rows [n0, n1) times tiles of at most 4 activation rows
// m0 .. m0 + MT. With more than one tile, the output rows go 16 at a time through all the tiles, so that the weight
// rows are read from memory once (and from L1 for the other tiles).
template <typename F>
void by_row_tiles(int64_t M, int64_t n0, int64_t n1, F&& f) {
  const int64_t step = M <= 4 ? std::max<int64_t>(n1 - n0, 1) : 16;
  for (int64_t r0 = n0; r0 < n1; r0 += step) {
    const int64_t r1 = std::min(n1, r0 + step);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t r = M - m0;
      if (r >= 4) { f(m0, std::integral_constant<int, 4>{}, r0, r1); m0 += 4; }
      else if (r == 3) { f(m0, std::integral_constant<int, 3>{}, r0, r1); m0 += 3; }
      else if (r == 2) { f(m0, std::integral_constant<int, 2>{}, r0, r1); m0 += 2; }
      else { f(m0, std::integral_constant<int, 1>{}, r0, r1); m0 += 1; }
    }
  }
}

}  // namespace
