// The fused decode step's pieces (decode.cpp): its data (linears, prepared activations, layers), the rounding
// helpers that mirror PyTorch's, ATen's summation order, and the int4 row-kernel dispatch.
#pragma once

#include <chrono>

#include "attention_kernels.h"
#include "bf16_kernels.h"
#include "gemv_kernels.h"

namespace {


enum Kind : int { kInt8 = 0, kInt4 = 1, kBf16 = 2 };

struct Lin {
  int kind;
  int64_t N, K, gs;
  at::Tensor w, s, z;  // int8: weight [N, K], scales [N]; int4: qweight [N, K/2], scales / zeros [N, K/gs]; bf16: w
};

// One input of M rows, converted for each kind of weight that reads it (done once, on first use after `reset`).
struct Act {
  int64_t M = 0, K = 0;
  std::vector<float> x;  // [M, K], values exact in the activation dtype
  bool has[3] = {false, false, false};
  int64_t gs4 = 0;
  XQ4 x4;                   // int4, bfloat16 activations
  XAmx xa;                  // the same, as AMX tiles (when `amx`: rows >= the plan's amx_min_rows)
  bool amx = false;
  XQ8 x8;                   // int8, bfloat16 activations
  std::vector<float> xsum;  // int4, float32 activations: [M, K / gs]
  std::vector<float> xp;    // bfloat16 weights: [M, Kp16], 16-blocks in even / odd order
  int64_t Kp16 = 0;
  void reset(int64_t m, int64_t k) {
    M = m;
    K = k;
    x.resize(static_cast<size_t>(M * K));
    has[0] = has[1] = has[2] = false;
  }
  float* row(int64_t m) { return x.data() + m * K; }
};

struct Layer {
  bool attn = false;
  at::Tensor norm, ffn_norm;  // activation dtype [D]
  int in = -1, out = -1;      // conv: in_proj, out_proj; attention: out_proj as `out`
  int q = -1, k = -1, v = -1;
  int w1 = -1, w3 = -1, w2 = -1;
  at::Tensor conv_w, conv_b;  // [D, L] activation dtype; bias [D] or undefined
  int64_t ci = 0;             // row in the conv pool
  at::Tensor qn, kn;          // [hd]
  at::Tensor kc, vc, ks, vs;  // [num_blocks, KV, bs, hd]; int8: scales [num_blocks, KV, bs]
  int64_t H = 0, KV = 0, hd = 0;
  // MoE feed-forward (instead of w1 / w3 / w2): router, each expert's gate_up [2I, D] and down [D, I] linears
  bool moe = false;
  int gate = -1;
  std::vector<int> gu, dn;
  at::Tensor ebias;  // float32 [E] (selection only) or undefined
  int64_t topk = 0;
  bool norm_topk = false;
  float rscale = 1.0f;
};

template <typename T>
inline float rnd(float v) {
  if constexpr (std::is_same_v<T, BFloat16>) return static_cast<float>(BFloat16(v));
  else return v;
}

// torch.sum of n float32 values in ATen's CPU order (aten/src/ATen/native/cpu/SumKernel.cpp, cascade sum): vectors of
// W lanes, 4 interleaved vector accumulators carried up 4 levels every 16 (or more) steps, then the accumulators
// added in order, a scalar tail, and the lanes left to right. W = the Vectorized<float> width ATen's sum kernel runs
// with (lfm.engine.cpu_decode measures it against torch once). The RMSNorm statistics must have these bits: an ulp
// of float32 there flips a bfloat16 rounding every few steps, and a greedy token some tens of tokens later.

// the same order with each W-lane vector as W / 8 AVX registers (lane-wise adds: the same bits)
template <int R>
inline float aten_sum_vec(const float* x, int64_t n) {
  constexpr int64_t V = 8 * R;
  const int64_t nv = n / V, size = nv / 4;
  const int64_t cl = size <= 1 ? 0 : 64 - __builtin_clzll(static_cast<uint64_t>(size - 1));
  const int64_t lp = std::max<int64_t>(4, cl / 4), step = int64_t(1) << lp, mask = step - 1;
  __m256 acc[4][4][R];
  for (auto& a : acc)
    for (auto& b : a)
      for (auto& c : b) c = _mm256_setzero_ps();
  auto add = [&](__m256* a, const float* b) __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) a[r] = _mm256_add_ps(a[r], _mm256_loadu_ps(b + 8 * r));
  };
  auto addv = [&](__m256* a, const __m256* b) __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) a[r] = _mm256_add_ps(a[r], b[r]);
  };
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j)
      for (int k = 0; k < 4; ++k) add(acc[0][k], x + ((i + j) * 4 + k) * V);
    i += step;
    for (int lv = 1; lv < 4; ++lv) {
      for (int k = 0; k < 4; ++k) {
        addv(acc[lv][k], acc[lv - 1][k]);
        for (int r = 0; r < R; ++r) acc[lv - 1][k][r] = _mm256_setzero_ps();
      }
      if (i & (mask << (lv * lp))) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) add(acc[0][k], x + (i * 4 + k) * V);
  for (int lv = 1; lv < 4; ++lv)
    for (int k = 0; k < 4; ++k) addv(acc[0][k], acc[lv][k]);
  for (int64_t e = size * 4; e < nv; ++e) add(acc[0][0], x + e * V);
  for (int k = 1; k < 4; ++k) addv(acc[0][0], acc[0][k]);
  float fin = 0.0f;
  for (int64_t e = nv * V; e < n; ++e) fin += x[e];
  alignas(32) float lanes[V];
  for (int r = 0; r < R; ++r) _mm256_store_ps(lanes + 8 * r, acc[0][0][r]);
  for (int64_t l = 0; l < V; ++l) fin += lanes[l];
  return fin;
}

inline float aten_sum(const float* x, int64_t n, int W) {
  if (n >= W) return W == 8 ? aten_sum_vec<1>(x, n) : aten_sum_vec<2>(x, n);
  // fewer values than one vector: ATen's same order on scalars (4 interleaved accumulators; under 16 groups of 4, so
  // no levels), the tail into the first, then the four added in order
  float acc[4] = {};
  const int64_t size = n / 4;
  for (int64_t i = 0; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[k] += x[i * 4 + k];
  for (int64_t e = size * 4; e < n; ++e) acc[0] += x[e];
  return ((acc[0] + acc[1]) + acc[2]) + acc[3];
}

// 8 floats rounded to bfloat16 (nearest even, as c10::BFloat16(float): NaN stays NaN) and widened back
inline __m256 rnd8_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}

template <typename T>
inline __m256 rnd8(__m256 v) {
  if constexpr (std::is_same_v<T, BFloat16>) return rnd8_bf16(v);
  else return v;
}

// 8 values already rounded to T (rnd8) stored as T
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(BFloat16* p, __m256 v) {
  const __m256i s = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m256i q = _mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(q));
}

template <typename T>
inline const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// the int4 row kernel for this group size (CPG as in gemv_kernels.h)
template <int MT, typename TS, typename TO>
void int4_rows(const XQ4& X, bool a16, int64_t gs, int64_t m0, const uint8_t* W, const TS* S, const TS* Z, TO* Y,
               int64_t N, int64_t r0, int64_t r1, float* buf) {
  auto go = [&](auto cpg) {
    constexpr int CPG = decltype(cpg)::value;
    if (a16) int4a16_rows<MT, CPG>(X, m0, W, S, Z, Y, N, r0, r1, buf);
    else if (vnni512()) int4a8_rows_vnni<MT, CPG>(X, m0, W, S, Z, Y, N, r0, r1, buf);
    else int4a8_rows<MT, CPG>(X, m0, W, S, Z, Y, N, r0, r1, buf);
  };
  if (gs == 32) go(std::integral_constant<int, 0>{});
  else if (gs == 64) go(std::integral_constant<int, 1>{});
  else if (gs == 128) go(std::integral_constant<int, 2>{});
  else go(std::integral_constant<int, 4>{});
}

}  // namespace
