"""The int4 x int8 AMX kernel (lfm/kernels/amx_kernels.h): equal to the dequantized reference within the int8-activation
tolerance, batch-invariant (a row's bits do not depend on the other rows or on the thread split), and the same
product as the VNNI row kernel up to float rounding. Skipped (with the reason) on CPUs without AMX-INT8."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lfm import kernels

from .test_kernels import ROOT, TOL, layer, rel_err

torch.set_grad_enabled(False)
pytestmark = pytest.mark.skipif(not kernels.amx(), reason="no AMX-INT8 on this CPU (or LFM_KERNELS_NO_AMX set)")

NEVER = 1 << 62  # amx_min_rows that keeps the row kernels

# group 32 with K % 64 == 32 (a half chunk at the end), N not a multiple of 16, one group per row, big K
SHAPES = [("int4-32", 160, 33), ("int4-32", 96, 48), ("int4-64", 1024, 40), ("int4-64", 192, 17),
          ("int4-128", 384, 9), ("int4-256", 1024, 100), ("int4-64", 4608, 64)]


@pytest.mark.parametrize("kind,k,n", SHAPES)
def test_amx_equals_the_reference_and_the_row_kernel(kind, k, n):
    ext = kernels.extension()
    q = layer(kind, k, n, torch.bfloat16)
    w = q.dequantize()
    for m in (kernels.AMX_MIN_ROWS, 16, 17, 33, 70):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        want = x.float() @ w.t()
        amx = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, q.group_size, torch.float32, 8, 1)
        rows = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, q.group_size, torch.float32, 8, NEVER)
        assert rel_err(amx, want) <= TOL[torch.bfloat16], (m, rel_err(amx, want))
        # the same integers and scales, another float order: float32 rounding apart
        assert rel_err(amx, rows) <= 1e-5, (m, rel_err(amx, rows))
        y = q(x)  # the layer's dispatch: AMX from AMX_MIN_ROWS
        assert torch.equal(y, amx.to(torch.bfloat16))


def test_amx_rows_do_not_depend_on_the_batch_or_the_threads():
    ext = kernels.extension()
    q = layer("int4-64", 512, 2048, torch.bfloat16)
    x = torch.randn(40, 512).to(torch.bfloat16)
    full = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1)
    for lo, hi in ((0, 1), (3, 9), (7, 23), (16, 40)):
        part = ext.int4_gemv(x[lo:hi].contiguous(), q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1)
        assert torch.equal(part, full[lo:hi])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1)
        torch.set_num_threads(2)
        two = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full) and torch.equal(two, full)
    # repeated calls (buffers reused between calls, big then small) give the same bits
    ext.int4_gemv(torch.randn(300, 512).to(torch.bfloat16), q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1)
    assert torch.equal(ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.bfloat16, 8, 1), full)


def test_no_amx_env_keeps_the_row_kernels_in_a_fresh_process(tmp_path):
    code = ("import sys, torch\nfrom lfm import kernels\nfrom tests.test_kernels import layer\n"
            "q = layer('int4-64', 256, 64, torch.bfloat16)\n"
            "x = torch.randn(12, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
            "y = kernels.extension().int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.float32, 8, 1)\n"
            "torch.save([kernels.amx(), y], sys.argv[1])\n")
    for name, env in (("on", {}), ("off", {"LFM_KERNELS_NO_AMX": "1"})):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, cwd=ROOT,
                       env={**os.environ, **env})
    (amx_on, y_on), (amx_off, y_off) = (torch.load(tmp_path / n) for n in ("on", "off"))
    assert amx_on and not amx_off
    q = layer("int4-64", 256, 64, torch.bfloat16)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ext = kernels.extension()
    rows = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.float32, 8, NEVER)
    amx = ext.int4_gemv(x, q.qweight, q.scales, q.zeros, 64, torch.float32, 8, 1)
    assert not torch.equal(rows, amx)  # float32 outputs: the two float orders show
    assert torch.equal(y_off, rows) and torch.equal(y_on, amx)
