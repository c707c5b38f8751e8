"""The whole LFM2 / LFM2-MoE network in one file: one definition for training and scoring (`forward`: padded or
packed [B, T] batches, no cache) and for the engine (`forward_step`: one flat batch of many sequences' new tokens,
whose attention and convolution read and write the engine's paged cache through a `StepContext`). Module and
parameter names equal the Hugging Face checkpoint's, so a state dict moves between us and transformers without
renaming (spec §3, §4). Nothing here knows about devices or kernels: the step context's backend does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Protocol

from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LfmConfig


class StepContext(Protocol):
    """What `forward_step` needs from the engine for one step: where each token sits, and the cache operations.

    The engine's model runner builds one per step (token positions, slot mapping, block tables, conv slots,
    cumulative sequence lengths) and picks the backend by device; the model calls these two methods, and uses a
    backend's fused versions of other steps when it has them (looked up by name, see the CUDA backend):
    `gated_short_conv(layer, in_proj_out, weight, bias)` = C * conv(B * x), `add_rms_norm(h, residual, norm)` =
    (norm(h + residual), h + residual), `qk_norm_rope(x, norm, rope)` = rope(norm(x))."""

    positions: torch.Tensor  # [N] each token's position in its own sequence

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k / v [N, KV, hd] in the cache; return causal attention of q [N, H, hd] over each sequence's own
        cached positions and its new ones: [N, H, hd]."""
        ...

    def short_conv(self, layer: int, bx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The causal depthwise conv of bx [N, D] (weight [D, L]) per sequence, starting from each sequence's conv
        state and storing the new state: [N, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32, scale in the model dtype: the reference's rounding, so bf16 logits agree too
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for NeoX (rotate-half) RoPE over the whole head, computed in float32. positions: [B or 1, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B or 1, T, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rope_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, hd]; cos/sin: [N, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class ShortConv(nn.Module):
    """The double-gated short convolution: B, C, x = in_proj(h); out_proj(C * causal_conv(B * x))."""

    def __init__(self, c: LfmConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.L = c.conv_L_cache
        self.in_proj = nn.Linear(d, 3 * d, bias=c.conv_bias)
        self.conv = nn.Conv1d(d, d, kernel_size=self.L, groups=d, bias=c.conv_bias, padding=self.L - 1)
        self.out_proj = nn.Linear(d, d, bias=c.conv_bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D]. mask [B, T] zeroes padded slots; positions [B, T] (packed documents, restarting at 0) keep
        the convolution inside each document."""
        T = h.shape[1]
        b, c, x = self.in_proj(h).chunk(3, dim=-1)
        u = b * x
        if mask is not None:  # zero padded slots before the conv, or they leak into the next L-1 real tokens
            u = torch.where(mask[..., None], u, torch.zeros((), dtype=u.dtype, device=u.device))
        u = u.transpose(1, 2)  # [B, D, T]
        w = self.conv.weight
        if positions is not None:
            # tap s reads the token s steps back, which is in the same document iff its position is >= s
            z = u * w[:, :, -1]
            for s in range(1, self.L):
                back = F.pad(u, (s, 0))[..., :T]
                z = z + torch.where((positions >= s)[:, None, :], back, 0.0) * w[:, :, -1 - s]
            if self.conv.bias is not None:
                z = z + self.conv.bias[:, None]
        else:
            z = self._taps(F.pad(u, (self.L - 1, 0)), T)
        return self.out_proj(c * z.transpose(1, 2))

    def forward_step(self, h: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
        """h [N, D], the new tokens of many sequences; their conv states live in the engine's cache."""
        bcx = self.in_proj(h)
        fused = getattr(ctx, "gated_short_conv", None)  # a backend may fuse B*x, the conv and C* in one kernel
        if fused is not None:
            return self.out_proj(fused(layer, bcx, self.conv.weight[:, 0], self.conv.bias))
        b, c, x = bcx.chunk(3, dim=-1)
        z = ctx.short_conv(layer, b * x, self.conv.weight[:, 0], self.conv.bias)
        return self.out_proj(c * z)

    def _taps(self, full: torch.Tensor, T: int) -> torch.Tensor:
        """The depthwise conv over [B, D, L-1+T] as L shifted products, accumulated in float32 and rounded once.

        What the conv kernel computes (same bits as the reference in bfloat16), without its per-channel calls for
        16-bit inputs on CPU, which made bfloat16 prefill and decode slow; in float32 it is faster than F.conv1d too.
        """
        f, w = full.float(), self.conv.weight[:, 0].float()
        z = f[..., :T] * w[:, :1]
        for j in range(1, self.L):
            z = z + f[..., j:j + T] * w[:, j:j + 1]
        if self.conv.bias is not None:
            z = z + self.conv.bias.float()[:, None]
        return z.to(full.dtype)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

    def __init__(self, c: LfmConfig) -> None:
        super().__init__()
        self.hd, self.nh, self.nkv = c.head_size, c.num_attention_heads, c.num_key_value_heads
        d = c.hidden_size
        self.q_proj = nn.Linear(d, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.out_proj = nn.Linear(self.nh * self.hd, d, bias=False)
        self.q_layernorm = RMSNorm(self.hd, c.norm_eps)
        self.k_layernorm = RMSNorm(self.hd, c.norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # fuse_projections(): [q; k; v], the three weights views of it

    def qkv(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Projections, per-head norms and RoPE: q [B, H, T, hd], k and v [B, KV, T, hd]."""
        B, T, _ = h.shape
        q = self.q_layernorm(self.q_proj(h).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(h).view(B, T, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, H, T, hd = q.shape
        if T == 1 and mask is None and H != self.nkv:
            # one query: a KV head's query heads as that head's queries, since SDPA's enable_gqa path is ~6x slower
            # on CPU for a single query (the engine's portable decode attention does the same)
            o = F.scaled_dot_product_attention(q.view(B, self.nkv, H // self.nkv, hd), k, v)
            return o.view(B, H, 1, hd)
        causal = mask is None and T > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.nh != self.nkv)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = h.shape
        q, k, v = self.qkv(h, rope)
        o = self.attend(q, k, v, mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def forward_step(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layer: int,
                     ctx: StepContext) -> torch.Tensor:
        """h [N, D], the new tokens of many sequences; keys and values of earlier tokens live in the engine's cache."""
        N = h.shape[0]
        if self.qkv_weight is not None:
            q, k, v = F.linear(h, self.qkv_weight).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
            q, k, v = q.view(N, self.nh, self.hd), k.view(N, self.nkv, self.hd), v.reshape(N, self.nkv, self.hd)
        else:
            q, k = self.q_proj(h).view(N, self.nh, self.hd), self.k_proj(h).view(N, self.nkv, self.hd)
            v = self.v_proj(h).view(N, self.nkv, self.hd)
        fused = getattr(ctx, "qk_norm_rope", None)  # a backend may fuse the head norm and RoPE in one kernel
        if fused is not None:
            q, k = fused(q, self.q_layernorm, rope), fused(k, self.k_layernorm, rope)
        else:
            q = apply_rope_flat(self.q_layernorm(q), *rope)
            k = apply_rope_flat(self.k_layernorm(k), *rope)
        o = ctx.attention(layer, q, k, v)
        return self.out_proj(o.reshape(N, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)
        self.w3 = nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)
        self.w13: torch.Tensor | None = None  # fuse_projections(): [w1; w3], the two weights views of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.w13 is not None:
            g, u = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(g) * u)
        h = F.silu(self.w1(x), inplace=True)  # inference: two [N, ff] activations live instead of four (same bits)
        return self.w2(h.mul_(self.w3(x)))


class Experts(nn.Module):
    """All experts' SwiGLU weights stacked (the transformers 5 layout): gate_up_proj [E, 2I, D], down_proj [E, D, I]."""

    def __init__(self, n: int, d: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, d))
        self.down_proj = nn.Parameter(torch.empty(n, d, inter))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D]; idx, weight [N, k]. Tokens are grouped by expert, one matmul per expert that was chosen."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        tok = order // k
        xs = x[tok]
        parts, s = [], 0
        for e, n in enumerate(counts):
            if n:
                g, u = F.linear(xs[s:s + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                parts.append(F.linear(F.silu(g) * u, self.down_proj[e]))
                s += n
        ys = torch.cat(parts) * weight.reshape(-1)[order, None]
        return x.new_zeros(x.shape).index_add(0, tok, ys.to(x.dtype))


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Sigmoid router; the fp32 expert bias only chooses experts, the weights are the unbiased scores."""

    def __init__(self, c: LfmConfig) -> None:
        super().__init__()
        self.k, self.norm_topk, self.scale = c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        self.expert_bias: torch.Tensor | None
        self.tokens_per_expert: torch.Tensor | None = None  # plain attributes, not state: see _account
        self.aux_loss_coef = 0.0
        self.aux_loss: torch.Tensor | None = None
        if c.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(c.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).sigmoid()
        if self.expert_bias is not None:
            idx = torch.topk(scores + self.expert_bias.float(), self.k, dim=-1).indices
            w = scores.gather(1, idx)
        else:
            w, idx = torch.topk(scores, self.k, dim=-1)
        if self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-6)
        return w * self.scale, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        if self.training and not _in_backward():  # activation checkpointing re-runs forward inside backward
            self._account(x, idx)
        return self.experts(x, idx, w).view(shape)

    def forward_step(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The engine's call: x [N, D]. A backend may run the experts its own way (`moe_experts`: grouped GEMMs
        on the GPU, no host sync); the routing is this module's either way."""
        grouped = getattr(ctx, "moe_experts", None)
        if grouped is None:
            return self(x)
        w, idx = self.route(x)
        return grouped(self.experts, x, idx, w)

    def _account(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """Training bookkeeping: tokens per expert since the last bias update, and the optional auxiliary loss."""
        E = self.gate.weight.shape[0]
        counts = torch.bincount(idx.reshape(-1), minlength=E).float()
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        if self.aux_loss_coef > 0:  # switch-style: E * sum_e (fraction of picks of e) * (mean normalised score of e)
            s = self.gate(x).sigmoid()
            p = (s / s.sum(-1, keepdim=True)).mean(0)
            self.aux_loss = self.aux_loss_coef * E * (counts / counts.sum() * p).sum()


class Block(nn.Module):
    def __init__(self, c: LfmConfig, i: int) -> None:
        super().__init__()
        self.is_attn = c.layer_types[i] == "full_attention"
        self.operator_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        if self.is_attn:
            self.self_attn = Attention(c)
        else:
            self.conv = ShortConv(c)
        if c.is_moe_layer(i):
            self.feed_forward: nn.Module = MoE(c)
        else:
            self.feed_forward = MLP(c.hidden_size, c.ff_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None,
                mask: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
        """One residual block. A module call (not inlined) so FSDP2 and activation checkpointing can wrap it."""
        h = self.operator_norm(x)
        if self.is_attn:
            h = self.self_attn(h, rope, attn_mask)
        else:
            h = self.conv(h, mask, positions)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x))

    def forward_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layer: int,
                     ctx: StepContext) -> torch.Tensor:
        add_norm = getattr(ctx, "add_rms_norm", None)  # a backend may fuse the residual add into the next norm
        h = self.operator_norm(x) if add_norm is None else add_norm(x, None, self.operator_norm)[0]
        if self.is_attn:
            h = self.self_attn.forward_step(h, rope, layer, ctx)
        else:
            h = self.conv.forward_step(h, layer, ctx)
        if add_norm is None:
            x = x + h
            n = self.ffn_norm(x)
        else:
            n, x = add_norm(h, x, self.ffn_norm)
        ff = self.feed_forward
        return x + (ff.forward_step(n, ctx) if isinstance(ff, MoE) else ff(n))


class LfmModel(nn.Module):
    def __init__(self, c: LfmConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.embedding_norm = RMSNorm(c.hidden_size, c.norm_eps)  # the *final* norm, despite its name


class LfmForCausalLM(nn.Module):
    """`model(input_ids) -> logits [B, T, vocab]` (training, scoring); `forward_step` is the engine's cached forward."""

    def __init__(self, config: LfmConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LfmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False  # recompute each block's activations in backward (training memory)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms are never quantized, unlike the embedding)."""
        return self.model.embedding_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embedding_norm.weight.device

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch and for tests: N(0, std) matrices, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("expert_bias"):
                b.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T]. attention_mask [B, T] (1 = token, 0 = left padding) is only needed for padded rows.
        logits_to_keep=n returns logits for the last n positions only.
        position_ids [B, T] marks packed documents for training: each restarts at 0, and neither attention nor the
        convolution crosses from one document into the next (spec section 3)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device=dev, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        doc_pos = None
        if position_ids is not None:
            if mask is not None:
                raise ValueError("position_ids (packed documents) and attention_mask (padding) do not combine")
            positions, attn_mask = position_ids.to(dev), self._document_mask(position_ids.to(dev))
            doc_pos = positions
        elif mask is not None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            idx = torch.arange(T, device=dev)
            # a padded query still sees itself, so no softmax row is empty (its output is never used)
            attn_mask = (((idx[None, :] <= idx[:, None]) & mask[:, None, :]) | (idx[None, :] == idx[:, None]))[:, None]
        else:
            positions, attn_mask = torch.arange(T, device=dev)[None], None
        rope = rope_cos_sin(positions, c.head_size, c.rope_theta, self.dtype)

        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, attn_mask, mask, doc_pos, use_reentrant=False)
            else:
                x = layer(x, rope, attn_mask, mask, doc_pos)
        return self.model.embedding_norm(x)

    def forward_step(self, input_ids: torch.Tensor, ctx: StepContext, logits_indices: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The engine's forward: input_ids [N] are the new tokens of many sequences, flattened (prefill chunks and
        single decode tokens alike); ctx says where each belongs. Returns logits [M, vocab] for the rows in
        logits_indices (the last token of each sequence that will sample, usually), or for every row."""
        c = self.config
        rope = rope_cos_sin(ctx.positions, c.head_size, c.rope_theta, self.dtype)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_step(x, rope, i, ctx)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.model.embedding_norm(x))

    @torch.no_grad()
    def fuse_projections(self) -> int:
        """Inference on a GPU: q/k/v and w1/w3 each from one GEMM (fewer, larger launches). The weights become views
        of the one matrix, so names, the state dict and memory are unchanged. Only plain float linears are fused
        (quantized modules keep their own kernels). Returns how many modules were fused."""
        n = 0
        for mod in self.modules():
            lins = ((mod.q_proj, mod.k_proj, mod.v_proj) if isinstance(mod, Attention)
                    else (mod.w1, mod.w3) if isinstance(mod, MLP) else ())
            if not lins or not all(type(x) is nn.Linear and x.bias is None for x in lins):
                continue
            w = torch.cat([x.weight for x in lins]).detach()
            row = 0
            for x in lins:
                x.weight = nn.Parameter(w[row:row + x.weight.shape[0]], requires_grad=False)
                row += x.weight.shape[0]
            if isinstance(mod, Attention):
                mod.qkv_weight = w
            else:
                mod.w13 = w
            n += 1
        return n

    @staticmethod
    def _document_mask(position_ids: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] causal attention that stays inside each document (a new one starts where position is 0)."""
        doc = (position_ids == 0).cumsum(-1)
        T = position_ids.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
        return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
