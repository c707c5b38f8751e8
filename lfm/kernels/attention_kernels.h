// Paged decode attention: one new query per sequence against that sequence's keys in a paged KV cache (vLLM style),
// for many sequences in one call.
//
// What continuous batching needs (every sequence has its own keys and length) and what PyTorch's CPU SDPA does
// slowly for a single query: on bfloat16 caches it converts and blocks as for a long query (4x slower than float
// math at 1K keys). The cache is one pool of blocks [num_blocks, KV, block_size, D] shared by all sequences,
// sequence b's key l in physical block block_tables[b, l / block_size] at offset l % block_size. The caller has
// already written the new keys / values; this op only reads. Each (sequence, KV head) pair is one task: the
// G = H / KV query heads of the group read the keys once (scores in float32), softmax, and read the values once.
// Cache elements are widened to float32 in registers, so a bfloat16 cache costs its own bytes and no copy. Output in
// q's dtype, rounded once.
//
// An int8 cache (LLM(kv_cache_dtype="int8")) holds each key / value vector of a head as int8 times one float32
// scale (amax / 127, rounded by lfm.engine.cache.quantize_kv when the keys are written): scores are
// (q . k_int8) * k_scale, and each probability is multiplied by the value's scale. Half the bytes of bfloat16.
//
// `attend` holds the math: it walks a head's keys as runs of consecutive keys (one block at a time), 8 keys per
// reduction inside a run.

#pragma once
#include "common.h"

namespace {

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const BFloat16* p) { return load8(p); }
inline __m256 load8f(const Half* p) { return load8(p); }
inline __m256 load8f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float elem(int8_t v) { return float(v); }
template <typename T>
inline float elem(T v) { return to_f(v); }

// lane j = the sum of a[j]'s 8 lanes
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0 (softmax after subtracting the max), ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts), a
// degree-6 polynomial for e^r (1 + r + r^2 (c0 r^4 + ... + c5)), times 2^n; inputs below -87 give ~0 (2^n stays a
// normal float). exp8 (AVX2) and attention_i8.h's exp16 (AVX-512) share these constants and the order of operations.
constexpr float kExpMin = -87.0f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// bytes of the next block prefetched while a paged block is read: the hardware prefetcher starts over at every block
// (measured, one thread, block_size 16: bfloat16 ~15% faster, int8 ~30%; 512 or 4096 bytes did worse)
constexpr int64_t kBlockPrefetch = 1024;

// The keys / values of one KV head, as runs of consecutive keys: runs<Side>(l0, l1, f) calls f(l, m, k, v) for keys
// l .. l + m - 1 of [l0, l1), key l + i at k + i * D, its value at v + i * D. Side: what f reads, 0 keys, 1 values.
// Paged cache: key l in physical block table[l / bs] at offset l % bs, for the sequence's nblocks blocks; k / v point
// at the head's slice of block 0, block p's slice is `stride` (KV * bs * D) elements further; one run per block.
template <typename TC>
struct PagedKV {
  const TC* k;
  const TC* v;
  const int32_t* table;
  int64_t bs, stride, D, nblocks;
  template <int Side, typename F>
  void runs(int64_t l0, int64_t l1, F&& f) const {
    if (l0 >= l1) return;
    const TC* side = Side ? v : k;
    const int64_t pf = std::min<int64_t>(bs * D * static_cast<int64_t>(sizeof(TC)), kBlockPrefetch);
    for (int64_t j = l0 / bs, o = l0 - j * bs; l0 < l1; ++j, o = 0) {
      const int64_t m = std::min(bs - o, l1 - l0);
      if (j + 1 < nblocks) {
        const char* next = reinterpret_cast<const char*>(side + static_cast<int64_t>(table[j + 1]) * stride);
        for (int64_t b = 0; b < pf; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      }
      const int64_t off = static_cast<int64_t>(table[j]) * stride + o * D;
      f(l0, m, k + off, v + off);
      l0 += m;
    }
  }
};

// Scores s [G, L] -> probabilities in place, per head (vector exp: a scalar expf per key cost more than the reads);
// int8 values (vsc != nullptr): each value's scale folded into its probability
inline void softmax_fold(float* s, int64_t L, int64_t G, const float* vsc) {
  for (int64_t g = 0; g < G; ++g) {  // softmax per head (vector exp: a scalar expf per key cost more than the reads)
    float* sg = s + g * L;
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sg + l));
    float mx = hmax(m8);
    for (; l < L; ++l) mx = std::max(mx, sg[l]);
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 s8 = _mm256_setzero_ps();
    for (l = 0; l + 8 <= L; l += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + l), mv));
      _mm256_storeu_ps(sg + l, e);
      s8 = _mm256_add_ps(s8, e);
    }
    float sum = hsum(s8);
    for (; l < L; ++l) {
      sg[l] = std::exp(sg[l] - mx);
      sum += sg[l];
    }
    const float inv = 1.0f / sum;
    const __m256 iv = _mm256_set1_ps(vsc ? 1.0f : inv);
    for (l = 0; l + 8 <= L; l += 8) {  // int8 values: fold each value's scale into its probability
      __m256 p = _mm256_mul_ps(_mm256_loadu_ps(sg + l), iv);
      if (vsc) p = _mm256_mul_ps(p, _mm256_mul_ps(_mm256_set1_ps(inv), _mm256_loadu_ps(vsc + l)));
      _mm256_storeu_ps(sg + l, p);
    }
    for (; l < L; ++l) sg[l] = vsc ? sg[l] * inv * vsc[l] : sg[l] * inv;
  }
}

}  // namespace

#include "attention_i8.h"  // the int8-cache integer path (needs PagedKV and softmax_fold above)

namespace {

// G query heads q [G, D] against keys / values 0 .. L - 1 of one KV head; out [G, D] in q's dtype. int8 caches:
// ksc / vsc [L] the keys' / values' scales (float caches: nullptr).
template <typename TQ, typename TC, typename KVs>
void attend(const TQ* q, const KVs& kv, const float* ksc, const float* vsc, int64_t L, int64_t G, int64_t D,
            float scale, TQ* out, std::vector<float>& buf) {
  if constexpr (std::is_same_v<TC, int8_t> && std::is_same_v<KVs, PagedKV<int8_t>> && !std::is_same_v<TQ, float>) {
    if (attend_i8(q, kv, ksc, vsc, L, G, D, scale, out, buf)) return;
  }
  buf.resize(static_cast<size_t>(G * (L + 2 * D)));
  float* s = buf.data();   // [G, L] scores, then probabilities
  float* qf = s + G * L;   // [G, D] output accumulator
  float* qv = qf + G * D;  // [G, D] q * scale in float32
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qv[g * D + d] = to_f(q[g * D + d]) * scale;
  const bool vec = D % 8 == 0;
  kv.template runs<0>(0, L, [&](int64_t l, int64_t m, const TC* kc, const TC*) {
    int64_t i = 0;
    if (vec)  // 8 keys at a time: 8 independent FMA chains, one transposing reduction for 8 scores
      for (; i + 8 <= m; i += 8)
        for (int64_t g = 0; g < G; ++g) {
          __m256 a[8];
          for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(qv + g * D + d);
            for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(load8f(kc + (i + j) * D + d), qd, a[j]);
          }
          __m256 sc = hsum8(a);
          if (ksc) sc = _mm256_mul_ps(sc, _mm256_loadu_ps(ksc + l + i));
          _mm256_storeu_ps(s + g * L + l + i, sc);
        }
    for (; i < m; ++i) {
      const TC* k = kc + i * D;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += elem(k[d]) * qv[g * D + d];
        s[g * L + l + i] = ksc ? acc * ksc[l + i] : acc;
      }
    }
  });
  softmax_fold(s, L, G, vsc);
  std::fill(qf, qf + G * D, 0.0f);
  if (D == 64) {  // each head's 64 outputs in 8 registers, over blocks of keys that stay in L2 for the next head
    constexpr int64_t kBlock = 512;
    for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
      const int64_t b1 = std::min(L, b0 + kBlock);
      for (int64_t g = 0; g < G; ++g) {
        float* o = qf + g * D;
        const float* pg = s + g * L;
        __m256 acc[8];
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
        kv.template runs<1>(b0, b1, [&](int64_t l, int64_t m, const TC*, const TC* vc) {
          for (int64_t i = 0; i < m; ++i) {
            const __m256 pv = _mm256_set1_ps(pg[l + i]);
            const TC* v = vc + i * D;
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pv, load8f(v + 8 * c), acc[c]);
          }
        });
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
      }
    }
  } else {
    kv.template runs<1>(0, L, [&](int64_t l0, int64_t m, const TC*, const TC* vc) {
      for (int64_t i = 0; i < m; ++i) {
        const TC* v = vc + i * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * L + l0 + i];
          float* o = qf + g * D;
          if (vec) {
            const __m256 pv = _mm256_set1_ps(p);
            for (int64_t d = 0; d < D; d += 8)
              _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, load8f(v + d), _mm256_loadu_ps(o + d)));
          } else {
            for (int64_t d = 0; d < D; ++d) o[d] += p * elem(v[d]);
          }
        }
      }
    });
  }
  for (int64_t i = 0; i < G * D; ++i) store_out(out + i, qf[i]);
}

}  // namespace
