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

template <typename TO>
void bf16_dispatch(const float* xp, int64_t M, int64_t K, int64_t Kp, const uint16_t* W, const float* bias, TO* Y,
                   int64_t N) {
  const int nt = pick_threads(N * K * 2, N);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t n0, n1;
    split_rows(N, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    by_row_tiles(M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      bf16_rows<decltype(mt)::value>(xp, K, Kp, m0, W, bias, Y, N, r0, r1);
    });
  }
}

}  // namespace

// y[M, N] = x[M, K] @ w[N, K].T (+ bias), w bfloat16, x float32 / bfloat16 / float16, y in x's dtype
at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, "x must be float32, bfloat16 or float16");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "weight must be a contiguous bfloat16 [N, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "weight has ", w.size(1), " inputs, x has ", K);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->numel() == N, "bias must hold one value per output");
    b = bias->to(at::kFloat).contiguous();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t Kp = round_up(std::max<int64_t>(K, 1), 16);
  std::vector<float> xp(static_cast<size_t>(M * Kp));
  switch (xt) {
    case at::kFloat: prep_x(x.data_ptr<float>(), M, K, Kp, xp.data()); break;
    case at::kBFloat16: prep_x(x.data_ptr<BFloat16>(), M, K, Kp, xp.data()); break;
    default: prep_x(x.data_ptr<Half>(), M, K, Kp, xp.data()); break;
  }
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr<BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  switch (xt) {
    case at::kFloat: bf16_dispatch(xp.data(), M, K, Kp, W, bp, y.data_ptr<float>(), N); break;
    case at::kBFloat16: bf16_dispatch(xp.data(), M, K, Kp, W, bp, y.data_ptr<BFloat16>(), N); break;
    default: bf16_dispatch(xp.data(), M, K, Kp, W, bp, y.data_ptr<Half>(), N); break;
  }
  return y;
}
