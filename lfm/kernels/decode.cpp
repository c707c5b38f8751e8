// The fused CPU decode step: every layer of a dense LFM2 model for a batch of single-token decodes, in one call.
//
// Why: a decode token of the 350M at int4 reads ~190 MB of weights (~10 ms at this class of machine's bandwidth),
// but the PyTorch step around the GEMV kernels is ~300 small ATen ops (norms, conv taps, RoPE, casts, residual
// adds) plus an OpenMP fork/join per kernel: milliseconds per token. Here the whole step runs inside one OpenMP
// parallel region over preallocated buffers: the GEMVs split their output rows over the threads, the small
// element-wise work between them is split by rows (`prep_pending`), and the threads meet at barriers.
// Each input vector is converted / quantized once and shared by every projection that reads it (in_proj; q, k, v;
// w1, w3), and the RMSNorm feeding it is computed in the same pass.
//
// Exactness: the arithmetic mirrors `LfmForCausalLM.forward_step` on the same weights: the same GEMV kernels with
// the same activation precision (float32 activations multiplied in float; bfloat16 ones quantized as the unfused
// Int8Linear / Int4Linear path quantizes them), and every element-wise result rounded to the activation dtype where
// PyTorch rounds it (float32 math in between). What can differ is float32 summation order (norm statistics) and
// libm vs. SLEEF in exp / cos / sin: an ulp of float32 before a bfloat16 rounding.
//
// Scope: dense layers (short conv, GQA attention, SwiGLU MLP); weights int8, int4 (group 32..256) or bfloat16;
// activations float32 or bfloat16; KV cache float32 / bfloat16 / int8 (per-vector scales), paged. The caller
// (lfm.engine.cpu_decode) builds a DecodePlan once per model and checks what it supports.


#include "decode_plan.h"

namespace {

// The MoE feed-forward of a layer (inside the parallel region; a_ holds the normalized rows, prepared for the
// router). Mirrors lfm2.MoE.route + QuantExperts.forward: one token combines its k experts in one float sum
// (its bfloat16 [1, k] @ [k, D] matmul), more tokens add each expert's weighted output in expert order (index_add).
template <typename TA>
void DecodePlan::moe_ffn(const Layer& L, int64_t B, int t, int T, double& tg) {
  const int64_t E = static_cast<int64_t>(L.gu.size()), k = L.topk, D = D_;
  const Lin& l0 = lins_[L.gu[0]];
  const int64_t I2 = l0.N, I = I2 / 2;
  double mark = t == 0 ? now() : 0.0;
  gemv<TA>(lins_[L.gate], a_, rl_.data(), t, T);
#pragma omp barrier
#pragma omp single
  {  // routing: sigmoid scores (rounded), top-k on score + bias, weights from the scores
    // the selection itself is torch.topk, on the same tensor the general path builds: ties (frequent among
    // bfloat16 scores) then resolve the same way (ATen runs inline inside this OpenMP region)
    const float* sig = sigmoid_.data_ptr<float>();
    at::Tensor sc_t = at::empty({B, E}, at::TensorOptions().dtype(at::kBFloat16));
    BFloat16* scp = sc_t.data_ptr<BFloat16>();
    for (int64_t i = 0; i < B * E; ++i) {
      const float r = rnd<TA>(rl_[i]);
      uint32_t bits;
      std::memcpy(&bits, &r, 4);
      scp[i] = BFloat16(sig[bits >> 16]);
    }
    at::Tensor idx_t = L.ebias.defined()
        ? std::get<1>(at::topk(at::add(sc_t.to(at::kFloat), L.ebias), k))
        : std::get<1>(at::topk(sc_t, k));
    const int64_t* ip = idx_t.contiguous().data_ptr<int64_t>();
    for (int64_t m = 0; m < B; ++m) {
      float w[64], sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        sel_[m * k + j] = ip[m * k + j];
        w[j] = static_cast<float>(scp[m * E + sel_[m * k + j]]);
      }
      if (L.norm_topk) {
        sum = rnd<TA>(aten_sum(w, k, lanes_));
        const float den = rnd<TA>(sum + 1e-6f);
        for (int64_t j = 0; j < k; ++j) w[j] = rnd<TA>(w[j] / den);
      }
      for (int64_t j = 0; j < k; ++j) wsel_[m * k + j] = rnd<TA>(w[j] * L.rscale);
    }
    again(a_);
    want(a_, l0);
  }
  prep_pending();
  for (int64_t p = 0; p < B * k; ++p) gemv_row<TA>(lins_[L.gu[sel_[p]]], a_, p / k, gu_.data() + p * I2, t, T);
#pragma omp barrier
#pragma omp single
  {
    begin(a_ff_, B * k, I);
    want(a_ff_, lins_[L.dn[0]]);
  }
  prep_pending([&](int64_t p) {  // SiLU(g) * u per (token, expert)
    silu_mul<TA>(gu_.data() + p * I2, gu_.data() + p * I2 + I, a_ff_.row(p), I);
  });
  for (int64_t p = 0; p < B * k; ++p) gemv_row<TA>(lins_[L.dn[sel_[p]]], a_ff_, p, ys_.data() + p * D, t, T);
#pragma omp barrier
  if (t == 0) tg += now() - mark;
#pragma omp single
  {
    for (int64_t m = 0; m < B; ++m) {
      float* y = y_.data() + m * D;
      const float* w = wsel_.data() + m * k;
      if (B == 1) {  // (w @ ys): float products of rounded values, summed in expert-slot order, rounded once
        for (int64_t d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < k; ++j) acc += w[j] * rnd<TA>(ys_[(m * k + j) * D + d]);
          y[d] = acc;
        }
      } else {  // each (rounded) weighted output added in ascending expert id: index_add on bfloat16 sums
        // in float and rounds once (measured against torch; with k > 2 the order and the rounding both matter)
        int64_t idx[64];
        for (int64_t j = 0; j < k; ++j) idx[j] = j;
        std::stable_sort(idx, idx + k, [&](int64_t a, int64_t b) { return sel_[m * k + a] < sel_[m * k + b]; });
        for (int64_t d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < k; ++j)
            acc += rnd<TA>(rnd<TA>(ys_[(m * k + idx[j]) * D + d]) * w[idx[j]]);
          y[d] = acc;
        }
      }
    }
    residual<TA>(x_.data(), y_.data(), B * D);
  }
}

template <typename TA>
void DecodePlan::run(const at::Tensor& xin, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& conv_slots, const at::Tensor& snap_blocks, const at::Tensor& block_tables,
                     const at::Tensor& lens, at::Tensor& out) {
  const int64_t B = xin.size(0), D = D_;
  int64_t ff = 0, qkv = 0, HD = D;
  int64_t E = 0;
  for (const Layer& L : layers_) {
    if (L.moe) E = std::max(E, static_cast<int64_t>(L.gu.size()));
    else ff = std::max(ff, lins_[L.w1].N);
    if (L.attn) {
      qkv = std::max(qkv, lins_[L.q].N + 2 * lins_[L.k].N);
      HD = std::max(HD, L.H * L.hd);
    }
  }
  x_.resize(static_cast<size_t>(B * D));
  big_.resize(static_cast<size_t>(B * std::max({3 * D, ff, qkv})));
  g_.resize(static_cast<size_t>(B * ff));
  y_.resize(static_cast<size_t>(B * D));
  if (E) {
    sel_.resize(static_cast<size_t>(B * kmax_));
    wsel_.resize(static_cast<size_t>(B * kmax_));
    gu_.resize(static_cast<size_t>(B * kmax_ * 2 * Imax_));
    ys_.resize(static_cast<size_t>(B * kmax_ * D));
    rl_.resize(static_cast<size_t>(B * E));
  }
  std::vector<TA> qa(static_cast<size_t>(B * HD)), oa(static_cast<size_t>(B * HD));
  const TA* xi = ptr<TA>(xin);
  for (int64_t i = 0; i < B * D; ++i) x_[i] = to_f(xi[i]);
  int nt = at::get_num_threads();
  if (nt < 1) nt = 1;
  scratch_.resize(nt);
  attn_buf_.resize(nt);
  for (auto& s : scratch_) s.resize(static_cast<size_t>(4 * round_up(Kmax_ / 16 + 16, 8)));
  xf_.resize(nt);
  for (auto& s : xf_) s.resize(static_cast<size_t>(round_up(Kmax_, 64)));
  if (amx_min_ <= B) {
    amx_scratch_.resize(nt);
    for (auto& s : amx_scratch_) s.resize(static_cast<size_t>(amx_scratch_bytes(Kmax_)));
  }
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* cslot = conv_slots.data_ptr<int64_t>();
  const int64_t* snapb = snap_blocks.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t mb = block_tables.size(1);
  const float* inv = inv_freq_.data_ptr<float>();
  TA* convp = reinterpret_cast<TA*>(conv_.data_ptr());
  TA* snapp = snap_.defined() ? reinterpret_cast<TA*>(snap_.data_ptr()) : nullptr;
  const int64_t L1 = conv_.size(2), nslots = conv_.size(1), nsnap = snap_.defined() ? snap_.size(1) : 0;
  double tg = 0, ta = 0, t_start = now();

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    double mark = 0;
    auto gemv_begin = [&] { if (t == 0) mark = now(); };
    auto gemv_end = [&](double& acc) { if (t == 0) acc += now() - mark; };
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
#pragma omp single
      {
        begin(a_, B, D);
        if (L.attn) { want(a_, lins_[L.q]); want(a_, lins_[L.k]); want(a_, lins_[L.v]); }
        else want(a_, lins_[L.in]);
      }
      prep_pending([&](int64_t m) { rms_row<TA>(x_.data() + m * D, L.norm, a_.row(m), D); });
      gemv_begin();
      if (!L.attn) {
        const Lin& in = lins_[L.in];
        gemv<TA>(in, a_, big_.data(), t, T);
#pragma omp barrier
        gemv_end(tg);
#pragma omp single
        {
          begin(a_o_, B, D);
          want(a_o_, lins_[L.out]);
        }
        const int64_t Lk = L1 + 1;
        const TA* w = ptr<TA>(L.conv_w);
        const TA* bias = L.conv_b.defined() ? ptr<TA>(L.conv_b) : nullptr;
        prep_pending([&](int64_t m) {  // B * x, the 3-tap conv from the slot's state (state shifted), C * conv
            const float* r = big_.data() + m * 3 * D;
            TA* st = convp + ((L.ci * nslots) + cslot[m]) * L1 * D;  // [L-1, D]
            float* o = a_o_.row(m);
            int64_t d0 = 0;
            if (bias == nullptr)
              for (; d0 + 8 <= D; d0 += 8) {  // w is [D, L]: the taps of 8 channels gathered once per step
                const __m256 bx = rnd8<TA>(_mm256_mul_ps(rnd8<TA>(_mm256_loadu_ps(r + d0)),
                                                         rnd8<TA>(_mm256_loadu_ps(r + 2 * D + d0))));
                alignas(32) float wt[16][8];
                for (int64_t j = 0; j <= L1; ++j)
                  for (int c = 0; c < 8; ++c) wt[j][c] = to_f(w[(d0 + c) * Lk + j]);
                __m256 z = _mm256_setzero_ps();
                for (int64_t j = 0; j < L1; ++j)
                  z = _mm256_add_ps(z, _mm256_mul_ps(load8(st + j * D + d0), _mm256_load_ps(wt[j])));
                z = _mm256_add_ps(z, _mm256_mul_ps(bx, _mm256_load_ps(wt[L1])));
                _mm256_storeu_ps(o + d0, rnd8<TA>(_mm256_mul_ps(rnd8<TA>(_mm256_loadu_ps(r + D + d0)), rnd8<TA>(z))));
                if (L1 > 0) {
                  for (int64_t j = 0; j + 1 < L1; ++j) std::memcpy(st + j * D + d0, st + (j + 1) * D + d0, 8 * sizeof(TA));
                  store8(st + (L1 - 1) * D + d0, bx);
                }
              }
            for (int64_t d = d0; d < D; ++d) {
              const float bx = rnd<TA>(rnd<TA>(r[d]) * rnd<TA>(r[2 * D + d]));
              float z = 0.0f;  // taps oldest first, as the general path sums them (0 + a b = a b exactly)
              for (int64_t j = 0; j < L1; ++j) z = z + to_f(st[j * D + d]) * to_f(w[d * Lk + j]);
              z = z + bx * to_f(w[d * Lk + L1]);
              if (bias) z = z + to_f(bias[d]);
              o[d] = rnd<TA>(rnd<TA>(r[D + d]) * rnd<TA>(z));
              if (L1 > 0) {
                for (int64_t j = 0; j + 1 < L1; ++j) st[j * D + d] = st[(j + 1) * D + d];
                st[(L1 - 1) * D + d] = TA(bx);
              }
            }
            if (snapb[m] >= 0 && snapb[m] < nsnap && L1 > 0)
              std::memcpy(snapp + ((L.ci * nsnap) + snapb[m]) * L1 * D, st, sizeof(TA) * L1 * D);
        });
      } else {
        const Lin &lq = lins_[L.q], &lk = lins_[L.k], &lv = lins_[L.v];
        const int64_t Nq = lq.N, Nk = lk.N, W3 = Nq + 2 * Nk;
        // q, k, v side by side in big_: each thread's rows of each. Rows of big_ are W3 wide, so each GEMV
        // writes with a row stride of its own N: use per-projection regions [B, N] instead.
        float* qb = big_.data();
        float* kb = qb + B * Nq;
        float* vb = kb + B * Nk;
        gemv<TA>(lq, a_, qb, t, T);
        gemv<TA>(lk, a_, kb, t, T);
        gemv<TA>(lv, a_, vb, t, T);
        (void)W3;
#pragma omp barrier
        gemv_end(tg);
        const int64_t H = L.H, KV = L.KV, hd = L.hd, G = H / KV, half = hd / 2;
        const int64_t bs = L.kc.size(2), nblk = L.kc.size(0);
        const bool q8 = L.kc.scalar_type() == at::kChar;
#pragma omp single
        {  // per-head RMSNorm of q and k, RoPE, the new key / value into the cache
          std::vector<float> tmp(static_cast<size_t>(hd)), cs(static_cast<size_t>(hd)), sn(static_cast<size_t>(hd));
          for (int64_t m = 0; m < B; ++m) {
            for (int64_t i = 0; i < half; ++i) {
              const float f = static_cast<float>(pos[m]) * inv[i];
              cs[i] = cs[i + half] = rnd<TA>(std::cos(f));
              sn[i] = sn[i + half] = rnd<TA>(std::sin(f));
            }
            auto norm_rope = [&](const float* src, const at::Tensor& w, float* dst) {
              float r[1024];
              for (int64_t i = 0; i < hd; ++i) r[i] = rnd<TA>(src[i]);
              rms_row<TA>(r, w, tmp.data(), hd);
              for (int64_t i = 0; i < hd; ++i) {
                const float rot = i < half ? -tmp[i + half] : tmp[i - half];
                dst[i] = rnd<TA>(rnd<TA>(tmp[i] * cs[i]) + rnd<TA>(rot * sn[i]));
              }
            };
            float hv[1024];
            for (int64_t h = 0; h < H; ++h) {
              norm_rope(qb + m * Nq + h * hd, L.qn, hv);
              for (int64_t i = 0; i < hd; ++i) qa[m * HD + h * hd + i] = TA(hv[i]);
            }
            const int64_t blk = slot[m] / bs, off = slot[m] % bs;
            for (int64_t h = 0; h < KV; ++h) {
              const int64_t e = ((blk * KV + h) * bs + off);
              float kv2[2][1024];
              norm_rope(kb + m * Nk + h * hd, L.kn, kv2[0]);
              for (int64_t i = 0; i < hd; ++i) kv2[1][i] = rnd<TA>(vb[m * Nk + h * hd + i]);
              for (int side = 0; side < 2; ++side) {
                const float* src = kv2[side];
                const at::Tensor& cache = side ? L.vc : L.kc;
                if (q8) {  // lfm.engine.cache.quantize_kv: amax / 127, round half to even, clamp
                  float amax = 0.0f;
                  for (int64_t i = 0; i < hd; ++i) amax = std::max(amax, std::fabs(src[i]));
                  const float s = amax / 127.0f;
                  int8_t* dst = reinterpret_cast<int8_t*>(cache.data_ptr()) + e * hd;
                  for (int64_t i = 0; i < hd; ++i)
                    dst[i] = s > 0.0f ? static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(src[i] / s)))) : 0;
                  (side ? L.vs : L.ks).data_ptr<float>()[e] = s;
                } else if (cache.scalar_type() == at::kBFloat16) {
                  BFloat16* dst = reinterpret_cast<BFloat16*>(cache.data_ptr()) + e * hd;
                  for (int64_t i = 0; i < hd; ++i) dst[i] = BFloat16(src[i]);
                } else {
                  float* dst = cache.data_ptr<float>() + e * hd;
                  for (int64_t i = 0; i < hd; ++i) dst[i] = src[i];
                }
              }
            }
          }
        }
        if (t == 0) mark = now();
        // attention: one task per (sequence, KV head)
        const int64_t stride = KV * bs * hd;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * KV; ++task) {
          const int64_t m = task / KV, h = task % KV, len = lp[m];
          const int32_t* table = tables + m * mb;
          const TA* qp = qa.data() + m * HD + h * G * hd;
          TA* op = oa.data() + m * HD + h * G * hd;
          std::vector<float>& buf = attn_buf_[t];
          if (q8) {
            std::vector<float> sc(static_cast<size_t>(2 * len));
            const float* ksp = L.ks.data_ptr<float>();
            const float* vsp = L.vs.data_ptr<float>();
            for (int64_t l0 = 0; l0 < len; l0 += bs) {
              const int64_t off = (static_cast<int64_t>(table[l0 / bs]) * KV + h) * bs, n = std::min(bs, len - l0);
              std::memcpy(sc.data() + l0, ksp + off, sizeof(float) * n);
              std::memcpy(sc.data() + len + l0, vsp + off, sizeof(float) * n);
            }
            const int8_t* kp = reinterpret_cast<const int8_t*>(L.kc.data_ptr());
            const int8_t* vp = reinterpret_cast<const int8_t*>(L.vc.data_ptr());
            const PagedKV<int8_t> kv{kp + h * bs * hd, vp + h * bs * hd, table, bs, stride, hd, (len + bs - 1) / bs};
            attend<TA, int8_t>(qp, kv, sc.data(), sc.data() + len, len, G, hd, 1.0f / std::sqrt(float(hd)), op, buf);
          } else if (L.kc.scalar_type() == at::kBFloat16) {
            const BFloat16* kp = reinterpret_cast<const BFloat16*>(L.kc.data_ptr());
            const BFloat16* vp = reinterpret_cast<const BFloat16*>(L.vc.data_ptr());
            const PagedKV<BFloat16> kv{kp + h * bs * hd, vp + h * bs * hd, table, bs, stride, hd, (len + bs - 1) / bs};
            attend<TA, BFloat16>(qp, kv, nullptr, nullptr, len, G, hd, 1.0f / std::sqrt(float(hd)), op, buf);
          } else {
            const float* kp = L.kc.data_ptr<float>();
            const float* vp = L.vc.data_ptr<float>();
            const PagedKV<float> kv{kp + h * bs * hd, vp + h * bs * hd, table, bs, stride, hd, (len + bs - 1) / bs};
            attend<TA, float>(qp, kv, nullptr, nullptr, len, G, hd, 1.0f / std::sqrt(float(hd)), op, buf);
          }
        }  // implicit barrier
        if (t == 0) ta += now() - mark;
        (void)nblk;
#pragma omp single
        {
          begin(a_o_, B, H * hd);
          want(a_o_, lins_[L.out]);
        }
        prep_pending([&](int64_t m) {
          for (int64_t i = 0; i < H * hd; ++i) a_o_.x[m * H * hd + i] = to_f(oa[m * HD + i]);
        });
      }
      gemv_begin();
      gemv<TA>(lins_[L.out], a_o_, y_.data(), t, T);
#pragma omp barrier
      gemv_end(tg);
#pragma omp single
      {  // shared activations of w1 / w3 (or the router)
        begin(a_, B, D);
        if (L.moe) want(a_, lins_[L.gate]);
        else { want(a_, lins_[L.w1]); want(a_, lins_[L.w3]); }
      }
      prep_pending([&](int64_t m) {  // residual, ffn norm
        float* xr = x_.data() + m * D;
        residual<TA>(xr, y_.data() + m * D, D);
        rms_row<TA>(xr, L.ffn_norm, a_.row(m), D);
      });
      if (L.moe) {
        moe_ffn<TA>(L, B, t, T, tg);
        continue;
      }
      const Lin &l1 = lins_[L.w1], &l3 = lins_[L.w3];
      gemv_begin();
      gemv<TA>(l1, a_, big_.data(), t, T);
      gemv<TA>(l3, a_, g_.data(), t, T);
#pragma omp barrier
      gemv_end(tg);
      const int64_t F = l1.N;
#pragma omp single
      {
        begin(a_ff_, B, F);
        want(a_ff_, lins_[L.w2]);
      }
      prep_pending([&](int64_t m) {  // SiLU(w1 x) * w3 x
        silu_mul<TA>(big_.data() + m * F, g_.data() + m * F, a_ff_.row(m), F);
      });
      gemv_begin();
      gemv<TA>(lins_[L.w2], a_ff_, y_.data(), t, T);
#pragma omp barrier
      gemv_end(tg);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < B; ++m) residual<TA>(x_.data() + m * D, y_.data() + m * D, D);
    }
#pragma omp single
    {
      begin(a_, B, D);
      want(a_, lins_[head_]);
    }
    prep_pending([&](int64_t m) { rms_row<TA>(x_.data() + m * D, final_norm_, a_.row(m), D); });
    gemv_begin();
    gemv<TA>(lins_[head_], a_, reinterpret_cast<TA*>(out.data_ptr()), t, T);
#pragma omp barrier
    gemv_end(tg);
  }
  const double total = now() - t_start;
  t_gemv_ += tg;
  t_attn_ += ta;
  t_other_ += total - tg - ta;
  ++steps_;
}


}  // namespace

namespace py = pybind11;

void register_decode(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan", "The fused CPU decode step of one dense LFM2 model (lfm.engine.cpu_decode)")
      .def(py::init<int64_t, double, bool, bool, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>(),
           py::arg("hidden"), py::arg("eps"), py::arg("bf16"), py::arg("int4_a16"), py::arg("inv_freq"),
           py::arg("conv"), py::arg("conv_snap"), py::arg("vocab"), py::arg("sum_lanes"))
      .def("add_linear", &DecodePlan::add_linear)
      .def("add_conv", &DecodePlan::add_conv)
      .def("add_attn", &DecodePlan::add_attn)
      .def("add_mlp", &DecodePlan::add_mlp)
      .def("set_head", &DecodePlan::set_head)
      .def("set_silu_table", &DecodePlan::set_silu_table)
      .def("set_amx_min_rows", &DecodePlan::set_amx_min_rows)
      .def("add_moe", &DecodePlan::add_moe)
      .def("set_sigmoid_table", &DecodePlan::set_sigmoid_table)
      .def("step", &DecodePlan::step, py::call_guard<py::gil_scoped_release>())
      .def("timings", &DecodePlan::timings)
      .def("reset_timings", &DecodePlan::reset_timings);
}
