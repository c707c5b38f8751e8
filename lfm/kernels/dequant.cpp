// Weight dequantization to bfloat16, for batches big enough that a native bfloat16 matmul (AMX / AVX-512 BF16 in
// oneDNN) on the dequantized weight beats the quantized GEMV kernels, whose work grows with every row of x: at 64
// rows the int4 kernel spends ~10x the time of dequantize + matmul on such a CPU. Writes into a caller's buffer
// (reused between layers), OpenMP over weight rows, AVX2: 32 int4 or 8 int8 weights per step, rounded to bfloat16
// to nearest even (the same value as c10::BFloat16(float)).

#include "common.h"

namespace {

// 8 floats -> 8 bfloat16 (round to nearest even; weights are finite)
inline __m128i to_bf16x8(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

template <typename TS>
void int4_rows(const uint8_t* qw, const TS* sc, const TS* zr, int64_t K, int64_t gs, int64_t n0, int64_t n1,
               BFloat16* out) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = qw + n * (K / 2);
    uint16_t* o = reinterpret_cast<uint16_t*>(out + n * K);
    for (int64_t g = 0; g < G; ++g) {
      const float s = to_f(sc[n * G + g]), z = to_f(zr[n * G + g]) - 8.0f * s;
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
      int64_t k = g * gs;
      for (; k + 32 <= (g + 1) * gs; k += 32) {  // 16 bytes = 32 weights, low nibble first
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
        const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
        const __m128i e[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < 2; ++j) {
            const __m128i part = j ? _mm_srli_si128(e[h], 8) : e[h];
            const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k + 16 * h + 8 * j), to_bf16x8(_mm256_fmadd_ps(f, vs, vz)));
          }
      }
      for (; k < (g + 1) * gs; ++k) {  // groups that are not a multiple of 32
        const int v = (q[k / 2] >> (4 * (k & 1))) & 15;
        out[n * K + k] = BFloat16(static_cast<float>(v) * s + z);
      }
    }
  }
}

template <typename TS>
void int8_rows(const int8_t* qw, const TS* sc, int64_t K, int64_t n0, int64_t n1, BFloat16* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = qw + n * K;
    uint16_t* o = reinterpret_cast<uint16_t*>(out + n * K);
    const float s = to_f(sc[n]);
    const __m256 vs = _mm256_set1_ps(s);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), to_bf16x8(_mm256_mul_ps(f, vs)));
    }
    for (; k < K; ++k) out[n * K + k] = BFloat16(static_cast<float>(q[k]) * s);
  }
}

template <typename F>
void over_rows(int64_t N, int64_t K, F&& f) {
  int nt = at::get_num_threads();
  if (nt < 1 || N * K < (int64_t(1) << 16)) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t n0, n1;
    split_rows(N, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    f(n0, n1);
  }
}

void check_out(const at::Tensor& out, int64_t N, int64_t K) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kBFloat16 &&
                  out.numel() >= N * K,
              "out must be a contiguous CPU bfloat16 tensor with at least N * K elements");
}

}  // namespace

// qweight [N, K/2] uint8 (low nibble first), scales / zeros [N, K/gs]: out[:N*K] = ((q - 8) * s + z) as bfloat16
void int4_dequant_bf16(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t gs,
                       at::Tensor& out) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.is_contiguous() && qweight.scalar_type() == at::kByte &&
                  qweight.dim() == 2, "qweight must be a contiguous CPU uint8 [N, K/2] tensor");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  TORCH_CHECK(gs > 0 && K % gs == 0 && gs % 2 == 0, "group size must be even and divide K");
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous() && scales.numel() == N * (K / gs) &&
                  zeros.sizes() == scales.sizes() && zeros.scalar_type() == scales.scalar_type(),
              "scales / zeros must be contiguous [N, K / group] tensors of one dtype");
  check_out(out, N, K);
  by_float_type(scales.scalar_type(), "scales", [&](auto ts) {
    using TS = decltype(ts);
    over_rows(N, K, [&](int64_t n0, int64_t n1) {
      int4_rows<TS>(qweight.data_ptr<uint8_t>(), scales.data_ptr<TS>(), zeros.data_ptr<TS>(), K, gs, n0, n1,
                    out.data_ptr<BFloat16>());
    });
  });
}

// weight [N, K] int8, scales [N]: out[:N*K] = q * s as bfloat16
void int8_dequant_bf16(const at::Tensor& weight, const at::Tensor& scales, at::Tensor& out) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.scalar_type() == at::kChar &&
                  weight.dim() == 2, "weight must be a contiguous CPU int8 [N, K] tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N, "scales must be a contiguous [N] tensor");
  check_out(out, N, K);
  by_float_type(scales.scalar_type(), "scales", [&](auto ts) {
    using TS = decltype(ts);
    over_rows(N, K, [&](int64_t n0, int64_t n1) {
      int8_rows<TS>(weight.data_ptr<int8_t>(), scales.data_ptr<TS>(), K, n0, n1, out.data_ptr<BFloat16>());
    });
  });
}
