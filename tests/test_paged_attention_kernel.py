"""The paged decode-attention kernel (`lfm.kernels.paged_decode_attention`) against a plain PyTorch reference.

Each batch mixes context lengths (1 .. 300) over a block pool in random order, with a block shared between two
sequences and -1 padding past each sequence's last block; every cache slot no sequence covers holds NaN (float
caches) or a NaN scale (int8), so a read outside a sequence's keys shows up in the output.

Where the extension cannot be built the tests skip (with the reason), except under CI=true, where they fail.
"""

from __future__ import annotations

import pytest
import torch

from lfm import kernels

from .test_kernels import ext, on  # noqa: F401  (the built extension, dispatched to in this process)

torch.set_grad_enabled(False)

LENS = [1, 7, 16, 17, 100, 300]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item() / want.abs().max().item()


def paged_batch(lens: list[int], heads: int, kv: int, d: int, bs: int, qdtype: torch.dtype, cdtype: torch.dtype,
                seed: int = 0, spare: int = 5):
    """q, k_cache, v_cache, k_scale, v_scale (None for float caches), block_tables, context_lens: the sequences'
    blocks are a random permutation of the pool (plus `spare` unused blocks); the last sequence reuses the second
    to last one's first block (a shared prefix block, full in both); unused table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    nblk = [(L + bs - 1) // bs for L in lens]
    share = n >= 2 and lens[-2] >= bs and lens[-1] >= bs  # the last sequence's block 0 = the one before's block 0
    total = sum(nblk) - (1 if share else 0) + spare
    perm = torch.randperm(total, generator=g).tolist()
    max_blocks = max(nblk) + 2
    tables = torch.full((n, max_blocks), -1, dtype=torch.int32)
    it = iter(perm)
    for b, m in enumerate(nblk):
        for j in range(m):
            tables[b, j] = tables[n - 2, 0] if (share and b == n - 1 and j == 0) else next(it)
    used = torch.zeros(total, kv, bs, dtype=torch.bool)  # slots some sequence reads
    for b, L in enumerate(lens):
        for lpos in range(L):
            used[tables[b, lpos // bs], :, lpos % bs] = True
    shape = (total, kv, bs, d)
    if cdtype == torch.int8:
        kc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        vc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        ks = (torch.rand(total, kv, bs, generator=g) + 0.5) / 127  # values ~ +-1
        vs = (torch.rand(total, kv, bs, generator=g) + 0.5) / 127
        ks[~used], vs[~used] = float("nan"), float("nan")
    else:
        kc = torch.randn(shape, generator=g).to(cdtype)
        vc = torch.randn(shape, generator=g).to(cdtype)
        kc[~used], vc[~used] = float("nan"), float("nan")
        ks = vs = None
    q = (torch.randn(n, heads, d, generator=g) * 2).to(qdtype)  # * 2: peakier softmax than plain randn
    return q, kc, vc, ks, vs, tables, torch.tensor(lens, dtype=torch.int32)


def reference(q, kc, vc, ks, vs, tables, lens, scale) -> torch.Tensor:
    """softmax(q k^T * scale) v per sequence in float64, keys / values gathered through the block table."""
    n, heads, d = q.shape
    kv, bs = kc.shape[1], kc.shape[2]
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for b in range(n):
        L = int(lens[b])
        blocks = tables[b, :(L + bs - 1) // bs].long()
        k, v = kc[blocks].double(), vc[blocks].double()  # [blocks, KV, bs, D]
        if ks is not None:
            k, v = k * ks[blocks].double()[..., None], v * vs[blocks].double()[..., None]
        k = k.permute(1, 0, 2, 3).reshape(kv, -1, d)[:, :L].repeat_interleave(heads // kv, 0)  # [H, L, D]
        v = v.permute(1, 0, 2, 3).reshape(kv, -1, d)[:, :L].repeat_interleave(heads // kv, 0)
        p = (torch.einsum("hd,hld->hl", q[b].double(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hl,hld->hd", p, v)
    return out


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


CDTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


@pytest.mark.parametrize("bs", [8, 16, 32, 5])
@pytest.mark.parametrize("d", [64, 32, 40])
@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 4), (8, 2)])
@pytest.mark.parametrize("cdtype", CDTYPES, ids=str)
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_equals_reference(on, qdtype, cdtype, heads, kv, d, bs):
    args = paged_batch(LENS, heads, kv, d, bs, qdtype, cdtype, seed=heads * kv + d + bs)
    before = [a.clone() if a is not None else None for a in args]
    out = kernels.paged_decode_attention(*args, d ** -0.5)
    assert out is not None and out.shape == (len(LENS), heads, d) and out.dtype == qdtype
    assert all(same(a, b) for a, b in zip(args, before))  # read only
    want = reference(*args, d ** -0.5)
    tol = 1e-5 if qdtype == torch.float32 else 1e-2
    for b in range(len(LENS)):
        assert torch.isfinite(out[b]).all(), b
        assert rel_err(out[b], want[b]) <= tol, (b, LENS[b], rel_err(out[b], want[b]))


@pytest.mark.parametrize("cdtype", CDTYPES, ids=str)
def test_float16_query(on, cdtype):
    args = paged_batch(LENS, 8, 2, 64, 16, torch.float16, cdtype, seed=3)
    out = kernels.paged_decode_attention(*args, 0.125)
    assert out.dtype == torch.float16 and rel_err(out, reference(*args, 0.125)) <= 1e-2


@pytest.mark.parametrize("heads,kv", [(16, 8), (32, 8), (8, 8), (12, 4), (40, 8)], ids=lambda v: str(v))
def test_int8_cache_long_context_16bit_queries(on, heads, kv):
    """The edge decode at long context: int8 blocks, bfloat16 queries, thousands of keys (on CPUs with AVX-512 VNNI
    the integer-dot path for G = H / KV <= 4, else the float path). Within bfloat16's output rounding of the float64
    reference, block sizes that split 8-key groups included."""
    for bs in (16, 5):
        args = paged_batch([5003, 3, 130], heads, kv, 64, bs, torch.bfloat16, torch.int8, seed=heads + kv + bs)
        out = kernels.paged_decode_attention(*args, 0.125)
        want = reference(*args, 0.125)
        for b in range(3):
            assert rel_err(out[b], want[b]) <= 5e-3, (bs, b, rel_err(out[b], want[b]))


@pytest.mark.parametrize("cdtype", [torch.bfloat16, torch.int8], ids=str)
def test_threads_give_the_same_bits(on, cdtype):
    args = paged_batch(LENS * 3, 16, 8, 64, 16, torch.bfloat16, cdtype, seed=11)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.paged_decode_attention(*args, 0.125)
        torch.set_num_threads(2)
        two = kernels.paged_decode_attention(*args, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_empty_batch(on):
    q = torch.empty(0, 4, 64)
    kc = torch.randn(3, 2, 16, 64)
    out = kernels.paged_decode_attention(q, kc, kc.clone(), None, None, torch.empty(0, 4, dtype=torch.int32),
                                         torch.empty(0, dtype=torch.int32), 0.125)
    assert out.shape == (0, 4, 64)


def test_not_applicable_gives_none(on, monkeypatch):
    args = paged_batch([5, 20], 4, 2, 32, 8, torch.float32, torch.float32)
    with torch.enable_grad():  # autograd: left to PyTorch
        q = args[0].clone().requires_grad_()
        assert kernels.paged_decode_attention(q, *args[1:], 1.0) is None
    meta = args[0].to("meta")  # not a CPU tensor
    assert kernels.paged_decode_attention(meta, *args[1:], 1.0) is None
    with kernels.disabled():
        assert kernels.paged_decode_attention(*args, 1.0) is None


def _bad_cases():
    q, kc, vc, _, _, tables, lens = paged_batch([5, 20], 4, 2, 32, 8, torch.float32, torch.float32)
    qi, kci, vci, ksi, vsi, _, _ = paged_batch([5, 20], 4, 2, 32, 8, torch.float32, torch.int8)
    nb = kc.shape[0]
    bad_table = tables.clone()
    bad_table[1, 1] = nb  # past the pool
    neg_table = tables.clone()
    neg_table[0, 0] = -1
    return {
        "q 2-d": (q[0], kc, vc, None, None, tables, lens),
        "q head_dim": (q[..., :16].contiguous(), kc, vc, None, None, tables, lens),
        "q float64": (q.double(), kc, vc, None, None, tables, lens),
        "q non-contiguous": (q.transpose(0, 1), kc, vc, None, None, tables, lens),
        "heads not a multiple": (torch.randn(2, 3, 32), kc, vc, None, None, tables, lens),
        "cache 3-d": (q, kc[0], vc[0], None, None, tables, lens),
        "v shape": (q, kc, vc[:-1], None, None, tables, lens),
        "v dtype": (q, kc, vc.bfloat16(), None, None, tables, lens),
        "cache float64": (q, kc.double(), vc.double(), None, None, tables, lens),
        "int8 without scales": (qi, kci, vci, None, None, tables, lens),
        "int8 scale shape": (qi, kci, vci, ksi[:, :1].contiguous(), vsi, tables, lens),
        "int8 scale dtype": (qi, kci, vci, ksi.bfloat16(), vsi, tables, lens),
        "float cache with scales": (q, kc, vc, ksi, vsi, tables, lens),
        "tables int64": (q, kc, vc, None, None, tables.long(), lens),
        "tables rows": (q, kc, vc, None, None, tables[:1], lens),
        "lens int64": (q, kc, vc, None, None, tables, lens.long()),
        "lens count": (q, kc, vc, None, None, tables, lens[:1]),
        "block past the pool": (q, kc, vc, None, None, bad_table, lens),
        "negative block": (q, kc, vc, None, None, neg_table, lens),
        "zero length": (q, kc, vc, None, None, tables, torch.tensor([0, 20], dtype=torch.int32)),
        "length past the table": (q, kc, vc, None, None, tables,
                                  torch.tensor([5, tables.shape[1] * 8 + 1], dtype=torch.int32)),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_malformed_inputs_raise_with_a_message(on, case):
    args = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match="paged_decode_attention"):
        kernels.paged_decode_attention(*args, 0.125)
