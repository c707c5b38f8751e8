// Torch-facing int8 / int4 GEMV ops (see gemv_kernels.h for the kernels and their arithmetic), and the module.

#include "gemv_kernels.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// dtype plumbing

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
}

}  // namespace

// y[M, N] = x[M, K] @ (q[N, K] * scale[N, None]).T, in out_dtype; act_bits: 32 in float (float32 x only), 16 with
// the activations quantized to int16
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, at::ScalarType out_dtype,
                     int64_t act_bits) {
  check_x(x);
  TORCH_CHECK(act_bits == 16 || (act_bits == 32 && x.scalar_type() == at::kFloat),
              "act_bits must be 16, or 32 for float32 x");
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "weight must be a contiguous int8 [N, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K, "weight has ", q.size(1), " inputs, x has ", K);
  TORCH_CHECK(scale.device().is_cpu() && scale.is_contiguous() && scale.numel() == N,
              "scales must hold one value per output");
  auto y = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  if (act_bits == 32) {
    by_float_type(scale.scalar_type(), "scales", [&](auto ts) {
      using TS = decltype(ts);
      by_float_type(out_dtype, "out_dtype", [&](auto to) {
        using TO = decltype(to);
        int8f_dispatch(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), scale.data_ptr<TS>(), y.data_ptr<TO>(), N);
      });
    });
    return y;
  }
  static thread_local XQ8 X;
  by_float_type(x.scalar_type(), "x", [&](auto tx) {
    using TX = decltype(tx);
    prep_x8(x.data_ptr<TX>(), M, K, X);
  });
  by_float_type(scale.scalar_type(), "scales", [&](auto ts) {
    using TS = decltype(ts);
    by_float_type(out_dtype, "out_dtype", [&](auto to) {
      using TO = decltype(to);
      int8_dispatch(X, M, q.data_ptr<int8_t>(), scale.data_ptr<TS>(), y.data_ptr<TO>(), N);
    });
  });
  if (M > kKeepRows) X = XQ8{};  // a prefill's buffers are not kept for the next call
  return y;
}

// y[M, N] = x[M, K] @ W.T with W[n, k] = (q[n, k] - 8) * scales[n, k / group] + zeros[n, k / group],
// q packed two per byte (k even: low nibble), qweight [N, K / 2] uint8; act_bits: how the activations are multiplied:
// 32 in float (float32 x only), 16 / 8 quantized to int16 / int8
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group, at::ScalarType out_dtype, int64_t act_bits,
                     int64_t amx_min_rows) {
  check_x(x);
  TORCH_CHECK(group == 32 || group == 64 || group == 128 || group == 256, "group size must be 32, 64, 128 or 256");
  TORCH_CHECK(act_bits == 8 || act_bits == 16 || (act_bits == 32 && x.scalar_type() == at::kFloat),
              "act_bits must be 8 or 16, or 32 for float32 x");
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.scalar_type() == at::kByte,
              "qweight must be a contiguous uint8 [N, K / 2] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K > 0 && K % group == 0 && qweight.size(1) * 2 == K, "qweight [N, K / 2] does not match x's K = ", K,
              " and group ", group);
  const int64_t G = K / group;
  TORCH_CHECK(scales.device().is_cpu() && zeros.device().is_cpu() && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.numel() == N * G && zeros.numel() == N * G &&
                  scales.scalar_type() == zeros.scalar_type(),
              "scales and zeros must be contiguous [N, K / group] tensors of one dtype");
  auto y = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  if (act_bits == 32) {
    std::vector<float> xsum(M * G);
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < M * G; ++i) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = 0; k < group; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xp + i * group + k));
      xsum[i] = hsum(a);
    }
    by_float_type(scales.scalar_type(), "scales", [&](auto ts) {
      using TS = decltype(ts);
      by_float_type(out_dtype, "out_dtype", [&](auto to) {
        using TO = decltype(to);
        int4f_dispatch(xp, xsum.data(), M, K, group, qweight.data_ptr<uint8_t>(), scales.data_ptr<TS>(),
                       zeros.data_ptr<TS>(), y.data_ptr<TO>(), N);
      });
    });
    return y;
  }
  static thread_local XQ4 X;
  by_float_type(x.scalar_type(), "x", [&](auto tx) {
    using TX = decltype(tx);
    prep_x4(x.data_ptr<TX>(), M, K, group, act_bits == 16, X);
  });
  by_float_type(scales.scalar_type(), "scales", [&](auto ts) {
    using TS = decltype(ts);
    by_float_type(out_dtype, "out_dtype", [&](auto to) {
      using TO = decltype(to);
      int4_dispatch(X, M, group, qweight.data_ptr<uint8_t>(), scales.data_ptr<TS>(), zeros.data_ptr<TS>(),
                    y.data_ptr<TO>(), N, amx_min_rows);
    });
  });
  if (M > kKeepRows) X = XQ4{};
  return y;
}

namespace py = pybind11;

at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);  // bf16.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& k_scale, const at::Tensor& v_scale,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  double scale);  // attention.cpp

void int4_dequant_bf16(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t gs,
                       at::Tensor& out);  // dequant.cpp
void int8_dequant_bf16(const at::Tensor& weight, const at::Tensor& scales, at::Tensor& out);  // dequant.cpp

at::Tensor paged_decode_attention_nogil(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& k_scale, const at::Tensor& v_scale,
                                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                                        double scale) {
  py::gil_scoped_release nogil;
  return paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale);
}

// The layers' entry points: x of any shape [..., K]; None when the kernels do not apply (x not a CPU float tensor,
// autograd, more than max_rows rows, weights not in the expected CPU layout), so that the caller uses PyTorch's op. Output in the scales' dtype (as the
// PyTorch path, which casts x to it); activations multiplied in float for float32 x, else quantized (int8 weights:
// int16; int4 weights: int4_act_bits).
namespace {
bool applies(const at::Tensor& x, int64_t K, int64_t max_rows, at::Tensor& x2) {
  if (!x.defined() || !x.device().is_cpu() || x.dim() < 1 || x.size(-1) != K) return false;
  const auto t = x.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (x.requires_grad() && at::GradMode::is_enabled()) return false;
  if (K == 0 || x.numel() / K > max_rows) return false;
  x2 = x.reshape({-1, K});
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  return true;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}
}  // namespace

static bool float_cpu(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return t.defined() && t.device().is_cpu() && t.is_contiguous() &&
         (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf);
}

py::object int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t max_rows) {
  if (!q.defined() || !q.device().is_cpu() || q.dim() != 2 || !q.is_contiguous() || q.scalar_type() != at::kChar ||
      !float_cpu(scale) || scale.numel() != q.size(0))
    return py::none();
  at::Tensor x2;
  if (!applies(x, q.size(1), max_rows, x2)) return py::none();
  const int64_t bits = x2.scalar_type() == at::kFloat ? 32 : 16;
  at::Tensor y;
  {
    py::gil_scoped_release nogil;
    y = int8_gemv(x2, q, scale, scale.scalar_type(), bits).view(out_shape(x, q.size(0)));
  }
  return py::cast(y);
}

py::object int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group, int64_t max_rows, int64_t int4_act_bits,
                       int64_t amx_min_rows) {
  if (!qweight.defined() || !qweight.device().is_cpu() || qweight.dim() != 2 || !qweight.is_contiguous() ||
      qweight.scalar_type() != at::kByte || !float_cpu(scales) || !float_cpu(zeros) ||
      scales.scalar_type() != zeros.scalar_type() || (group != 32 && group != 64 && group != 128 && group != 256))
    return py::none();
  const int64_t K = qweight.size(1) * 2;
  if (K % group || scales.numel() != qweight.size(0) * (K / group) || zeros.numel() != scales.numel())
    return py::none();
  at::Tensor x2;
  if (!applies(x, K, max_rows, x2)) return py::none();
  const int64_t bits = x2.scalar_type() == at::kFloat ? 32 : int4_act_bits;
  at::Tensor y;
  {
    py::gil_scoped_release nogil;
    y = int4_gemv(x2, qweight, scales, zeros, group, scales.scalar_type(), bits, amx_min_rows)
            .view(out_shape(x, qweight.size(0)));
  }
  return py::cast(y);
}

py::object bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t max_rows) {
  if (!w.defined() || !w.device().is_cpu() || w.dim() != 2 || !w.is_contiguous() || w.scalar_type() != at::kBFloat16)
    return py::none();
  if (bias.has_value() && bias->defined() && (!bias->device().is_cpu() || bias->requires_grad()))
    return py::none();
  at::Tensor x2;
  if (!applies(x, w.size(1), max_rows, x2) || (w.requires_grad() && at::GradMode::is_enabled())) return py::none();
  at::Tensor y;
  {
    py::gil_scoped_release nogil;
    y = bf16_gemm(x2, w, bias).view(out_shape(x, w.size(0)));
  }
  return py::cast(y);
}

void register_decode(py::module_& m);  // decode.cpp
std::tuple<at::Tensor, at::Tensor> row_max(const at::Tensor& x);  // sample.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode(m);
  m.def("row_max", &row_max, "torch.max(x, -1) of a float32 [n, V] CPU tensor: (values, first indices)", py::arg("x"),
        py::call_guard<py::gil_scoped_release>());
  m.doc() = "lfm AVX2 kernels: weight-only int8 / int4 GEMV, bfloat16-weight GEMM";
  m.def("int8_gemv", &int8_gemv, "y = x @ (q * scale[:, None]).T", py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("out_dtype"), py::arg("act_bits") = 16);
  m.def("int4_gemv", &int4_gemv, "y = x @ dequant(qweight, scales, zeros, group).T", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("group"), py::arg("out_dtype"),
        py::arg("act_bits") = 16, py::arg("amx_min_rows") = kNoAmx);
  m.def("amx_int8", &amx_int8, "whether int4 x int8 products can run on AMX here (CPU, kernel permission)");
  m.def("bf16_gemm", &bf16_gemm, "y = x @ w.T + bias, bfloat16 w widened to float32 in registers", py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("bf16_linear", &bf16_linear, "nn.Linear on bfloat16 weights, or None where the kernel does not apply",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("max_rows"));
  m.def("paged_decode_attention", &paged_decode_attention_nogil,
        "one query per sequence against a paged KV cache [num_blocks, KV, block_size, D] through block tables "
        "(reads only: the new key / value are already in the cache)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"));
  m.def("int4_dequant_bf16", &int4_dequant_bf16, "out[:N*K] = Int4Linear's weight as bfloat16", py::arg("qweight"),
        py::arg("scales"), py::arg("zeros"), py::arg("group"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_dequant_bf16", &int8_dequant_bf16, "out[:N*K] = Int8Linear's weight as bfloat16", py::arg("weight"),
        py::arg("scales"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, "Int8Linear's kernel, or None where it does not apply", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("max_rows"));
  m.def("int4_linear", &int4_linear, "Int4Linear's kernel, or None where it does not apply", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("group"), py::arg("max_rows"),
        py::arg("int4_act_bits"), py::arg("amx_min_rows") = kNoAmx);
}
