"""The Triton kernels (lfm/kernels/triton) against their PyTorch references, on random inputs.

Without CUDA the kernels run on CPU tensors through Triton's interpreter, so CI checks them before any GPU: the
interpreter is chosen when `triton.jit` decorates a kernel *and* when triton.language's own jit helpers (tl.max,
tl.sum) are decorated at `import triton`, so `TRITON_INTERPRET=1` must be set before triton is first imported in
the process (nothing else in the suite imports triton). With CUDA the same comparisons run compiled on the GPU, and
the interpreter cases are reported skipped (they ran in CI). Shapes stay tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from lfm.engine.backend import StepBatch, TorchBackend  # noqa: E402
from lfm.engine.cache import PagedCache  # noqa: E402
from lfm.kernels.triton.paged_attention import paged_decode_attention  # noqa: E402
from lfm.kernels.triton.rmsnorm import rms_norm  # noqa: E402
from lfm.kernels.triton.rope_qknorm import rope_qknorm  # noqa: E402
from lfm.kernels.triton.short_conv import short_conv  # noqa: E402
from lfm.kernels.triton.store_kv import store_kv  # noqa: E402
from lfm.model.lfm2 import RMSNorm, apply_rope_flat, rope_cos_sin  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
    pytestmark = pytest.mark.skip(reason=f"triton {triton.__version__}'s interpreter cannot run a loop whose bounds "
                                  "are loaded values (3.6 seen failing, 3.8 passing); `python -m "
                                  "lfm.kernels.triton.aot_check` still compiles the kernels")
BF16_CPU = "triton 3.9's interpreter gave wrong bfloat16 results on CPU (NaN): bfloat16 is checked on CUDA"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton interpreter not active (a CUDA run, or triton imported before this module)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="no CUDA")),
]


def _cache(KV: int, hd: int, bs: int, nb: int, kv_dtype: torch.dtype, dev: str) -> PagedCache:
    shape = (nb, KV, bs, hd)
    k = {0: torch.randn(shape, device=dev).to(kv_dtype)}  # garbage everywhere: only written slots may be read
    v = {0: torch.randn(shape, device=dev).to(kv_dtype)}
    ks = vs = {}
    if kv_dtype == torch.int8:
        ks, vs = {0: torch.rand(shape[:3], device=dev)}, {0: torch.rand(shape[:3], device=dev)}
    return PagedCache(k=k, v=v, conv=torch.zeros(1, 1, 2, 1, device=dev), conv_index={}, block_size=bs,
                      num_blocks=nb, k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
def test_store_kv_equals_cache_write(dev, kv_dtype):
    g = torch.Generator().manual_seed(1)
    ref, got = _cache(2, 24, 16, 5, kv_dtype, dev), _cache(2, 24, 16, 5, kv_dtype, dev)
    for d in ("k", "v", "k_scale", "v_scale"):  # same starting garbage
        for i, t in getattr(ref, d).items():
            getattr(got, d)[i].copy_(t)
    N = 9
    k, v = torch.randn(N, 2, 24, generator=g).to(dev), torch.randn(N, 2, 24, generator=g).to(dev)
    slots = torch.randperm(5 * 16, generator=g)[:N].to(dev)
    ref.write_kv(0, slots, k, v)
    store_kv(k, v, got.k[0], got.v[0], slots, got.k_scale.get(0), got.v_scale.get(0))
    assert torch.equal(got.k[0], ref.k[0]) and torch.equal(got.v[0], ref.v[0])  # untouched slots kept too
    if kv_dtype == torch.int8:
        assert torch.equal(got.k_scale[0], ref.k_scale[0]) and torch.equal(got.v_scale[0], ref.v_scale[0])


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("group,bs,kv_dtype,split", [
    (1, 16, torch.float32, 16), (2, 32, torch.float32, 1), (4, 16, torch.float32, 2), (4, 16, torch.int8, 2),
    (2, 16, torch.float16, 3), (2, 16, torch.float32, None)])
def test_paged_decode_attention_equals_torch_backend(dev, group, bs, kv_dtype, split):
    """Odd context lengths, scattered blocks, several splits per sequence (split = splits per launch: some
    sequences have fewer blocks than splits), a block table wider than any sequence needs (as CUDA graphs keep it)."""
    g = torch.Generator().manual_seed(group * 100 + bs)
    KV, hd = 2, 24
    H = KV * group
    lens = [1, bs + 3, 3 * bs - 1, 5]
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 3
    cache = _cache(KV, hd, bs, nb, kv_dtype, dev)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need) + 2, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    for s, n in enumerate(lens):  # write every position each sequence will read
        p = torch.arange(n)
        slots = tables[s].long()[p // bs] * bs + p % bs
        cache.write_kv(0, slots.to(dev), torch.randn(n, KV, hd, generator=g).to(dev),
                       torch.randn(n, KV, hd, generator=g).to(dev))
    q = torch.randn(len(lens), H, hd, generator=g).to(dev)
    be = TorchBackend(cache, H, hd)
    be.batch = StepBatch(positions=None, slot_mapping=None, query_start=[], context_lens=lens, num_decodes=len(lens),
                         block_tables=tables.to(dev), decode_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                         prefill_blocks=[], conv_slots=None, conv_taps=None, conv_state_rows=None, snap_rows=None,
                         snap_blocks=None, conv_zero=None, conv_restore=None)
    want = be.decode_attention(0, q)
    got = paged_decode_attention(q, cache.k[0], cache.v[0], tables.to(dev), be.batch.decode_lens, be.scale,
                                 cache.k_scale.get(0), cache.v_scale.get(0), num_splits=split)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _conv_reference(u, w, bias, state, qs, slots):
    """Per sequence: cat(its state, its inputs) convolved; the new state = the last L-1 rows of that."""
    L = w.shape[1]
    out, new = torch.empty_like(u), state.clone()
    for s in range(len(slots)):
        a, e = qs[s], qs[s + 1]
        full = torch.cat([state[slots[s]], u[a:e]]).float()
        z = sum(full[j:j + e - a] * w[:, j].float() for j in range(L))
        if bias is not None:
            z = z + bias.float()
        out[a:e] = z.to(u.dtype)
        new[slots[s]] = full[-(L - 1):].to(state.dtype)
    return out, new


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("L", [3, 4])
def test_short_conv_varlen_equals_reference(dev, gated, L):
    """Packed sequences of lengths 1 (decode), 1 (shorter than the state), 7, 2; one slot reused twice in a row
    (state written by step 1, read by step 2); D not a multiple of the channel block."""
    g = torch.Generator().manual_seed(L + 10 * gated)
    D, num_slots = 70, 6
    w, bias = torch.randn(D, L, generator=g).to(dev), torch.randn(D, generator=g).to(dev)
    state = torch.randn(num_slots, L - 1, D, generator=g).to(dev)
    ref_state = state.clone()
    for step, (lens, slots) in enumerate([([1, 1, 7, 2], [4, 0, 2, 5]), ([1, 3, 1], [2, 4, 5])]):
        qs = [0]
        for n in lens:
            qs.append(qs[-1] + n)
        x = torch.randn(qs[-1], 3 * D if gated else D, generator=g).to(dev)
        bb, cc, xx = x.chunk(3, dim=-1) if gated else (None, None, x)
        u = bb * xx if gated else x
        want, ref_state = _conv_reference(u, w, bias if step else None, ref_state, qs, slots)
        if gated:
            want = cc * want
        got = short_conv(x, w, bias if step else None, state, torch.tensor(qs, device=dev),
                         torch.tensor(slots, device=dev), gated=gated, block_d=32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, ref_state, atol=0, rtol=0)  # untouched slots too


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_equals_model(dev, residual, dtype):
    if dtype == torch.bfloat16 and dev == "cpu":
        pytest.skip(BF16_CPU)
    g = torch.Generator().manual_seed(3)
    D = 48
    norm = RMSNorm(D, 1e-5).to(dev)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    norm = norm.to(dtype)
    x = torch.randn(5, D, generator=g).to(dev, dtype)
    r = torch.randn(5, D, generator=g).to(dev, dtype)
    x0, r0 = x.clone(), r.clone()
    got = rms_norm(x, norm.weight.detach(), 1e-5, r if residual else None)
    s = x + r if residual else x
    with torch.no_grad():
        want = norm(s)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if residual:
        got, total = got
        assert torch.equal(total, s)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_qknorm_equals_model(dev, dtype):
    if dtype == torch.bfloat16 and dev == "cpu":
        pytest.skip(BF16_CPU)
    g = torch.Generator().manual_seed(4)
    N, H, hd = 6, 3, 20
    norm = RMSNorm(hd, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hd, generator=g))
    norm = norm.to(dev, dtype)
    x = torch.randn(N, H, hd, generator=g).to(dev, dtype)
    pos = torch.tensor([0, 1, 2, 7, 300, 4099], device=dev)
    cos, sin = rope_cos_sin(pos, hd, 1e6, dtype)
    with torch.no_grad():
        want = apply_rope_flat(norm(x), cos, sin)
    got = rope_qknorm(x, norm.weight.detach(), cos, sin, 1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("counts", [[5, 0, 70, 1], [0, 0, 0, 3], [64, 64]])
def test_grouped_gemm_equals_per_group_matmul(dev, counts):
    """Groups of odd sizes, empty groups (first, middle, several), a group spanning tiles, K and N not multiples of
    the blocks; float32 (IEEE products) on CPU, and float32 + bfloat16 compiled on CUDA."""
    from lfm.kernels.triton.grouped_gemm import grouped_gemm

    g = torch.Generator().manual_seed(sum(counts))
    E, N, K = len(counts), 72, 40
    M = sum(counts)
    x = torch.randn(M, K, generator=g).to(dev)
    w = torch.randn(E, N, K, generator=g).to(dev)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(dev)
    dtypes = [torch.float32] + ([torch.bfloat16] if dev == "cuda" else [])
    for dt in dtypes:
        got = grouped_gemm(x.to(dt), w.to(dt), offs)
        start, want = 0, torch.empty(M, N, device=dev)
        for e, n in enumerate(counts):
            want[start:start + n] = x[start:start + n].to(dt).float() @ w[e].to(dt).float().T
            start += n
        tol = 1e-4 if dt == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dev", DEVICES)
def test_grouped_experts_through_the_triton_gemm_equal_the_per_expert_loop(dev):
    """The CUDA backend's MoE path where torch._grouped_mm does not run: the router's picks through grouped_gemm =
    Experts.forward (float32)."""
    from .conftest import MOE, random_model

    from lfm.engine.grouped_moe import grouped_experts
    from lfm.kernels.triton.grouped_gemm import grouped_gemm

    moe = random_model(MOE).model.layers[1].feed_forward.to(dev)
    x = torch.randn(23, 64, generator=torch.Generator().manual_seed(2)).to(dev)
    w, idx = moe.route(x)
    torch.testing.assert_close(grouped_experts(moe.experts, x, idx, w, mm=grouped_gemm), moe.experts(x, idx, w),
                               atol=1e-4, rtol=1e-4)


def _llm(model, backend_cls, **kw):
    from lfm import LLM

    llm = LLM(model, block_size=16, kv_cache_memory=8 << 20, max_num_batched_tokens=24, **kw)
    r = llm.engine.runner
    if backend_cls is not None:
        r.backend = backend_cls(r.cache, model.config.num_attention_heads, model.config.head_size)
    return llm


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kv", [None, "int8"])
def test_engine_with_triton_backend_equals_torch_backend(dev, kv):
    """The whole engine, TritonBackend (interpreted on CPU, compiled on CUDA) vs TorchBackend: batched prompts of odd
    lengths split into prefill chunks next to decodes (24 tokens a step), two prompts sharing 32 tokens (prefix-cache
    hit: conv snapshot written, then restored), GQA 2 and a kernel-4 conv; same greedy tokens, logits within float
    rounding."""
    from .conftest import DENSE, random_model
    from .engine_util import capture

    from lfm import SamplingParams
    from lfm.engine.triton_backend import TritonBackend

    model = random_model(dict(DENSE, conv_L_cache=4, num_hidden_layers=3, layer_types=["conv", "full_attention",
                                                                                         "conv"])).to(dev)
    if dev == "cuda":  # what LLM(device="cuda") serves with
        assert type(_llm(model, None, kv_cache_dtype=kv).engine.runner.backend) is TritonBackend
    shared = list(range(40, 72))
    prompts = [shared + [5, 9, 11], [3, 4, 5], list(range(100, 137)), shared + [200]]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs, recs = [], []
    for cls in (TorchBackend, TritonBackend):
        llm = _llm(model, cls, kv_cache_dtype=kv)
        rec = capture(llm)
        seen = {"snapshot": 0, "restore": 0, "mixed": 0}
        begin = llm.engine.runner.backend.begin

        def watch(batch, begin=begin, seen=seen):
            seen["snapshot"] += batch.snap_rows is not None
            seen["restore"] += batch.conv_restore is not None
            seen["mixed"] += 0 < batch.num_decodes < len(batch.context_lens)
            begin(batch)

        llm.engine.runner.backend.begin = watch
        first = llm.generate(prompts[:3], sp)
        second = llm.generate(prompts[3:], sp)  # its first 32 tokens come from the prefix cache
        outs.append([o.token_ids for o in first + second])
        recs.append(dict((tuple(t), lg) for t, lg in rec))
        assert all(seen.values()), seen  # the paths named above were exercised
    assert outs[0] == outs[1]
    assert recs[0].keys() == recs[1].keys()
    for key, lg in recs[0].items():
        torch.testing.assert_close(recs[1][key], lg, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", ["dense", "moe"])
def test_static_decode_steps_with_triton_backend_equal_torch_backend(cfg):
    """The CUDA-graph decode path's static buffers (cuda_graph.py, eager here: interpreted kernels on CPU, captured
    graphs on CUDA) through TritonBackend: the bound query_start, padded rows into the scratch block and slot, the
    grouped experts (float32: torch's on CPU, the Triton grouped GEMM on CUDA); same greedy tokens and logits as the
    plain TorchBackend engine."""
    from .conftest import DENSE, MOE, random_model
    from .engine_util import capture

    from lfm import SamplingParams
    from lfm.engine.triton_backend import TritonBackend

    dev = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
    model = random_model(dict(DENSE, num_hidden_layers=2, layer_types=["conv", "full_attention"]) if cfg == "dense"
                         else dict(MOE, num_hidden_layers=2, layer_types=["conv", "full_attention"])).to(dev)
    prompts = [list(range(40, 57)), [3, 4, 5], list(range(100, 109))]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs, recs = [], []
    for cls in (TorchBackend, TritonBackend):
        llm = _llm(model, cls, max_num_seqs=3)
        if cls is TritonBackend:
            r = llm.engine.runner
            assert r.enable_decode_graphs(3, llm.engine.max_model_len, capture=dev == "cuda")
            calls = []
            run = r.graphs.run
            r.graphs.run = lambda sch, run=run: calls.append(len(sch)) or run(sch)
        rec = capture(llm)
        outs.append([o.token_ids for o in llm.generate(prompts, sp)])
        recs.append(dict((tuple(t), lg) for t, lg in rec))
    assert 3 in calls and any(n < 3 for n in calls), calls  # full and padded (bucket 4 / 2) static steps
    assert outs[0] == outs[1]
    for key, lg in recs[0].items():
        torch.testing.assert_close(recs[1][key], lg, atol=1e-4, rtol=1e-4)


# aten ops that make the host wait for the device (a scalar or a data-dependent shape read back) or copy host data in:
# inside a CUDA graph capture each one is an error ("operation not permitted when stream is capturing")
_HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.unique",
                  "aten._unique", "aten.repeat_interleave.Tensor", "aten.equal", "aten.is_nonzero", "aten.lift_fresh",
                  "aten.allclose", "aten.histc")


@pytest.mark.skipif(not INTERPRETED, reason="CPU audit; on CUDA test_cuda_graph's capture is the check")
@pytest.mark.parametrize("cfg", ["dense", "moe"])
def test_static_decode_forward_never_waits_for_the_host(cfg, monkeypatch):
    """What a CUDA graph captures (`DecodeGraphs._forward`: the TritonBackend decode step) run on CPU under a dispatch
    mode that records every aten op, plus `.tolist()` / `.numpy()` called from lfm's code: none of them may read device
    data back to the host (item, bool, nonzero, bincount, boolean-mask indexing, ...) or build a tensor from host
    data (torch.tensor). On a GPU such an op breaks capture at engine start; here it fails before any GPU sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .conftest import DENSE, MOE, random_model

    from lfm import SamplingParams
    from lfm.engine.triton_backend import TritonBackend

    lfm_dir = os.path.dirname(sys.modules["lfm"].__file__)
    seen: list[str] = []
    recording = False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            bool_index = name.startswith("aten.index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
                for i in a)
            if name.startswith(_HOST_SYNC_OPS) or bool_index:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    for meth in ("tolist", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _name=meth, **k):
            if sys._getframe(1).f_code.co_filename.startswith(lfm_dir) and recording:
                seen.append(f"Tensor.{_name}")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, spy)

    base = DENSE if cfg == "dense" else MOE
    model = random_model(dict(base, num_hidden_layers=2, layer_types=["conv", "full_attention"]))
    llm = _llm(model, TritonBackend, max_num_seqs=3)
    graphs = llm.engine.runner
    assert graphs.enable_decode_graphs(3, llm.engine.max_model_len, capture=False)
    forward, steps = graphs.graphs._forward, []

    def audited(b):
        nonlocal recording
        recording = True
        try:
            with Record():
                out = forward(b)
        finally:
            recording = False
        steps.append(b)
        return out
    graphs.graphs._forward = audited
    llm.generate([list(range(40, 57)), [3, 4, 5], [9]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert steps, "no decode step went through the static path"
    assert not seen, sorted(set(seen))

    # the audit itself can fail: the per-expert loop of Experts.forward reads counts back to the host
    if cfg == "moe":
        moe = next(m for m in model.modules() if hasattr(m, "experts"))
        x, idx, w = torch.randn(3, model.config.hidden_size), torch.tensor([[0, 1], [1, 2], [0, 2]]), torch.rand(3, 2)
        with Record():
            moe.experts(x, idx, w)
        assert "aten.bincount.default" in seen, seen  # bincount sizes its output from the data


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="no CUDA (" + BF16_CPU + ")")
def test_engine_bfloat16_on_cuda_close_to_torch_backend():
    """The serving dtype: bfloat16 engine on CUDA, TritonBackend vs TorchBackend, both made to follow the same tokens
    (bfloat16 rounding may part near-tied greedy picks); every sampled row's logits agree to bfloat16 precision."""
    from .conftest import DENSE, random_model
    from .engine_util import capture, scripted

    from lfm import SamplingParams
    from lfm.engine.triton_backend import TritonBackend

    model = random_model(dict(DENSE, num_key_value_heads=1)).to("cuda", torch.bfloat16)
    prompts = [list(range(40, 75)), [3, 4, 5], list(range(100, 120))]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = _llm(model, TorchBackend)
    rec_ref = capture(ref)
    follow = {tuple(p): o.token_ids for p, o in zip(prompts, ref.generate(prompts, sp))}
    tri = _llm(model, TritonBackend)
    rec = capture(tri, force=scripted(follow))
    tri.generate(prompts, sp)
    want = {tuple(t): lg for t, lg in rec_ref}
    assert len(rec) == len(want) == 3 * 8
    for t, lg in rec:
        w = want[tuple(t)]
        assert ((lg - w).abs().max() / w.abs().max()).item() < 3e-2


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects (and the reverse): compile every variant the backend launches
    to sm_90 PTX in a fresh process without the interpreter (ptxas ships in the triton wheel)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its current default
    r = subprocess.run([sys.executable, "-m", "lfm.kernels.triton.aot_check", "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok ") == 25, r.stdout  # 12 variants (see aot_check.variants) x bfloat16, float16 + 1
