"""Weight-only quantization as module swaps (the gpt-fast way): the network code never changes, a `nn.Linear` is
replaced by an `Int8Linear` (per-output-channel scales) or an `Int4Linear` (asymmetric, group-wise), the token
embedding by a `QuantEmbedding` that dequantizes only the rows it looks up, and a MoE layer's stacked `Experts` by
`QuantExperts` (each expert's matrices in the same int4 / int8 layouts, stacked; only the chosen experts run).

Storage is portable (int8 values; int4 as two nibbles per byte), so a quantized checkpoint is plain safetensors; the
CPU kernel's packed int4 layout is derived at load time. Matmuls use PyTorch's CPU weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which accept float32, bfloat16 and float16 activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as _kernels  # lfm.kernels: AVX2 GEMV for decode-sized batches (None = use the torch op)
from .lfm2 import Experts

GROUP_SIZES = (32, 64, 128)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: w ≈ (q - 8) * scale + zero, q in 0..15, one (scale, zero) per `group` inputs."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.uint8).reshape(N, K)
    zero = lo + 8 * scale
    return q, scale.squeeze(-1), zero.squeeze(-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.weight.dtype)
        q, s = quantize_int8(lin.weight.data)
        m.weight, m.scales = q, s.to(lin.weight.dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # --- lfm.kernels dispatch (big bfloat16 batches: dequantized + native bf16 matmul, where the CPU has one) ---
        y = _kernels.dequant_linear(x, self.weight, self.scales)
        if y is None:
            y = _kernels.int8_linear(x, self.weight, self.scales)
        if y is not None:
            return y
        # --- end lfm.kernels dispatch ---
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales).view(*shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int = 64, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide the input width {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=dtype))
        self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=dtype))
        self._packed: torch.Tensor | None = None
        self._sz: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, group_size, lin.weight.dtype)
        q, s, z = quantize_int4(lin.weight.data, group_size)
        m.qweight, m.scales, m.zeros = pack_nibbles(q), s.to(lin.weight.dtype), z.to(lin.weight.dtype)
        return m

    def prepare(self) -> None:
        """Derive the kernel's packed layout from the portable storage (after loading or quantizing)."""
        q = unpack_nibbles(self.qweight).to(torch.int32)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # --- lfm.kernels dispatch (reads qweight / scales / zeros as stored; big bfloat16 batches: dequantized +
        # native bf16 matmul, where the CPU has one) ---
        y = _kernels.dequant_linear(x, self.qweight, self.scales, self.zeros, self.group_size)
        if y is None:
            y = _kernels.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size)
        if y is not None:
            return y
        # --- end lfm.kernels dispatch ---
        if self._packed is None:
            self.prepare()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self._packed, self.group_size, self._sz)
        return y.view(*shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        q = unpack_nibbles(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)


class QuantEmbedding(nn.Module):
    """Token embedding kept as int8 rows + a scale per row; a lookup dequantizes only the rows it needs."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num, dtype=dtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype)
        q, s = quantize_int8(emb.weight.data)
        m.weight, m.scales = q, s.to(emb.weight.dtype)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids][..., None]


class QuantStack(nn.Module):
    """E stacked [N, K] matrices (one per expert), each quantized as an Int4Linear (`qweight` [E, N, K/2], `scales` /
    `zeros` [E, N, K/group]) or, where the group does not divide K or bits = 8, an Int8Linear (`weight` [E, N, K],
    `scales` [E, N]). `mm(x, e)` multiplies by expert e's slice in place: the kernels read the slice as it is."""

    def __init__(self, n: int, out_features: int, in_features: int, bits: int, group_size: int = 64,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bits = 4 if bits == 4 and in_features % group_size == 0 else 8
        if self.bits == 4:
            self.register_buffer("qweight", torch.zeros(n, out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(n, out_features, in_features // group_size, dtype=dtype))
            self.register_buffer("zeros", torch.zeros(n, out_features, in_features // group_size, dtype=dtype))
        else:
            self.register_buffer("weight", torch.zeros(n, out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(n, out_features, dtype=dtype))
        self._names = ("qweight", "scales", "zeros") if self.bits == 4 else ("weight", "scales")
        self._views: list[tuple[torch.Tensor, ...]] | None = None

    def _expert(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's (weight, scales[, zeros]) views, made once (a decode step asks for 8 per layer: indexing the
        stacks each time costs more than the kernel call's own overhead). Assigning or moving a stack drops them;
        loading into the stacks in place keeps them valid."""
        v = self._views
        if v is None:
            b = self._buffers
            v = self._views = [tuple(b[n][i] for n in self._names) for i in range(b["scales"].shape[0])]
        return v[e]

    def __setattr__(self, name: str, value) -> None:
        if name in ("qweight", "weight", "scales", "zeros"):
            self.__dict__["_views"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):  # .to(), to_empty(): new stacks
        self._views = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return dict(super().__getstate__(), _views=None)

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int) -> QuantStack:
        """Quantize [E, N, K] one expert at a time (no float copy of the whole stack)."""
        m = cls(w.shape[0], w.shape[1], w.shape[2], bits, group_size, w.dtype)
        for e in range(w.shape[0]):
            if m.bits == 4:
                q, s, z = quantize_int4(w[e], group_size)
                m.qweight[e], m.scales[e], m.zeros[e] = pack_nibbles(q), s, z
            else:
                m.weight[e], m.scales[e] = quantize_int8(w[e])
        return m

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [M, K] @ W_e.T -> [M, N] in the scales' dtype (as Int4Linear / Int8Linear)."""
        if self.bits == 4:
            w, s, z = self._expert(e)
            y = _kernels.int4_linear(x, w, s, z, self.group_size, _kernels.AMX_EXPERT_MIN_ROWS)
            if y is not None:
                return y
            # no packed copy is kept for the torch op (it would double the experts' memory): dequantize this expert
            return F.linear(x.float(), self.dequantize(e)).to(s.dtype)
        w, s = self._expert(e)
        y = _kernels.int8_linear(x, w, s)
        if y is not None:
            return y
        x2 = x.to(s.dtype) if x.dtype != s.dtype else x
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w, s)

    def dequantize(self, e: int | None = None) -> torch.Tensor:
        """Float32 weights of expert e [N, K], or of all experts [E, N, K]."""
        if e is None:
            return torch.stack([self.dequantize(i) for i in range(self.scales.shape[0])])
        if self.bits == 8:
            return self.weight[e].float() * self.scales[e].float()[:, None]
        q = unpack_nibbles(self.qweight[e]).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales[e].float()[..., None] + self.zeros[e].float()[..., None]
        return w.reshape(self.out_features, self.in_features)


class QuantExperts(nn.Module):
    """`Experts` with quantized weights: `gate_up` [E, 2I, D] and `down` [E, D, I] as QuantStacks. Same forward: only
    the chosen experts are computed; one token (batch-1 decode) runs its k experts directly, more tokens are grouped
    by expert (one multiplication per chosen expert)."""

    def __init__(self, n: int, d: int, inter: int, bits: int, group_size: int = 64,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts = n
        self.gate_up = QuantStack(n, 2 * inter, d, bits, group_size, dtype)
        self.down = QuantStack(n, d, inter, bits, group_size, dtype)

    @classmethod
    def from_experts(cls, ex: Experts, bits: int, group_size: int) -> QuantExperts:
        E, I2, D = ex.gate_up_proj.shape
        m = cls(0, D, I2 // 2, bits, group_size, ex.gate_up_proj.dtype)  # empty stacks, replaced:
        m.num_experts = E
        m.gate_up = QuantStack.from_float(ex.gate_up_proj.data, bits, group_size)
        m.down = QuantStack.from_float(ex.down_proj.data, bits, group_size)
        return m

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's SwiGLU of x [M, D]."""
        g, u = self.gate_up.mm(x, e).chunk(2, dim=-1)
        return self.down.mm(F.silu(g) * u, e)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D]; idx, weight [N, k] (as Experts.forward)."""
        N, k = idx.shape
        if N == 1:  # one token: its k experts, with the SwiGLU glue done once over the k rows
            ids = idx[0].tolist()
            g, u = torch.cat([self.gate_up.mm(x, e) for e in ids]).chunk(2, dim=-1)
            h = F.silu(g) * u  # [k, I]
            ys = torch.cat([self.down.mm(h[j:j + 1], e) for j, e in enumerate(ids)])  # [k, D]
            return (weight.to(ys.dtype) @ ys).to(x.dtype)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok = order // k
        xs = x[tok]
        parts, s = [], 0
        for e, n in enumerate(counts):
            if n:
                parts.append(self.expert(xs[s:s + n], e))
                s += n
        ys = torch.cat(parts) * weight.reshape(-1)[order, None]
        return x.new_zeros(x.shape).index_add(0, tok, ys.to(x.dtype))

    def dequantize(self) -> Experts:
        """A float `Experts` holding the dequantized weights (float32), for references."""
        gu, dn = self.gate_up.dequantize(), self.down.dequantize()
        ex = Experts(gu.shape[0], gu.shape[2], dn.shape[2])
        ex.gate_up_proj.data, ex.down_proj.data = gu, dn
        return ex


def _linear_names(model: nn.Module) -> list[str]:
    """Every Linear that holds weights worth quantizing: projections, FFNs and the LM head (not the MoE router,
    whose few outputs decide routing and cost nothing)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("feed_forward.gate")]


def _expert_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Experts)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, progress: bool = False) -> nn.Module:
    """Swap linears, MoE experts and the embedding for quantized modules in place (not the MoE router, whose few
    outputs decide routing); the tied head gets its own quantized copy."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if model.model.embedding_norm.weight.device.type != "cpu":
        raise ValueError("weight-only int8/int4 uses PyTorch's CPU kernels: quantize a model on device='cpu'")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    from tqdm import tqdm

    linears, experts = _linear_names(model), _expert_names(model)
    # one bar over every weight matrix swapped: linears, then (MoE only) each layer's stacked experts
    bar = tqdm(total=len(linears) + len(experts), desc=f"quantizing to int{bits}", unit=" weights",
               disable=not progress)
    for name in linears:
        lin = model.get_submodule(name)
        if bits == 4 and lin.in_features % group_size == 0:
            _swap(model, name, Int4Linear.from_linear(lin, group_size))
        else:  # a width the group size does not divide stays usable at 8 bits
            _swap(model, name, Int8Linear.from_linear(lin))
        bar.update()
    for name in experts:
        bar.set_postfix_str("experts")
        _swap(model, name, QuantExperts.from_experts(model.get_submodule(name), bits, group_size))
        bar.update()
    bar.close()
    emb = model.model.embed_tokens
    model.model.embed_tokens = QuantEmbedding.from_embedding(emb)
    model.config.extra["quantization_config"] = {"quant_method": "lfm", "bits": bits, "group_size": group_size}
    return model


def quantized_skeleton(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """The same swaps with empty modules (on whatever device the model is on, meta included), for loading."""
    dtype = model.model.embed_tokens.weight.dtype
    for name in _linear_names(model):
        lin = model.get_submodule(name)
        if bits == 4 and lin.in_features % group_size == 0:
            new: nn.Module = Int4Linear(lin.in_features, lin.out_features, group_size, dtype)
        else:
            new = Int8Linear(lin.in_features, lin.out_features, dtype)
        _swap(model, name, new)
    for name in _expert_names(model):
        E, I2, D = model.get_submodule(name).gate_up_proj.shape
        _swap(model, name, QuantExperts(E, D, I2 // 2, bits, group_size, dtype))
    e = model.model.embed_tokens
    model.model.embed_tokens = QuantEmbedding(e.num_embeddings, e.embedding_dim, dtype)
    return model


def prepare(model: nn.Module) -> None:
    """Build PyTorch's packed int4 layout up front, where lfm.kernels are unavailable (they read the portable storage
    as it is: building it anyway would hold a second copy, ~75% of the int4 weights). Else Int4Linear builds it on
    first use of the fallback (more rows than kernels.MAX_ROWS)."""
    if _kernels.available():
        return
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.prepare()
