// Torch-facing paged decode attention (the math: attention_kernels.h).

#include "attention_kernels.h"

namespace {

template <typename TQ, typename TC>
void run_paged(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& kss,
               const at::Tensor& vss, const at::Tensor& tables, const at::Tensor& lens, float scale, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KV = kc.size(1), bs = kc.size(2), G = H / KV;
  const int64_t max_blocks = tables.size(1), stride = KV * bs * D;
  const TQ* qp = q.data_ptr<TQ>();
  const TC* kp = kc.data_ptr<TC>();
  const TC* vp = vc.data_ptr<TC>();
  const float* ksp = std::is_same_v<TC, int8_t> ? kss.data_ptr<float>() : nullptr;
  const float* vsp = std::is_same_v<TC, int8_t> ? vss.data_ptr<float>() : nullptr;
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  TQ* op = out.data_ptr<TQ>();
  const int64_t tasks = n * KV;
  int64_t work = 0;
  for (int64_t b = 0; b < n; ++b) work += lp[b] * KV * D;
  int nt = at::get_num_threads();
  if (nt < 1 || work < (int64_t(1) << 16)) nt = 1;
  if (nt > tasks) nt = static_cast<int>(tasks);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> buf, scales;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / KV, h = t % KV, L = lp[b];
      const int32_t* table = tp + b * max_blocks;
      const float* ksc = nullptr;
      const float* vsc = nullptr;
      if (ksp) {  // int8: the sequence's scales for this head, gathered in key order (L floats, next to L * D reads)
        scales.resize(static_cast<size_t>(2 * L));
        float* ks = scales.data();
        float* vs = ks + L;
        for (int64_t l0 = 0; l0 < L; l0 += bs) {
          const int64_t off = (static_cast<int64_t>(table[l0 / bs]) * KV + h) * bs, m = std::min(bs, L - l0);
          std::memcpy(ks + l0, ksp + off, static_cast<size_t>(m) * sizeof(float));
          std::memcpy(vs + l0, vsp + off, static_cast<size_t>(m) * sizeof(float));
        }
        ksc = ks;
        vsc = vs;
      }
      const PagedKV<TC> kv{kp + h * bs * D, vp + h * bs * D, table, bs, stride, D, (L + bs - 1) / bs};
      attend<TQ, TC>(qp + (b * H + h * G) * D, kv, ksc, vsc, L, G, D, scale, op + (b * H + h * G) * D, buf);
    }
  }
}

template <typename F>
void by_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    case at::kHalf: f(Half{}); break;
    default: TORCH_CHECK(false, "attention tensors must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace

// q [n, H, D]; k_cache, v_cache [num_blocks, KV, block_size, D] (float32 / bfloat16 / float16, or int8 with
// k_scale, v_scale [num_blocks, KV, block_size] float32; float caches: empty scales); block_tables [n, max_blocks]
// int32: sequence b's key l in physical block block_tables[b, l / block_size], offset l % block_size;
// context_lens [n] int32: b attends over its keys 0 .. context_lens[b] - 1 (the new token's included: the caller has
// written it). Only reads the caches; returns the attention output [n, H, D] in q's dtype. Block table entries past a
// sequence's last block are not read (may be padding, e.g. -1).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& k_scale, const at::Tensor& v_scale,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.defined() && q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(),
              "paged_decode_attention: q must be a contiguous CPU [n, H, D] tensor, got ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  const auto qt = q.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf,
              "paged_decode_attention: q must be float32, bfloat16 or float16, got ", qt);
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(H > 0 && D > 0, "paged_decode_attention: q needs at least one head and head_dim > 0, got ", q.sizes());
  TORCH_CHECK(k_cache.defined() && k_cache.dim() == 4 && k_cache.is_contiguous() && k_cache.device().is_cpu(),
              "paged_decode_attention: k_cache must be a contiguous CPU [num_blocks, KV, block_size, D] tensor, got ",
              k_cache.defined() ? k_cache.sizes() : at::IntArrayRef{});
  TORCH_CHECK(v_cache.defined() && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                  v_cache.device().is_cpu() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_decode_attention: v_cache must be a contiguous CPU tensor of k_cache's shape ", k_cache.sizes(),
              " and dtype ", k_cache.scalar_type());
  const int64_t num_blocks = k_cache.size(0), KV = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode_attention: the caches' head_dim ", k_cache.size(3),
              " differs from q's ", D);
  TORCH_CHECK(KV > 0 && H % KV == 0, "paged_decode_attention: query heads (", H, ") must be a multiple of KV heads (",
              KV, ")");
  TORCH_CHECK(bs > 0, "paged_decode_attention: block_size must be > 0");
  const auto ct = k_cache.scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kHalf || ct == at::kChar,
              "paged_decode_attention: caches must be float32, bfloat16, float16 or int8, got ", ct);
  const bool int8 = ct == at::kChar;
  for (const at::Tensor* s : {&k_scale, &v_scale}) {
    if (int8) {
      TORCH_CHECK(s->defined() && s->device().is_cpu() && s->is_contiguous() && s->scalar_type() == at::kFloat &&
                      s->dim() == 3 && s->size(0) == num_blocks && s->size(1) == KV && s->size(2) == bs,
                  "paged_decode_attention: int8 caches need contiguous float32 CPU k_scale / v_scale of shape [",
                  num_blocks, ", ", KV, ", ", bs, "]");
    } else {
      TORCH_CHECK(!s->defined() || s->numel() == 0,
                  "paged_decode_attention: float caches take empty k_scale / v_scale tensors");
    }
  }
  TORCH_CHECK(block_tables.defined() && block_tables.dim() == 2 && block_tables.size(0) == n &&
                  block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  block_tables.device().is_cpu(),
              "paged_decode_attention: block_tables must be a contiguous int32 CPU [n, max_blocks] tensor with n = ", n,
              ", got ", block_tables.defined() ? block_tables.sizes() : at::IntArrayRef{}, " ",
              block_tables.defined() ? block_tables.scalar_type() : at::kInt);
  TORCH_CHECK(context_lens.defined() && context_lens.dim() == 1 && context_lens.size(0) == n &&
                  context_lens.scalar_type() == at::kInt && context_lens.is_contiguous() &&
                  context_lens.device().is_cpu(),
              "paged_decode_attention: context_lens must be a contiguous int32 CPU [n] tensor with n = ", n);
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  const int32_t* lp = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < n; ++b) {
    const int64_t L = lp[b];
    TORCH_CHECK(L > 0 && L <= max_blocks * bs, "paged_decode_attention: context_lens[", b, "] = ", L,
                " must be in 1 .. max_blocks * block_size = ", max_blocks * bs);
    for (int64_t j = 0; j < (L + bs - 1) / bs; ++j) {
      const int64_t p = tp[b * max_blocks + j];
      TORCH_CHECK(p >= 0 && p < num_blocks, "paged_decode_attention: block_tables[", b, ", ", j, "] = ", p,
                  " is outside the cache's ", num_blocks, " blocks");
    }
  }
  auto out = at::empty({n, H, D}, q.options());
  if (n == 0) return out;
  by_type(qt, [&](auto tq) {
    using TQ = decltype(tq);
    if (int8) {
      run_paged<TQ, int8_t>(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                            static_cast<float>(scale), out);
      return;
    }
    by_type(ct, [&](auto tc) {
      using TC = decltype(tc);
      run_paged<TQ, TC>(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, static_cast<float>(scale), out);
    });
  });
  return out;
}
