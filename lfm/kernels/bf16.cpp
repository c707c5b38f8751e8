// Torch-facing bfloat16-weight GEMM (the kernel and its arithmetic: bf16_kernels.h).

#include "bf16_kernels.h"

namespace {

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
