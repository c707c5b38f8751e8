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
    at::Tensor out = at::empty({B, V_}, x.options());
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
          if (a.amx) prep_amx_rows(a.x4, m, m + 1, a.xa);
        } else {
          const int64_t gs = l->gs, G = K / gs;
          for (int64_t g = 0; g < G; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t k = 0; k < gs; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(a.x.data() + m * K + g * gs + k));
            a.xsum[m * G + g] = hsum(s);
          }
        }
      }
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

  // The MoE feed-forward of a layer (inside the parallel region; a_ holds the normalized rows, prepared for the
  // router). Mirrors lfm2.MoE.route + QuantExperts.forward: one token combines its k experts in one float sum
  // (its bfloat16 [1, k] @ [k, D] matmul), more tokens add each expert's weighted output in expert order (index_add).
  template <typename TA>
  void moe_ffn(const Layer& L, int64_t B, int t, int T, double& tg) {
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
  void run(const at::Tensor& xin, const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& conv_slots,
           const at::Tensor& snap_blocks, const at::Tensor& block_tables, const at::Tensor& lens, at::Tensor& out) {
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
};

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
