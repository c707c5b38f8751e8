// Decode attention over an int8 paged KV cache with integer key dot products (AVX-512 VNNI), head_dim 64, 16-bit
// queries: the long-context decode path of the edge engine.
//
// Why: at 32K keys the float path of `attend` spends ~3.5x the time of just reading the cache (widening each int8
// key to float32 once per query head, 8 lanes at a time), so a 32K-token decode ran 2.7x slower than at 512 tokens.
// Here each head's queries (q * softmax scale) become int16 with one float32 scale per head (amax / 32767: a
// relative step of 3e-5, finer than the bfloat16 query it comes from), each key is widened once to int16 for all
// G query heads of its group, and VPDPWSSD gives q . k exactly in int32 (|q| <= 32767, |k| <= 127: 64 products fit);
// score = int32 sum * q scale * key scale. 8 keys' partial sums are reduced together by a transposing add tree, and
// each head's max is kept as the scores are made, so the softmax is one pass (e = exp(score - max) with a 16-lane
// exp, summed, stored times the value's scale) and 1 / sum is applied to the 64 outputs at the end. Values stay
// float32 (each value widened once for all G heads, FMAs in key order): the output does not depend on threads or
// batch.
//
// Used by `attend` (both the general paged kernel and the fused decode step) for int8 caches with D = 64, G <= 4 and
// bfloat16 / float16 queries on CPUs with AVX-512 BW + VNNI; float32 queries keep the float path (the reference
// precision), as does `LFM_KERNELS_NO_VNNI=1`.

#pragma once
#include "common.h"

namespace {

inline bool attend_i8_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                         std::getenv("LFM_KERNELS_NO_VNNI") == nullptr;
  return ok;
}

// paged blocks are prefetched this many blocks ahead (a block's keys take too little time to hide DRAM latency)
constexpr int64_t kI8Ahead = 2;

// the first `bytes` of block j of one side (keys or values) of the walk, towards the cache (nothing past the last)
inline void prefetch_block(const int8_t* side, const PagedKV<int8_t>& kv, int64_t j, int64_t bytes, int hint) {
  if (j >= kv.nblocks) return;
  const char* p = reinterpret_cast<const char*>(side + static_cast<int64_t>(kv.table[j]) * kv.stride);
  for (int64_t b = 0; b < bytes; b += 64)
    hint == _MM_HINT_T0 ? _mm_prefetch(p + b, _MM_HINT_T0) : _mm_prefetch(p + b, _MM_HINT_T1);
}

#define LFM_I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

// 8 vectors of 16 int32 -> 8 sums (lane j = the sum of a[j]'s 16 lanes)
LFM_I8_TARGET __attribute__((always_inline)) inline __m256i reduce8x16(const __m512i* a) {
  __m512i b[4];
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: [a0.0+a0.2, a1.0+a1.2, a0.1+a0.3, a1.1+a1.3]
    b[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * j], a[2 * j + 1]),
                            _mm512_unpackhi_epi32(a[2 * j], a[2 * j + 1]));
  // per 128-bit lane: the 4 keys' sums over that lane (c0: keys 0-3, c1: keys 4-7)
  const __m512i c0 = _mm512_add_epi32(_mm512_unpacklo_epi64(b[0], b[1]), _mm512_unpackhi_epi64(b[0], b[1]));
  const __m512i c1 = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2], b[3]), _mm512_unpackhi_epi64(b[2], b[3]));
  // [c0.L0+c0.L2, c0.L1+c0.L3, c1.L0+c1.L2, c1.L1+c1.L3], then lanes 0 + 1 and 2 + 3
  const __m512i e = _mm512_add_epi32(_mm512_shuffle_i32x4(c0, c1, 0x44), _mm512_shuffle_i32x4(c0, c1, 0xEE));
  const __m512i f = _mm512_add_epi32(e, _mm512_shuffle_i32x4(e, e, 0xB1));
  return _mm256_set_m128i(_mm512_extracti32x4_epi32(f, 2), _mm512_castsi512_si128(f));
}

// one key (64 int8) widened to int16, low and high halves
LFM_I8_TARGET __attribute__((always_inline)) inline void widen_key(const int8_t* k, __m512i& lo, __m512i& hi) {
  lo = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
  hi = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 32)));
}

// e^x for x <= 0, 16 lanes: exp8's constants and steps (attention_kernels.h), 2^n applied by VSCALEFPS
LFM_I8_TARGET __attribute__((always_inline)) inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// G query heads q [G, 64] against keys / values 0 .. L - 1 of one KV head in an int8 paged cache (scales ksc / vsc
// [L]); out [G, 64]. buf: scratch, grown as needed.
template <int G, typename TQ>
LFM_I8_TARGET void attend_i8_d64(const TQ* q, const PagedKV<int8_t>& kv, const float* ksc, const float* vsc,
                                 int64_t L, float scale, TQ* out, std::vector<float>& buf) {
  constexpr int64_t D = 64;
  buf.resize(static_cast<size_t>(G * (L + D)));
  float* s = buf.data();  // [G, L] scores, then probabilities
  float* qf = s + G * L;  // [G, D] output
  alignas(64) int16_t q16[G][D];
  float qs[G];
  for (int g = 0; g < G; ++g) {
    float t[D], amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      t[d] = to_f(q[g * D + d]) * scale;
      amax = std::max(amax, std::fabs(t[d]));
    }
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    qs[g] = amax / 32767.0f;
    for (int64_t d = 0; d < D; ++d)
      q16[g][d] = static_cast<int16_t>(std::max(-32767.0f, std::min(32767.0f, std::nearbyint(t[d] * inv))));
  }
  const int64_t bs = kv.bs;
  const int64_t pf = std::min<int64_t>(bs * D, kBlockPrefetch);
  __m256 mx8[G];  // each head's running max score (the softmax's shift, found while the scores are made)
  float mx[G];
  for (int g = 0; g < G; ++g) {
    mx8[g] = _mm256_set1_ps(-INFINITY);
    mx[g] = -INFINITY;
  }
  for (int64_t j = 1; j < kI8Ahead; ++j) {  // the first blocks, before the walk's own prefetches
    prefetch_block(kv.k, kv, j, pf, _MM_HINT_T0);
    prefetch_block(kv.v, kv, j, pf, _MM_HINT_T1);
  }
  for (int64_t j = 0, l0 = 0; l0 < L; ++j, l0 += bs) {  // scores, block by block
    const int64_t m = std::min(bs, L - l0);
    prefetch_block(kv.k, kv, j + kI8Ahead, pf, _MM_HINT_T0);
    const int8_t* kc = kv.k + static_cast<int64_t>(kv.table[j]) * kv.stride;
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      __m512i lo[8], hi[8];
      for (int r = 0; r < 8; ++r) widen_key(kc + (i + r) * D, lo[r], hi[r]);
      const __m256 ks = _mm256_loadu_ps(ksc + l0 + i);
      for (int g = 0; g < G; ++g) {
        const __m512i ql = _mm512_load_si512(q16[g]), qh = _mm512_load_si512(q16[g] + 32);
        __m512i acc[8];
        for (int r = 0; r < 8; ++r)
          acc[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo[r], ql), hi[r], qh);
        const __m256 sc = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(reduce8x16(acc)), _mm256_set1_ps(qs[g])), ks);
        mx8[g] = _mm256_max_ps(mx8[g], sc);
        _mm256_storeu_ps(s + g * L + l0 + i, sc);
      }
    }
    for (; i < m; ++i) {
      __m512i lo, hi;
      widen_key(kc + i * D, lo, hi);
      for (int g = 0; g < G; ++g) {
        const __m512i ql = _mm512_load_si512(q16[g]), qh = _mm512_load_si512(q16[g] + 32);
        const int32_t dot = _mm512_reduce_add_epi32(
            _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, ql), hi, qh));
        s[g * L + l0 + i] = static_cast<float>(dot) * qs[g] * ksc[l0 + i];
        mx[g] = std::max(mx[g], s[g * L + l0 + i]);
      }
    }
  }
  float inv[G];  // one pass per head: e = exp(score - max) summed, e * value scale stored; 1 / sum at the end
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * L;
    const float m = std::max(mx[g], hmax(mx8[g]));
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum16 = _mm512_setzero_ps();
    int64_t l = 0;
    for (; l + 16 <= L; l += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + l), mv));
      sum16 = _mm512_add_ps(sum16, e);
      _mm512_storeu_ps(sg + l, _mm512_mul_ps(e, _mm512_loadu_ps(vsc + l)));
    }
    float sum = _mm512_reduce_add_ps(sum16);
    for (; l < L; ++l) {
      const float e = std::exp(sg[l] - m);
      sum += e;
      sg[l] = e * vsc[l];
    }
    inv[g] = 1.0f / sum;
  }
  __m512 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0, l0 = 0; l0 < L; ++j, l0 += bs) {  // values, block by block, each widened once
    const int64_t m = std::min(bs, L - l0);
    prefetch_block(kv.v, kv, j + kI8Ahead, pf, _MM_HINT_T0);
    const int8_t* vc = kv.v + static_cast<int64_t>(kv.table[j]) * kv.stride;
    for (int64_t i = 0; i < m; ++i) {
      __m512 v[4];
      for (int c = 0; c < 4; ++c)
        v[c] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vc + i * D + 16 * c))));
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(s[g * L + l0 + i]);
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(qf + g * D + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
  for (int64_t i = 0; i < G * D; ++i) store_out(out + i, qf[i]);
}

// attend_i8_d64 for G = 1 .. 4 (false: not applicable, the caller takes the float path)
template <typename TQ>
bool attend_i8(const TQ* q, const PagedKV<int8_t>& kv, const float* ksc, const float* vsc, int64_t L, int64_t G,
               int64_t D, float scale, TQ* out, std::vector<float>& buf) {
  if (D != 64 || G < 1 || G > 4 || !attend_i8_ok()) return false;
  switch (G) {
    case 1: attend_i8_d64<1>(q, kv, ksc, vsc, L, scale, out, buf); break;
    case 2: attend_i8_d64<2>(q, kv, ksc, vsc, L, scale, out, buf); break;
    case 3: attend_i8_d64<3>(q, kv, ksc, vsc, L, scale, out, buf); break;
    default: attend_i8_d64<4>(q, kv, ksc, vsc, L, scale, out, buf); break;
  }
  return true;
}

#undef LFM_I8_TARGET

}  // namespace
