"""lfm.kernels: the AVX2 GEMV kernels equal the layers' dequantized weights, the fallback gives the same results, and
every way of not having the kernels degrades to PyTorch's ops with one warning.

Where the extension cannot be built the kernel tests skip (with the reason), except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from lfm import kernels
from lfm.kernels import build
from lfm.model.quant import Int4Linear, Int8Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_grad_enabled(False)

# max |kernel - x @ dequantized.T| / max |x @ dequantized.T|: float32 activations are multiplied in float; bfloat16
# ones are quantized (int8 weights: to int16; int4 weights: to int8, about bfloat16's own rounding) and the output
# is rounded to bfloat16 (2^-9 relative)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}


@pytest.fixture(scope="module")
def ext():
    """The built extension, whatever LFM_KERNELS says (the tests of the fallback set it themselves)."""
    ok, why = build.cpu_supported()
    reason = f"the AVX2 kernels cannot run here: {why}"
    if ok:
        try:
            return build.compile_and_load()
        except Exception as e:  # noqa: BLE001
            reason = f"the AVX2 kernels cannot be built here: {e}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def on(ext, monkeypatch):
    """Dispatch to the built extension in this process (even under LFM_KERNELS=0)."""
    monkeypatch.setattr(kernels, "_ext", ext)
    monkeypatch.setattr(kernels, "_tried", True)
    monkeypatch.setattr(kernels, "_enabled", True)
    return ext


def layer(kind: str, k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    lin = lin.to(dtype)
    return Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, int(kind.split("-")[1]))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item() / want.abs().max().item()


# (kind, K, N): K not a multiple of 64 wherever the format allows (int8: any K; int4: a multiple of the group)
SHAPES = [("int8", 256, 96), ("int8", 100, 37), ("int8", 200, 24), ("int8", 7, 5),
          ("int4-32", 256, 96), ("int4-32", 96, 48), ("int4-32", 160, 33),
          ("int4-64", 256, 96), ("int4-64", 192, 17), ("int4-128", 384, 48), ("int4-128", 128, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,k,n", SHAPES)
def test_kernel_equals_dequantized_reference_and_fallback(on, kind, k, n, dtype):
    q = layer(kind, k, n, dtype)
    w = q.dequantize()
    for m in (1, 2, 5):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        want = x.float() @ w.t()
        direct = (kernels.int8_linear(x, q.weight, q.scales) if kind == "int8"
                  else kernels.int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size))
        assert direct is not None, "the kernel did not take a decode-sized input"
        got = q(x)
        assert got.dtype == dtype and got.shape == (m, n)
        assert torch.equal(got, direct)
        assert rel_err(got, want) <= TOL[dtype], (m, rel_err(got, want))
        if kind == "int8" and dtype == torch.bfloat16 and k % 16:
            continue  # torch 2.13's bfloat16 _weight_int8pack_mm: SIGSEGV or garbage when K % 16 != 0 (K = 200, 264)
        if kind != "int8" and n % 16:
            continue  # torch's int4 packing needs N % 16 == 0 (the kernel does not)
        with kernels.disabled():
            ref = q(x)  # PyTorch's weight-only op
        assert ref.dtype == got.dtype
        assert rel_err(ref, want) <= TOL[dtype]
        assert (got.float() - ref.float()).abs().max().item() <= 2 * TOL[dtype] * want.abs().max().item()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_int16_activations(ext, group):
    """The int16-activation int4 path (for bf16 inputs, optional) is as precise as the int8 kernel's."""
    q = layer(f"int4-{group}", 384, 40, torch.bfloat16)
    x = torch.randn(3, 384).to(torch.bfloat16)
    want = x.float() @ q.dequantize().t()
    y16 = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, group, torch.float32, 16)
    y8 = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, group, torch.float32, 8)
    assert rel_err(y16, want) <= 2e-4
    assert rel_err(y8, want) <= 1.5e-2


def test_float32_kernels_match_float_math(ext):
    """float32 activations: the kernels only differ from x @ dequantized.T by float rounding."""
    for kind in ("int8", "int4-32", "int4-128"):
        q = layer(kind, 512, 64, torch.float32)
        x = torch.randn(4, 512)
        y = ext.int8_gemv(x, q.weight, q.scales, torch.float32, 32) if kind == "int8" else \
            ext.int4_gemv(x, q.qweight, q.scales, q.zeros, q.group_size, torch.float32, 32)
        assert rel_err(y, x @ q.dequantize().t()) <= 2e-6


def test_shapes_rows_and_threads(on):
    q8, q4 = layer("int8", 512, 1024, torch.bfloat16), layer("int4-64", 512, 2048, torch.bfloat16)
    x = torch.randn(2, 3, 512).to(torch.bfloat16)  # a [batch, seq, K] input keeps its leading dims
    for q in (q8, q4):
        y = q(x)
        assert y.shape == (2, 3, q.out_features)
        assert torch.equal(y.reshape(6, -1), q(x.reshape(6, 512)))
    big = torch.randn(20, 512).to(torch.bfloat16)  # more rows than MAX_ROWS: PyTorch's op
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MAX_ROWS", 16)
        assert kernels.int8_linear(big, q8.weight, q8.scales) is None
        y_torch = q8(big)
    y = q8(big)  # the kernels, with 5 tiles of 4 rows (each weight row read once, see by_row_tiles)
    assert rel_err(y, big.float() @ q8.dequantize().t()) <= TOL[torch.bfloat16]
    assert rel_err(y_torch, big.float() @ q8.dequantize().t()) <= TOL[torch.bfloat16]
    threads = torch.get_num_threads()
    try:  # the row split over threads does not change a single bit
        torch.set_num_threads(1)
        one = [q(x) for q in (q8, q4)]
        torch.set_num_threads(2)
        two = [q(x) for q in (q8, q4)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    with torch.enable_grad():  # autograd is left to PyTorch
        assert kernels.int8_linear(torch.randn(1, 512, requires_grad=True), q8.weight, q8.scales) is None
    # weights not in the expected layout: PyTorch's op, not an error
    strided = torch.zeros(512, 1024, dtype=torch.int8).t()
    assert kernels.int8_linear(x, strided, q8.scales) is None
    assert kernels.int4_linear(x, q4.qweight, q4.scales, q4.zeros[:, :1], 64) is None


def test_zero_and_constant_activations(on):
    q = layer("int4-32", 96, 8, torch.bfloat16)
    assert torch.equal(q(torch.zeros(1, 96, dtype=torch.bfloat16)), torch.zeros(1, 8, dtype=torch.bfloat16))
    q8 = layer("int8", 70, 8, torch.float32)
    x = torch.full((1, 70), 3.0)
    assert rel_err(q8(x), x @ q8.dequantize().t()) <= 1e-5


def test_fallback_when_unavailable_warns_once(monkeypatch):
    def boom(verbose: bool = False):
        raise RuntimeError("compiler exploded\nsecond line")

    monkeypatch.setattr(build, "compile_and_load", boom)
    monkeypatch.setattr(build, "cpu_supported", lambda: (True, ""))
    monkeypatch.delenv("LFM_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_tried", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = layer("int4-64", 128, 16, torch.float32)
        x = torch.randn(1, 128)
        y = q(x)
        q(x)
        assert kernels.extension() is None
    msgs = [str(r.message) for r in rec if issubclass(r.category, build.KernelWarning)]
    assert len(msgs) == 1 and "compiler exploded" in msgs[0] and "\n" not in msgs[0]
    assert rel_err(y, x @ q.dequantize().t()) <= 1e-4

    monkeypatch.setattr(build, "cpu_supported", lambda: (False, "the CPU lacks avx2"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert build.load() is None
    assert [str(r.message) for r in rec] == ["lfm.kernels: the CPU lacks avx2; using PyTorch's weight-only kernels"]


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code, *args], env=e, capture_output=True, text=True, timeout=120)


def test_disabled_by_env_in_a_fresh_process_gives_the_same_results(ext, tmp_path):
    """LFM_KERNELS=0: no build, no warning, PyTorch's ops; a cached build is loaded without the compiler."""
    code = """
import sys, torch
from lfm import kernels
from lfm.model.quant import Int4Linear, Int8Linear
torch.manual_seed(0)
lin = torch.nn.Linear(256, 48, bias=False).to(torch.bfloat16)
x = torch.randn(2, 256).to(torch.bfloat16)
ys = [Int8Linear.from_linear(lin)(x), Int4Linear.from_linear(lin, 64)(x)]
print(kernels.available())
torch.save(ys, sys.argv[1])
"""
    off = _run(code, str(tmp_path / "off.pt"), LFM_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "False" and "Warning" not in off.stderr
    on = _run(code, str(tmp_path / "on.pt"), LFM_KERNELS="1", CXX="/nonexistent-compiler")  # from the build cache
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == "True" and "Warning" not in on.stderr
    for a, b in zip(torch.load(tmp_path / "off.pt"), torch.load(tmp_path / "on.pt")):
        assert a.dtype == b.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max().item() <= 3e-2 * a.float().abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# bfloat16 weights (lfm.model.cpu_linear): float32 products of the bfloat16 values, output rounded once

@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k,n,bias", [(1024, 96, False), (100, 37, True), (17, 5, True), (48, 3, False)])
def test_bf16_kernel_equals_float_math_on_bf16_values(on, xdtype, k, n, bias):
    g = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    for rows in (1, 2, 3, 4, 5, 9, 16):  # every row tile, an odd last weight row, K tails of 1..15
        x = torch.randn(rows, k, generator=g).to(xdtype)
        want = x.double() @ w.double().t() + (b.double() if bias else 0)
        y = kernels.bf16_linear(x, w, b)
        assert y is not None and y.dtype == xdtype and y.shape == (rows, n)
        # float32 output: float32 accumulation only; 16-bit outputs: one rounding (2^-9 / 2^-12 relative)
        tol = 1e-5 if xdtype == torch.float32 else 8e-3
        assert rel_err(y, want) <= tol, (rows, rel_err(y, want))
        if xdtype == torch.float32:  # and it is what F.linear gives on the same values, up to float32 order
            assert rel_err(y, torch.nn.functional.linear(x, w.float(), None if b is None else b.float())) <= 1e-5


def test_bf16_linear_swap_keeps_the_module_and_defers_where_it_should(on, monkeypatch):
    from lfm.model.cpu_linear import Bf16Linear, use_cpu_kernels

    monkeypatch.setattr(kernels, "bf16_faster", lambda: True)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model = model.bfloat16()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 5, 64, generator=g).bfloat16()
    want = model(x)  # PyTorch's bfloat16 matmul
    assert use_cpu_kernels(model) == 2 and all(type(model[i]) is Bf16Linear for i in (0, 2))
    assert model.state_dict().keys() == keys.keys() and all(torch.equal(model.state_dict()[k], keys[k]) for k in keys)
    y = model(x)
    assert y.shape == want.shape and rel_err(y, want) <= 1.5e-2
    with torch.enable_grad():  # training: plain nn.Linear, gradients flow
        xg = x.float().bfloat16().requires_grad_()
        model(xg).sum().backward()
        assert model[0].weight.grad is not None and xg.grad is not None
    f32 = torch.nn.Linear(4, 4)
    assert use_cpu_kernels(f32) == 0 and type(f32) is torch.nn.Linear  # only bfloat16 weights
    monkeypatch.setattr(kernels, "bf16_faster", lambda: False)  # kernels unavailable: leave nn.Linear alone
    other = torch.nn.Linear(4, 4).bfloat16()
    assert use_cpu_kernels(other) == 0 and type(other) is torch.nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,kv,d", [(16, 8, 64), (4, 4, 12), (6, 2, 16)])
def test_paged_decode_attention_equals_sdpa_per_sequence(on, dtype, heads, kv, d):
    """Sequences at different lengths in one paged cache, their blocks in random order through the block table:
    each sequence's output is SDPA over its own keys, and the op only reads the cache."""
    g = torch.Generator().manual_seed(heads + kv + d)
    lens, bs = [1, 7, 40, 300], 16
    n = len(lens)
    nblk = [(L + bs - 1) // bs for L in lens]
    num_blocks = sum(nblk) + 3  # and a few blocks no sequence owns
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((n, max(nblk) + 1), -1, dtype=torch.int32)  # -1: padding past each sequence's last block
    # every slot no sequence covers holds NaN: a read outside a sequence's keys shows in its output
    kc = torch.full((num_blocks, kv, bs, d), float("nan"), dtype=dtype)
    vc = torch.full((num_blocks, kv, bs, d), float("nan"), dtype=dtype)
    ks, vs = [], []  # sequence b's keys / values [KV, L, D]
    for b, L in enumerate(lens):
        tables[b, :nblk[b]] = torch.tensor(perm[sum(nblk[:b]):sum(nblk[:b + 1])], dtype=torch.int32)
        k, v = torch.randn(kv, L, d, generator=g).to(dtype), torch.randn(kv, L, d, generator=g).to(dtype)
        slot = torch.arange(L)
        blk = tables[b, slot // bs].long()  # key l in block tables[b, l // bs] at offset l % bs
        kc[blk, :, slot % bs], vc[blk, :, slot % bs] = k.transpose(0, 1), v.transpose(0, 1)
        ks.append(k)
        vs.append(v)
    q = torch.randn(n, heads, d, generator=g).to(dtype)
    context = torch.tensor(lens, dtype=torch.int32)
    before = kc.clone(), vc.clone(), tables.clone()
    out = kernels.paged_decode_attention(q, kc, vc, None, None, tables, context, d ** -0.5)
    assert out is not None and out.shape == (n, heads, d) and out.dtype == dtype
    for a, a0 in zip((kc, vc, tables), before):  # read only (NaN slots included)
        assert torch.equal(a.isnan(), a0.isnan()) and torch.equal(a.nan_to_num(), a0.nan_to_num())
    for b in range(n):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :, None].double(), ks[b][None].double(), vs[b][None].double(), enable_gqa=True)[0, :, 0]
        assert torch.isfinite(out[b]).all(), b
        assert rel_err(out[b], want) <= (1e-5 if dtype == torch.float32 else 1e-2), (b, rel_err(out[b], want))
    with torch.enable_grad():  # autograd: left to PyTorch
        assert kernels.paged_decode_attention(q.float().requires_grad_(), kc.float(), vc.float(), None, None, tables,
                                              context, 1.0) is None


def test_engine_decode_same_with_and_without_kernels(on, monkeypatch):
    """Several sequences decoding together through the engine's paged cache: the paged attention kernel (and the
    bfloat16 GEMV kernels) give the logits of PyTorch's ops, step after step."""
    from lfm import LLM, SamplingParams
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    from .engine_util import capture, paged_kernel_calls, scripted

    model = empty_model(preset("tiny"), torch.bfloat16)
    model.init_weights(0.05, generator=torch.Generator().manual_seed(0))
    model.eval()
    prompts = [[5, 6, 7], list(range(10, 30)), [9]]
    used = paged_kernel_calls(monkeypatch)

    def run() -> list[tuple[list[int], torch.Tensor]]:
        """The prompts, then tokens 3, 4, 5 (one per sequence) fed four times: decode steps of all three."""
        llm = LLM(model, block_size=4)
        rec = capture(llm, force=scripted({tuple(p): [t] * 4 for p, t in zip(prompts, (3, 4, 5))}))
        steps: list[list[int]] = []
        inner = llm.engine.runner.run
        llm.engine.runner.run = lambda sch: (steps.append([it.num_tokens for it in sch]), inner(sch))[1]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        assert steps[1:] == [[1, 1, 1]] * 4  # after the prompts, every step decodes the three together
        return rec

    fast = run()
    assert used and all(used)
    used.clear()
    with kernels.disabled():
        slow = run()
    assert used and not any(used)
    assert [t for t, _ in fast] == [t for t, _ in slow] and len(fast) == 15
    for (_, a), (_, b) in zip(fast, slow):
        assert rel_err(a, b) <= 2e-2 and a.argmax(-1).tolist() == b.argmax(-1).tolist()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,k,n", SHAPES)
def test_dequant_to_bf16_is_exactly_the_dequantized_weight(on, kind, k, n, scale_dtype):
    """The bfloat16 copy big batches multiply by: bit for bit `dequantize()` rounded to bfloat16 (nearest even)."""
    q = layer(kind, k, n, scale_dtype)
    buf = torch.full((n * k + 5,), float("nan"), dtype=torch.bfloat16)
    if kind == "int8":
        on.int8_dequant_bf16(q.weight, q.scales, buf)
    else:
        on.int4_dequant_bf16(q.qweight, q.scales, q.zeros, q.group_size, buf)
    assert torch.equal(buf[:n * k].view(n, k), q.dequantize().to(torch.bfloat16))
    assert buf[n * k:].isnan().all()  # nothing past N * K is written


@pytest.mark.parametrize("kind,k,n", [("int8", 256, 96), ("int4-64", 256, 96), ("int4-32", 160, 33)])
def test_big_bf16_batches_take_the_dequantized_path_where_bf16_is_native(on, monkeypatch, kind, k, n):
    """From DEQUANT_ROWS rows of bfloat16 activations, on a CPU with native bfloat16 matmul, the layer multiplies by
    its dequantized weight (same result as the kernel within bfloat16 rounding); fewer rows take the kernel."""
    q = layer(kind, k, n, torch.bfloat16)
    w = q.dequantize()
    used = []
    real = kernels.dequant_linear
    monkeypatch.setattr(kernels, "dequant_linear", lambda *a: used.append(real(*a) is not None) or real(*a))
    monkeypatch.setattr(kernels, "_native_bf16", True)  # the path itself runs on any CPU (oneDNN or emulated)
    amx = kind != "int8" and kernels.amx()  # int4 on AMX: the kernel up to AMX_DEQUANT_ROWS rows
    for rows in (1, kernels.DEQUANT_ROWS - 1, kernels.DEQUANT_ROWS, 64, kernels.AMX_DEQUANT_ROWS):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        y = q(x)
        assert rel_err(y, x.float() @ w.T) < 2e-2
    assert used == ([False, False, False, False, True] if amx else [False, False, True, True, True])
    monkeypatch.setattr(kernels, "_native_bf16", False)  # without native bfloat16: always the kernels
    assert kernels.dequant_linear(torch.zeros(64, k, dtype=torch.bfloat16), *(
        (q.weight, q.scales) if kind == "int8" else (q.qweight, q.scales, q.zeros, q.group_size))) is None


def test_int4_vnni_path_gives_the_avx2_paths_bits(on):
    """Where the CPU has AVX-512 VNNI the int4 kernel (int8 activations) runs vpdpbusd on two chunks at once; the
    integers and the float summation order are the AVX2 path's, so the output bits must be too (compared with a
    process that forces the AVX2 path)."""
    from lfm.kernels.build import cpu_flags

    if "avx512_vnni" not in cpu_flags():
        pytest.skip("no AVX-512 VNNI here: the AVX2 path is the only one")
    code = ("import sys, torch\nfrom lfm import kernels\nfrom tests.test_kernels import layer\nout = []\n"
            "for kind, k, n in [('int4-32', 160, 33), ('int4-64', 1024, 40), ('int4-128', 384, 9), ('int4-32', 96, 8)]:\n"
            "    q = layer(kind, k, n, torch.bfloat16)\n"
            "    for M in (1, 5, 12):\n"
            "        x = torch.randn(M, k, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)\n"
            "        out.append(kernels.int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size))\n"
            "torch.save(out, sys.argv[1])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name, env in (("vnni", {}), ("avx2", {"LFM_KERNELS_NO_VNNI": "1"})):
            subprocess.run([sys.executable, "-c", code, f"{d}/{name}.pt"], check=True, cwd=ROOT,
                           env={**os.environ, **env})
        a, b = torch.load(f"{d}/vnni.pt"), torch.load(f"{d}/avx2.pt")
    assert len(a) == 12 and all(x is not None and torch.equal(x, y) for x, y in zip(a, b))


def test_row_max_is_torch_max(ext):
    # greedy sampling's argmax (Sampler): torch.max(x, -1)'s values and first indices, ties, NaN rows (NaN at the
    # first NaN), all -inf, signed zeros, widths that are not a multiple of the vector length
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, V = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 3000, (1,), generator=g))
        x = torch.randint(-3, 4, (n, V), generator=g).float()  # many ties
        if trial % 3 == 0:
            x[torch.rand(n, V, generator=g) < 0.01] = float("nan")
        if trial % 5 == 0:
            x[: n // 2] = float("-inf")
        if trial % 7 == 0:
            x[:, : V // 2], x[:, V // 2:] = -0.0, 0.0
        vals, idx = ext.row_max(x)
        ref_vals, ref_idx = x.max(-1)
        assert torch.equal(idx, ref_idx), (n, V, trial)
        assert torch.equal(vals.isnan(), ref_vals.isnan())
        assert torch.equal(vals[~vals.isnan()], ref_vals[~ref_vals.isnan()])
    assert kernels.row_max(torch.zeros(2, 5)[:, ::2]) is None  # not contiguous: the caller uses torch.max
    assert kernels.row_max(torch.zeros(2, 5, dtype=torch.bfloat16)) is None
