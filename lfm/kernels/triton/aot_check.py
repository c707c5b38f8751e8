"""Compile every Triton kernel variant the CUDA backend launches to PTX for one GPU architecture, without a GPU.

`python -m lfm.kernels.triton.aot_check [--arch 90]` runs Triton's whole compiler (frontend, MLIR passes, LLVM, ptxas
from the triton wheel) on the kernels with the argument types the launchers pass (bfloat16 / float16 activations,
16-bit or int8 caches), so a kernel that only the interpreter accepts fails in CI, not on the first GPU. It must
run in a process where `TRITON_INTERPRET` is unset (tests/test_triton_kernels.py starts one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _mod(name: str):
    return importlib.import_module(f"lfm.kernels.triton.{name}")


def variants() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, argument types, constexprs) for each variant; the types follow the launchers' arguments."""
    sk, pa, sc, rn, rq, gg = (_mod(m) for m in ("store_kv", "paged_attention", "short_conv", "rmsnorm", "rope_qknorm",
                                                 "grouped_gemm"))
    out = [(gg._grouped_gemm, dict(x="*fp32", w="*fp32", out="*fp32", offs="*i32", N="i32", K="i32", E="i32",
                                   stride_we="i32", stride_wn="i32"),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, IEEE=True))]
    for act in ("bf16", "fp16"):
        a = "*" + act
        for cache in (act, "i8"):
            c, quant = "*" + cache, cache == "i8"
            scale = "*fp32" if quant else c
            out.append((sk._store_kv, dict(k=a, v=a, k_cache=c, v_cache=c, k_scale=scale, v_scale=scale,
                                           slots="*i64", KV="i32", block_size="i32", head_dim="i32"),
                        dict(QUANT=quant, BLOCK_D=64)))
            for group in (1, 4):
                out.append((pa._decode_split, dict(
                    q=a, k_cache=c, v_cache=c, k_scale=scale, v_scale=scale, block_tables="*i32",
                    context_lens="*i32", part_o="*fp32", part_m="*fp32", part_l="*fp32", scale="fp32", H="i32",
                    KV="i32", head_dim="i32", table_stride="i32", num_splits="i32"),
                    dict(GROUP=group, BLOCK_G=group, BLOCK_SIZE=16, BLOCK_D=64, QUANT=quant)))
        out.append((pa._decode_merge, dict(part_o="*fp32", part_m="*fp32", part_l="*fp32", out=a, H="i32",
                                           head_dim="i32", num_splits="i32"), dict(BLOCK_SPLITS=4, BLOCK_D=64)))
        for gated in (False, True):
            out.append((sc._short_conv, dict(x=a, w=a, bias=a, state=a, out=a, query_start="*i32", conv_slots="*i64",
                                             D="i32", row_stride="i32"),
                        dict(L=3, GATED=gated, HAS_BIAS=False, BLOCK_D=64)))
        out.append((rn._rmsnorm, dict(x=a, residual=a, w=a, out=a, sum_out=a, D="i32", eps="fp32"),
                    dict(HAS_RES=True, BLOCK_D=2048)))
        out.append((gg._grouped_gemm, dict(x=a, w=a, out=a, offs="*i32", N="i32", K="i32", E="i32", stride_we="i32",
                                           stride_wn="i32"), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, IEEE=False)))
        out.append((rq._rope_qknorm, dict(x=a, w=a, cos=a, sin=a, out=a, heads="i32", head_dim="i32", half="i32",
                                          eps="fp32"), dict(BLOCK_H=32)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (80, 90, ...)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: the kernels would not be compiled", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    for fn, types, consts in variants():
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=target)
        print(f"ok {fn.__name__} {consts} ({len(k.asm['ptx'])} bytes of PTX)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
