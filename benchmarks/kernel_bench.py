"""GEMV micro-benchmark: one decode token (M rows of activations, default 1) through the LFM2.5-350M weight shapes.

For each shape: PyTorch float32 and bfloat16 `F.linear`, PyTorch's weight-only `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu`, and lfm's AVX2 kernels (`lfm.kernels`, int8, int4 and bf16), median microseconds per call
and the effective bandwidth (bytes of weights, scales and zeros read per call / time).

The weights are cold, as in decode (a 350M model is several times the L3 cache): each call uses the next of enough
copies of the weight to fill 3x the L3 (96 MiB). Activations are bfloat16 (the model's dtype) unless --dtype float32.

    python benchmarks/kernel_bench.py                 # 1 and 2 threads
    python benchmarks/kernel_bench.py --threads 1 --repeats 31 --group 64 --rows 1
    python benchmarks/kernel_bench.py --threads 2 --rows 16   # a decode batch: int4 on AMX vs the row kernel
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lfm import kernels
from lfm.model.presets import preset
from lfm.model.quant import Int4Linear, Int8Linear

COLD_BYTES = 96 << 20


def shapes() -> list[tuple[str, int, int]]:
    c = preset("LFM2.5-350M")
    d, ff, v = c.hidden_size, c.ff_dim, c.vocab_size
    return [("conv in_proj", d, 3 * d), ("out_proj / q / o", d, d), ("w1 / w3", d, ff), ("w2", ff, d),
            ("lm_head", d, v)]


def time_calls(fns: list[Callable[[], object]], repeats: int) -> float:
    """Median seconds of one call, cycling through fns (one per weight copy)."""
    for f in fns[: min(len(fns), 3)]:
        f()  # warm-up (and any lazy preparation)
    ts = []
    i = 0
    for _ in range(repeats):
        f = fns[i % len(fns)]
        i += 1
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copies_for(nbytes: int) -> int:
    return max(1, min(512, -(-COLD_BYTES // max(nbytes, 1))))


def variants(k: int, n: int, x: torch.Tensor, group: int) -> dict[str, tuple[int, Callable[[], list]]]:
    """name -> (bytes read per call, factory of the per-copy callables)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = w
    q8 = Int8Linear.from_linear(lin.to(torch.bfloat16))
    q4 = Int4Linear.from_linear(lin.to(torch.bfloat16), group)
    q4.prepare()
    xf, xb = x.float(), x.to(torch.bfloat16)
    out: dict[str, tuple[int, Callable[[], list]]] = {}

    def make(nbytes: int, build: Callable[[], Callable[[], object]]) -> tuple[int, Callable[[], list]]:
        return nbytes, lambda: [build() for _ in range(copies_for(nbytes))]

    def f32() -> Callable[[], object]:
        wc = w.clone()
        return lambda: F.linear(xf, wc)

    def bf16() -> Callable[[], object]:
        wc = w.to(torch.bfloat16)
        return lambda: F.linear(xb, wc)

    def i8pack() -> Callable[[], object]:
        wc, sc = q8.weight.clone(), q8.scales.clone()
        return lambda: torch.ops.aten._weight_int8pack_mm(xb, wc, sc)

    def i4pack() -> Callable[[], object]:
        pc, szc = q4._packed.clone(), q4._sz.clone()
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, pc, group, szc)

    def ours8() -> Callable[[], object]:
        wc, sc = q8.weight.clone(), q8.scales.clone()
        return lambda: kernels.int8_linear(x, wc, sc)

    def oursbf16() -> Callable[[], object]:
        wc = w.to(torch.bfloat16)
        return lambda: kernels.bf16_linear(xb, wc, None)

    def ours4() -> Callable[[], object]:
        qc, sc, zc = q4.qweight.clone(), q4.scales.clone(), q4.zeros.clone()
        return lambda: kernels.int4_linear(x, qc, sc, zc, group)

    def ours4rows() -> Callable[[], object]:  # the VNNI / AVX2 row kernel even where AMX would take the batch
        qc, sc, zc = q4.qweight.clone(), q4.scales.clone(), q4.zeros.clone()
        return lambda: kernels.int4_linear(x, qc, sc, zc, group, amx_min_rows=1 << 62)

    s8 = n * k + n * 2
    s4 = n * k // 2 + 2 * n * (k // group) * 2
    out["f32 torch"] = make(n * k * 4, f32)
    out["bf16 torch"] = make(n * k * 2, bf16)
    out["int8pack"] = make(s8, i8pack)
    out["int4pack"] = make(n * k // 2 + n * (k // group) * 2 * 2, i4pack)
    if kernels.available():
        out["ours int8"] = make(s8, ours8)
        out["ours int4"] = make(s4, ours4)
        if kernels.amx() and x.shape[0] >= kernels.AMX_MIN_ROWS:
            out["ours int4 (row kernel, no AMX)"] = make(s4, ours4rows)
        out["ours bf16"] = make(n * k * 2, oursbf16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--group", type=int, default=64, help="int4 group size")
    ap.add_argument("--rows", type=int, default=1, help="rows of activations (tokens)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activations' dtype")
    ap.add_argument("--only", default="", help="comma-separated shape names (substring match)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    if not kernels.available():
        print("lfm.kernels unavailable: only PyTorch's kernels are measured")
    sel = [s for s in shapes() if not a.only or any(o in s[0] for o in a.only.split(","))]
    for nt in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(nt)
        print(f"\n## {nt} thread(s), M = {a.rows}, activations {a.dtype}, int4 group {a.group}; "
              f"median us per call (effective GB/s)")
        header = None
        for name, k, n in sel:
            x = torch.randn(a.rows, k).to(dtype)
            vs = variants(k, n, x, a.group)
            if header is None:
                header = list(vs)
                print("| shape | K -> N | " + " | ".join(header) + " |")
                print("|---|---|" + "---|" * len(header))
            cells = []
            for v in header:
                nbytes, build = vs[v]
                fns = build()
                dt = time_calls(fns, a.repeats)
                del fns
                cells.append(f"{dt * 1e6:.0f} ({nbytes / dt / 1e9:.1f})")
            print(f"| {name} | {k} -> {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
