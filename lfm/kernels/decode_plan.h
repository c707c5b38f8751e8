// DecodePlan, the fused CPU decode step (decode.cpp): what it holds, how a model is registered, the element-wise
// helpers and the row-split input preparation; its step (`run`) and MoE feed-forward are in decode.cpp.
#pragma once

#include <ATen/ops/add.h>
#include <ATen/ops/topk.h>

#include "decode_ops.h"

namespace {

class DecodePlan {
 public:
  DecodePlan(int64_t hidden, double eps, bool bf16, bool int4_a16, at::Tensor inv_freq, at::Tensor conv,
             at::Tensor conv_snap, int64_t vocab, int64_t sum_lanes)
      : D_(hidden), eps_(static_cast<float>(eps)), bf16_(bf16), a16_(int4_a16), inv_freq_(inv_freq.contiguous()),
        conv_(conv), snap_(conv_snap), V_(vocab), lanes_(static_cast<int>(sum_lanes)) {
    TORCH_CHECK(hidden > 0 && hidden <= 8192, "hidden size must be in 1 .. 8192");
    if (snap_.defined() && snap_.numel() == 0) snap_ = at::Tensor();  // prefix caching off: no snapshots
    TORCH_CHECK(!snap_.defined() || (snap_.dim() == 4 && snap_.is_contiguous() && snap_.size(2) == conv_.size(2)),
                "conv snapshots must be [C, num_blocks, L-1, D]");
    TORCH_CHECK(lanes_ == 8 || lanes_ == 16, "sum_lanes must be 8 or 16");
    TORCH_CHECK(inv_freq_.scalar_type() == at::kFloat, "inv_freq must be float32");
    TORCH_CHECK(conv_.is_contiguous() && conv_.dim() == 4 && conv_.size(3) == D_, "conv pool must be [C, slots, L-1, D]");
  }

  int64_t add_linear(int64_t kind, at::Tensor w, at::Tensor s, at::Tensor z, int64_t gs) {
    TORCH_CHECK(kind >= 0 && kind <= 2, "linear kind must be 0 (int8), 1 (int4) or 2 (bfloat16)");
    TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "weights must be contiguous and 2-D");
    Lin l{static_cast<int>(kind), w.size(0), kind == kInt4 ? w.size(1) * 2 : w.size(1), gs, w, s, z};
    const auto at_ = bf16_ ? at::kBFloat16 : at::kFloat;
    if (kind == kInt8) TORCH_CHECK(w.scalar_type() == at::kChar && s.scalar_type() == at_ && s.numel() == l.N,
                                   "int8 linear: int8 weight and one scale per row in the activation dtype");
    if (kind == kInt4) {
      TORCH_CHECK(gs == 32 || gs == 64 || gs == 128 || gs == 256, "int4 group size must be 32, 64, 128 or 256");
      TORCH_CHECK(w.scalar_type() == at::kByte && l.K % gs == 0 && s.scalar_type() == at_ &&
                      z.scalar_type() == at_ && s.is_contiguous() && z.is_contiguous() && s.numel() == l.N * l.K / gs &&
                      z.numel() == l.N * l.K / gs,
                  "int4 linear: packed uint8 weight, scales / zeros [N, K / group] in the activation dtype");
    }
    if (kind == kBf16) TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16 linear: bfloat16 weight");
    lins_.push_back(l);
    Kmax_ = std::max(Kmax_, l.K);
    Nmax_ = std::max(Nmax_, l.N);
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  void add_conv(at::Tensor norm, int64_t in, at::Tensor conv_w, at::Tensor conv_b, int64_t out, int64_t ci) {
    Layer L;
    L.norm = norm.contiguous();
    L.in = static_cast<int>(in);
    L.out = static_cast<int>(out);
    L.conv_w = conv_w.contiguous();
    if (conv_b.defined() && conv_b.numel()) L.conv_b = conv_b.contiguous();
    L.ci = ci;
    TORCH_CHECK(L.conv_w.dim() == 2 && L.conv_w.size(0) == D_ && L.conv_w.size(1) == conv_.size(2) + 1,
                "conv weight must be [D, L] with L - 1 = the conv pool's state columns");
    TORCH_CHECK(lins_.at(in).N == 3 * D_ && lins_.at(out).K == D_, "conv projections do not match the hidden size");
    layers_.push_back(L);
  }

  void add_attn(at::Tensor norm, int64_t q, int64_t k, int64_t v, at::Tensor qn, at::Tensor kn, int64_t o, int64_t H,
                int64_t KV, int64_t hd, at::Tensor kc, at::Tensor vc, at::Tensor ks, at::Tensor vs) {
    Layer L;
    L.attn = true;
    L.norm = norm.contiguous();
    L.q = static_cast<int>(q);
    L.k = static_cast<int>(k);
    L.v = static_cast<int>(v);
    L.out = static_cast<int>(o);
    L.qn = qn.contiguous();
    L.kn = kn.contiguous();
    L.H = H;
    L.KV = KV;
    L.hd = hd;
    L.kc = kc;
    L.vc = vc;
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.dim() == 4 && kc.size(1) == KV && kc.size(3) == hd,
                "KV pools must be contiguous [num_blocks, KV, block_size, head_dim]");
    TORCH_CHECK(hd % 8 == 0 && hd <= 1024 && H % KV == 0,
                "head_dim must be a multiple of 8 (at most 1024) and heads a multiple of KV heads");
    const auto ct = kc.scalar_type();
    TORCH_CHECK(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kChar, "KV cache must be float32, bfloat16 or int8");
    if (ct == at::kChar) {
      TORCH_CHECK(ks.defined() && vs.defined() && ks.scalar_type() == at::kFloat, "int8 KV needs float32 scales");
      L.ks = ks;
      L.vs = vs;
    }
    TORCH_CHECK(lins_.at(q).N == H * hd && lins_.at(k).N == KV * hd && lins_.at(v).N == KV * hd &&
                    lins_.at(o).K == H * hd,
                "attention projections do not match heads x head_dim");
    layers_.push_back(L);
  }

  void add_mlp(at::Tensor norm, int64_t w1, int64_t w3, int64_t w2) {
    TORCH_CHECK(!layers_.empty(), "add_mlp follows add_conv / add_attn");
    Layer& L = layers_.back();
    L.ffn_norm = norm.contiguous();
    L.w1 = static_cast<int>(w1);
    L.w3 = static_cast<int>(w3);
    L.w2 = static_cast<int>(w2);
    TORCH_CHECK(lins_.at(w1).N == lins_.at(w2).K && lins_.at(w3).N == lins_.at(w2).K && lins_.at(w2).N == D_,
                "MLP projections do not match");
  }

  // The last layer's feed-forward is a sigmoid-routed MoE (bfloat16 activations only): gate = router linear id,
  // gu / dn = per-expert linear ids, ebias float32 [E] or empty, top-k, normalization, routed scale.
  void add_moe(at::Tensor norm, int64_t gate, std::vector<int64_t> gu, std::vector<int64_t> dn, at::Tensor ebias,
               int64_t topk, bool norm_topk, double scale) {
    TORCH_CHECK(!layers_.empty(), "add_moe follows add_conv / add_attn");
    TORCH_CHECK(bf16_, "the fused MoE step runs bfloat16 activations only");
    Layer& L = layers_.back();
    const int64_t E = static_cast<int64_t>(gu.size());
    TORCH_CHECK(E > 0 && dn.size() == gu.size() && topk > 0 && topk <= std::min<int64_t>(E, 64) && lins_.at(gate).N == E &&
                    lins_.at(gate).K == D_,
                "MoE: router [E, D], E gate_up and E down linears, 0 < top-k <= E");
    L.moe = true;
    L.ffn_norm = norm.contiguous();
    L.gate = static_cast<int>(gate);
    for (int64_t e = 0; e < E; ++e) {
      const Lin &a = lins_.at(gu[e]), &b = lins_.at(dn[e]);
      TORCH_CHECK(a.K == D_ && a.N == 2 * b.K && b.N == D_ && a.kind == lins_.at(gu[0]).kind &&
                      a.gs == lins_.at(gu[0]).gs && b.kind == lins_.at(dn[0]).kind && b.gs == lins_.at(dn[0]).gs,
                  "MoE experts must be [2I, D] / [D, I], all of one kind");
      L.gu.push_back(static_cast<int>(gu[e]));
      L.dn.push_back(static_cast<int>(dn[e]));
    }
    if (ebias.defined() && ebias.numel()) {
      TORCH_CHECK(ebias.scalar_type() == at::kFloat && ebias.numel() == E, "expert bias: float32 [E]");
      L.ebias = ebias.contiguous();
    }
    L.topk = topk;
    L.norm_topk = norm_topk;
    L.rscale = static_cast<float>(scale);
    Imax_ = std::max(Imax_, lins_.at(dn[0]).K);
    kmax_ = std::max(kmax_, topk);
  }

  void set_sigmoid_table(at::Tensor t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 65536 && t.is_contiguous(), "sigmoid table: float32 [65536]");
    sigmoid_ = t;
  }

  // int4 linears with bfloat16 activations take the AMX kernel from this many rows (int4_linear's amx_min_rows:
  // the same rule as the general path, so both give the same bits)
  void set_amx_min_rows(int64_t n) { amx_min_ = n; }

  void set_silu_table(at::Tensor t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 65536 && t.is_contiguous(), "SiLU table: float32 [65536]");
    silu_ = t;
  }

  void set_head(at::Tensor norm, int64_t head) {
    final_norm_ = norm.contiguous();
    head_ = static_cast<int>(head);
    TORCH_CHECK(lins_.at(head).N == V_ && lins_.at(head).K == D_, "lm_head must be [vocab, hidden]");
  }

  // x [B, D] embedded tokens (activation dtype); positions, slots (KV slot of each token), conv_slots, snap_blocks
  // (-1: no conv snapshot) int64 [B]; block_tables int32 [B, mb]; lens int32 [B] (positions attended, the new one
  // included). Returns logits [B, vocab] in the activation dtype.
  at::Tensor step(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slots,
                  const at::Tensor& conv_slots, const at::Tensor& snap_blocks, const at::Tensor& block_tables,
                  const at::Tensor& lens) {
    TORCH_CHECK(head_ >= 0 && !layers_.empty() && (!bf16_ || silu_.defined()), "DecodePlan is incomplete");
    for (const Layer& L : layers_)
      TORCH_CHECK(L.moe ? sigmoid_.defined() : L.w1 >= 0, "DecodePlan: a layer without its feed-forward");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.is_contiguous() &&
                    x.scalar_type() == (bf16_ ? at::kBFloat16 : at::kFloat),
                "x must be a contiguous [B, hidden] tensor in the activation dtype");
    const int64_t B = x.size(0);
    for (const at::Tensor* t : {&positions, &slots, &conv_slots, &snap_blocks})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == B && t->is_contiguous(), "per-row indices: int64 [B]");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == B &&
                    block_tables.is_contiguous() && lens.scalar_type() == at::kInt && lens.numel() == B,
                "block_tables int32 [B, max_blocks], lens int32 [B]");
    const int64_t slots_n = conv_.size(1);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t cs = conv_slots.data_ptr<int64_t>()[b], sb = snap_blocks.data_ptr<int64_t>()[b];
      TORCH_CHECK(cs >= 0 && cs < slots_n, "conv slot out of range");
      TORCH_CHECK(sb < 0 || conv_.size(2) == 0 || (snap_.defined() && sb < snap_.size(1)),
                  "snapshot block out of range");
    }
    for (const Layer& L : layers_) {
      if (!L.attn) continue;
      const int64_t nb = L.kc.size(0), bs = L.kc.size(2), mb = block_tables.size(1);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = lens.data_ptr<int32_t>()[b], slot = slots.data_ptr<int64_t>()[b];
        TORCH_CHECK(len > 0 && len <= mb * bs && slot >= 0 && slot < nb * bs, "context length / KV slot out of range");
        for (int64_t j = 0; j < (len + bs - 1) / bs; ++j) {
          const int64_t p = block_tables.data_ptr<int32_t>()[b * mb + j];
          TORCH_CHECK(p >= 0 && p < nb, "block table entry out of range");
        }
      }
      break;  // every attention layer has the same pool geometry
    }
    // logits into a buffer kept between steps (a view of it is returned; the caller copies it to float32 at once):
    // a fresh [B, vocab] tensor each step is a new mapping whose pages fault in during the head GEMV
    if (!out_.defined() || out_.size(0) < B || out_.scalar_type() != x.scalar_type())
      out_ = at::empty({std::max<int64_t>(B, 16), V_}, x.options());
    at::Tensor out = out_.narrow(0, 0, B);
    if (B == 0) return out;
    if (bf16_) run<BFloat16>(x, positions, slots, conv_slots, snap_blocks, block_tables, lens, out);
    else run<float>(x, positions, slots, conv_slots, snap_blocks, block_tables, lens, out);
    return out;
  }

  // seconds spent (thread 0's view) in: GEMVs (weight streaming), attention, everything else; and steps run
  std::vector<double> timings() const { return {t_gemv_, t_attn_, t_other_, static_cast<double>(steps_)}; }
  void reset_timings() { t_gemv_ = t_attn_ = t_other_ = 0.0; steps_ = 0; }

 private:
  int64_t D_;
  float eps_;
  bool bf16_, a16_;
  at::Tensor inv_freq_, conv_, snap_;
  int64_t V_;
  int lanes_;
  at::Tensor silu_;  // bfloat16 activations: float32 [65536], SiLU of each bfloat16 bit pattern as torch rounds it
  at::Tensor sigmoid_;  // the same for sigmoid (MoE routers)
  int64_t Imax_ = 0, kmax_ = 0;
  std::vector<int64_t> sel_;  // MoE: [B, k] chosen experts
  std::vector<float> wsel_;   // [B, k] their weights (rounded as the general path's)
  std::vector<float> gu_, ys_, rl_;  // [B k, 2I] expert gate_up outputs, [B k, D] down outputs, [B, E] router
  std::vector<Lin> lins_;
  std::vector<Layer> layers_;
  at::Tensor final_norm_;
  int head_ = -1;
  int64_t Kmax_ = 0, Nmax_ = 0;
  // buffers, kept between steps
  Act a_, a_ff_, a_o_;
  at::Tensor out_;  // logits [rows, vocab], reused
  std::vector<float> x_, big_, g_, y_;
  std::vector<std::vector<float>> scratch_;
  std::vector<std::vector<uint8_t>> amx_scratch_;
  int64_t amx_min_ = kNoAmx;
  std::vector<std::vector<float>> attn_buf_;
  double t_gemv_ = 0, t_attn_ = 0, t_other_ = 0;
  int64_t steps_ = 0;

  // norm(src row) -> dst row: statistics in float32, normalized value rounded, times the weight, rounded
  template <typename TA>
  void rms_row(const float* src, const at::Tensor& w, float* dst, int64_t n) const {
    alignas(32) float sq[8192];  // n <= 8192: checked when the plan is built
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(src + i);
      _mm256_storeu_ps(sq + i, _mm256_mul_ps(v, v));
    }
    for (; i < n; ++i) sq[i] = src[i] * src[i];
    const float r = 1.0f / std::sqrt(aten_sum(sq, n, lanes_) / static_cast<float>(n) + eps_);
    const TA* wp = ptr<TA>(w);
    const __m256 vr = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, rnd8<TA>(_mm256_mul_ps(load8(wp + i), rnd8<TA>(_mm256_mul_ps(_mm256_loadu_ps(src + i), vr)))));
    for (; i < n; ++i) dst[i] = rnd<TA>(to_f(wp[i]) * rnd<TA>(src[i] * r));
  }

  // out = SiLU(g) * u over n values, rounded as the general path's `F.silu(g) * u` (bfloat16: torch's own SiLU of
  // every bfloat16 value, tabulated; float32: computed)
  template <typename TA>
  void silu_mul(const float* g, const float* u, float* out, int64_t n) const {
    int64_t i = 0;
    if constexpr (std::is_same_v<TA, BFloat16>) {
      const float* tab = silu_.data_ptr<float>();
      for (; i + 8 <= n; i += 8) {
        const __m256 a = rnd8_bf16(_mm256_loadu_ps(g + i));
        const __m256 sa = _mm256_i32gather_ps(tab, _mm256_srli_epi32(_mm256_castps_si256(a), 16), 4);
        _mm256_storeu_ps(out + i, rnd8_bf16(_mm256_mul_ps(sa, rnd8_bf16(_mm256_loadu_ps(u + i)))));
      }
      for (; i < n; ++i) {
        const float a = rnd<TA>(g[i]);
        uint32_t bits;
        std::memcpy(&bits, &a, 4);
        out[i] = rnd<TA>(tab[bits >> 16] * rnd<TA>(u[i]));
      }
    }
    for (; i < n; ++i) {
      const float a = rnd<TA>(g[i]);
      out[i] = rnd<TA>(rnd<TA>(a / (1.0f + std::exp(-a))) * rnd<TA>(u[i]));
    }
  }

  // x = x + y, both rounded to TA as the general path's residual add
  template <typename TA>
  static void residual(float* x, const float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(x + i, rnd8<TA>(_mm256_add_ps(_mm256_loadu_ps(x + i), rnd8<TA>(_mm256_loadu_ps(y + i)))));
    for (; i < n; ++i) x[i] = rnd<TA>(x[i] + rnd<TA>(y[i]));
  }

  // Preparing an input for the kinds of weight that read it, rows split between the threads: inside an
  // `omp single`, `begin` (a fresh input of M rows) or `again` (more kinds for the same input) and `want` per
  // linear (sizes the buffers, queues the kind); then all threads call `prep_pending(fn)`, which runs fn(m) (the
  // row's own values, e.g. its RMSNorm) and the queued preparations row by row (an omp for: a barrier at its end).
  Act* pend_act_ = nullptr;
  std::vector<const Lin*> pend_lins_;
  std::vector<std::vector<float>> xf_;  // per thread: one row as float

  void begin(Act& a, int64_t m, int64_t k) {
    a.reset(m, k);
    again(a);
  }

  void again(Act& a) {
    pend_act_ = &a;
    pend_lins_.clear();
  }

  void want(Act& a, const Lin& l) {
    if (a.has[l.kind] && (l.kind != kInt4 || a.gs4 == l.gs)) return;
    const int64_t M = a.M, K = a.K;
    a.has[l.kind] = true;
    if (l.kind == kBf16) {
      a.Kp16 = round_up(K, 16);
      a.xp.resize(static_cast<size_t>(M * a.Kp16));
    } else if (l.kind == kInt8) {
      if (!bf16_) return;  // float32 activations: read as they are
      prep_x8_alloc(M, K, a.x8);
    } else {
      a.gs4 = l.gs;
      if (bf16_) {
        prep_x4_alloc(M, K, l.gs, a16_, a.x4);
        a.amx = use_amx(a.x4, M, amx_min_);
        if (a.amx) prep_amx_alloc(a.x4, M, a.xa);
      } else {
        a.xsum.resize(static_cast<size_t>(M * (K / l.gs)));
      }
    }
    pend_lins_.push_back(&l);
  }

  template <typename F>
  void prep_pending(F&& fn) {
    Act& a = *pend_act_;
    const int64_t K = a.K;
    float* xf = xf_[omp_get_thread_num()].data();
#pragma omp for schedule(static)
    for (int64_t m = 0; m < a.M; ++m) {
      fn(m);
      for (const Lin* l : pend_lins_) {
        if (l->kind == kBf16) {
          prep_x(a.x.data() + m * K, 1, K, a.Kp16, a.xp.data() + m * a.Kp16);
        } else if (l->kind == kInt8) {
          prep_x8_rows(a.x.data(), m, m + 1, a.x8, xf);
        } else if (bf16_) {
          prep_x4_rows(a.x.data(), m, m + 1, a.x4, xf);
        } else {
          const int64_t gs = l->gs, G = K / gs;
          for (int64_t g = 0; g < G; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t k = 0; k < gs; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(a.x.data() + m * K + g * gs + k));
            a.xsum[m * G + g] = hsum(s);
          }
        }
      }
    }  // implicit barrier: every row is quantized
    bool tiles = false;  // an int4 input on AMX: its B tiles, built by units (see prep_amx_units)
    for (const Lin* l : pend_lins_) tiles = tiles || (l->kind == kInt4 && bf16_ && a.amx);
    if (tiles) {
      constexpr int64_t kUnits = 8;  // units per task
#pragma omp for schedule(static)
      for (int64_t u = 0; u < a.xa.U; u += kUnits) prep_amx_units(a.x4, a.M, u, std::min(a.xa.U, u + kUnits), a.xa);
    }
  }
  void prep_pending() {
    prep_pending([](int64_t) {});
  }

  // y = a @ W.T, the rows of W in chunks of kChunk claimed by whichever thread is free (an OpenMP dynamic loop,
  // no barrier at its end: the caller puts one after the GEMVs of a phase). Claimed, not pre-split: on a busy CPU a
  // thread the OS descheduled just claims fewer chunks instead of making the others wait at the barrier. Each
  // output row is still one thread's whole sum, so the result does not depend on who computed it.
  static constexpr int64_t kChunk = 64;

  template <typename TA, typename TO>
  void gemv(const Lin& l, const Act& a, TO* Y, int t, int /*T*/) {
    const int64_t nch = (l.N + kChunk - 1) / kChunk;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < nch; ++c) gemv_rows<TA>(l, a, Y, c * kChunk, std::min(l.N, (c + 1) * kChunk), t);
  }

  template <typename TA, typename TO>
  void gemv_rows(const Lin& l, const Act& a, TO* Y, int64_t n0, int64_t n1, int t) {
    float* buf = scratch_[t].data();
    const int64_t N = l.N, K = l.K;
    if (l.kind == kInt4 && bf16_ && a.amx)  // n0: a multiple of kChunk, so of 16
      return int4a8_amx(a.xa, a.M, K, l.gs, ptr<uint8_t>(l.w), ptr<TA>(l.s), ptr<TA>(l.z), Y, N, n0, n1,
                        amx_scratch_[t].data());
    by_row_tiles(a.M, n0, n1, [&](int64_t m0, auto mt, int64_t r0, int64_t r1) {
      constexpr int MT = decltype(mt)::value;
      if (l.kind == kBf16) {
        bf16_rows<MT>(a.xp.data(), K, a.Kp16, m0, ptr<uint16_t>(l.w), nullptr, Y, N, r0, r1);
      } else if (l.kind == kInt8) {
        if (bf16_) int8_rows<MT>(a.x8, m0, ptr<int8_t>(l.w), ptr<TA>(l.s), Y, N, r0, r1);
        else int8f_rows<MT>(a.x.data(), K, m0, ptr<int8_t>(l.w), ptr<TA>(l.s), Y, N, r0, r1);
      } else if (bf16_) {
        int4_rows<MT>(a.x4, a16_, l.gs, m0, ptr<uint8_t>(l.w), ptr<TA>(l.s), ptr<TA>(l.z), Y, N, r0, r1, buf);
      } else {
        int4f_rows<MT>(a.x.data(), a.xsum.data(), K, l.gs, m0, ptr<uint8_t>(l.w), ptr<TA>(l.s), ptr<TA>(l.z), Y, N,
                       r0, r1, buf);
      }
    });
  }

  // this thread's share of y = a[m] @ W.T (one activation row, a 1-row tile: the same arithmetic as in `gemv`)
  template <typename TA>
  void gemv_row(const Lin& l, const Act& a, int64_t m, float* y, int t, int /*T*/) {
    float* buf = scratch_[t].data();
    float* Y = y - m * l.N;  // the kernels write row m0 at Y + m0 * N
    const int64_t nch = (l.N + kChunk - 1) / kChunk;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t n0 = c * kChunk, n1 = std::min(l.N, n0 + kChunk);
      if (l.kind == kBf16) bf16_rows<1>(a.xp.data(), l.K, a.Kp16, m, ptr<uint16_t>(l.w), nullptr, Y, l.N, n0, n1);
      else if (l.kind == kInt8) int8_rows<1>(a.x8, m, ptr<int8_t>(l.w), ptr<TA>(l.s), Y, l.N, n0, n1);
      else int4_rows<1>(a.x4, a16_, l.gs, m, ptr<uint8_t>(l.w), ptr<TA>(l.s), ptr<TA>(l.z), Y, l.N, n0, n1, buf);
    }
  }


  // in decode.cpp
  template <typename TA>
  void moe_ffn(const Layer& L, int64_t B, int t, int T, double& tg);
  template <typename TA>
  void run(const at::Tensor& xin, const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& conv_slots,
           const at::Tensor& snap_blocks, const at::Tensor& block_tables, const at::Tensor& lens, at::Tensor& out);
};

}  // namespace
