#!/usr/bin/env python
"""The CUDA backend's Triton kernels vs the PyTorch path they replace (TorchBackend, the portable reference), on the
LFM2.5-350M / 1.2B attention and conv shapes, in one run on one GPU. Not yet run: no GPU was available when written.

    python benchmarks/triton_bench.py [--dtype bfloat16] [--kv auto|int8] [--batches 1,32]
                                      [--contexts 1024,8192,32768] [--repeats 20] [--smoke]

* Decode attention (one attention layer, one query token per sequence, block size 16, blocks scattered at random over
  the pool): `paged_decode_attention` (split-K) vs `TorchBackend.decode_attention` (gather every sequence's blocks,
  SDPA). An outside peer (vLLM's paged attention, FlashInfer) is still to be added by the first GPU session.
* Conv decode step (every conv layer's `B*x -> conv -> C*` for the batch): `short_conv(gated=True)` vs the PyTorch
  ops the model runs without the hook (TorchBackend.short_conv plus the two products).
* Add + RMSNorm and QK-norm + RoPE at the batch's rows vs the model's PyTorch ops.
Each cell: median over --repeats of CUDA-event timings after 3 warm-ups; the table prints microseconds and the ratio.
--smoke runs tiny shapes on CPU under Triton's interpreter (checks the script, measures nothing meaningful).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--kv", default="auto", choices=["auto", "int8"])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("error: no CUDA device (this benchmark times GPU kernels; --smoke checks the script on CPU)",
              file=sys.stderr)
        return 2
    from lfm.engine.backend import StepBatch, TorchBackend
    from lfm.engine.cache import PagedCache
    from lfm.kernels.triton import paged_decode_attention, rms_norm, rope_qknorm, short_conv
    from lfm.model.lfm2 import RMSNorm, apply_rope_flat, rope_cos_sin

    dev = "cpu" if a.smoke else "cuda"
    dt = torch.float32 if a.smoke else getattr(torch, a.dtype)
    batches = [1, 2] if a.smoke else [int(x) for x in a.batches.split(",")]
    contexts = [40] if a.smoke else [int(x) for x in a.contexts.split(",")]
    reps = 2 if a.smoke else a.repeats
    H, KV, hd, D, bs = (4, 2, 16, 32, 16) if a.smoke else (32, 8, 64, 2048, 16)

    def timed(fn) -> float:
        """Median microseconds of fn() (CUDA events on GPU, perf_counter under --smoke)."""
        import time

        for _ in range(1 if a.smoke else 3):
            fn()
        out = []
        for _ in range(reps):
            if a.smoke:
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e6)
            else:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                out.append(s.elapsed_time(e) * 1e3)
        return statistics.median(out)

    rows = []
    kv_dtype = torch.int8 if a.kv == "int8" else dt
    for S in batches:
        for ctx in contexts:
            nbl = -(-ctx // bs)
            nb = S * nbl + 1
            shape = (nb, KV, bs, hd)
            cache = PagedCache(k={0: torch.randn(shape, device=dev).to(kv_dtype)},
                               v={0: torch.randn(shape, device=dev).to(kv_dtype)},
                               conv=torch.zeros(1, 1, 2, D, device=dev), conv_index={}, block_size=bs, num_blocks=nb)
            if kv_dtype == torch.int8:
                cache.k_scale = {0: torch.rand(shape[:3], device=dev) / 64}
                cache.v_scale = {0: torch.rand(shape[:3], device=dev) / 64}
            tables = torch.randperm(nb - 1, device=dev)[:S * nbl].view(S, nbl).to(torch.int32)
            lens = torch.full((S,), ctx, dtype=torch.int32, device=dev)
            be = TorchBackend(cache, H, hd)
            be.batch = StepBatch(None, None, [], [ctx] * S, S, tables, lens, [], None, None, None, None, None, None,
                                 None)
            q = torch.randn(S, H, hd, device=dev, dtype=dt)
            ref = timed(lambda: be.decode_attention(0, q))
            tri = timed(lambda: paged_decode_attention(q, cache.k[0], cache.v[0], tables, lens, be.scale,
                                                       cache.k_scale.get(0), cache.v_scale.get(0)))
            rows.append((f"decode attention S={S} ctx={ctx} kv={a.kv}", ref, tri))
        x = torch.randn(S, 3 * D, device=dev, dtype=dt)
        w = torch.randn(D, 3, device=dev, dtype=dt)
        state = torch.randn(S, 2, D, device=dev, dtype=dt)
        qs = torch.arange(S + 1, device=dev, dtype=torch.int32)
        slots = torch.arange(S, device=dev)

        def torch_conv():
            b, c, xx = x.chunk(3, dim=-1)
            u = b * xx
            full = torch.cat([state[slots], u[:, None]], 1).float()
            z = (full * w.float().t()[None]).sum(1).to(dt)
            state[slots] = full[:, 1:].to(dt)
            return c * z

        rows.append((f"conv decode step S={S} D={D}", timed(torch_conv),
                     timed(lambda: short_conv(x, w, None, state, qs, slots, gated=True))))
        norm = RMSNorm(D, 1e-5).to(dev, dt)
        h, r = torch.randn(S, D, device=dev, dtype=dt), torch.randn(S, D, device=dev, dtype=dt)
        with torch.no_grad():
            rows.append((f"add + RMSNorm S={S} D={D}", timed(lambda: norm(h + r)),
                         timed(lambda: rms_norm(h, norm.weight, 1e-5, r))))
            qn = RMSNorm(hd, 1e-5).to(dev, dt)
            qq = torch.randn(S, H, hd, device=dev, dtype=dt)
            cos, sin = rope_cos_sin(torch.arange(S, device=dev), hd, 1e6, dt)
            rows.append((f"QK-norm + RoPE S={S} H={H}", timed(lambda: apply_rope_flat(qn(qq), cos, sin)),
                         timed(lambda: rope_qknorm(qq, qn.weight, cos, sin, 1e-5))))
    print(f"{'case':48s} {'PyTorch us':>11s} {'Triton us':>10s} {'speedup':>8s}")
    for name, ref, tri in rows:
        print(f"{name:48s} {ref:11.1f} {tri:10.1f} {ref / tri:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
