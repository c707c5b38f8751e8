"""benchmarks/gpu_throughput.py runs end to end before it meets a GPU: its CPU smoke mode (tiny shapes, a few short
prompts) prints the table with a row per model and concurrency, with and without the transformers peer, and without
CUDA a real run stops at once with one line and exit status 2. (It is run on a GPU by hand, in a lent session.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_throughput.py"
HEADER = ("| model | concurrency | prompts x (prompt / output) | output tok/s | TTFT p50 / p99 (ms) | ITL p50 (ms) | "
          "peak GPU memory (GiB) | vs transformers |")
# LFM_KERNELS=0: the CPU C++ kernels play no part in this script; a rebuild of them (minutes) must not land here
ENV = dict(os.environ, LFM_KERNELS="0", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def rows(out: str) -> dict[tuple[str, int, str], list[str]]:
    """Table rows by (model, concurrency, 'prompts x (prompt / output)') -> the remaining cells."""
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1].isdigit():
            found[(cells[0], int(cells[1]), cells[2])] = cells[3:]
    return found


def test_smoke_with_the_transformers_peer(tmp_path):
    out_file = tmp_path / "table.md"
    p = run("--smoke", "--out", str(out_file))
    assert p.returncode == 0, p.stdout + p.stderr
    assert HEADER in p.stdout
    table = rows(p.stdout)
    for model in ("tiny", "tiny-moe"):
        for conc in (2, 4):
            cells = table[(model, conc, "8 x (16 / 8)")]
            assert float(cells[0].replace(",", "")) > 0  # output tok/s
            assert re.fullmatch(r"[\d.]+ / [\d.]+", cells[1]) and float(cells[2]) > 0  # TTFT p50 / p99, ITL p50
            assert cells[3] == "-"  # no GPU memory on CPU
            assert re.fullmatch(r"[\d.]+x", cells[4])  # the ratio to transformers
    assert table[("tiny-moe", 2, "4 x (48 / 8)")][4] == "-"  # the long MoE row: other lengths than the peer's
    assert re.search(r"transformers tiny: [\d,]+ tok/s \(batch 4, 16 / 8 tokens", p.stdout)
    assert re.search(r"transformers tiny-moe: [\d,]+ tok/s .*experts", p.stdout)
    assert "Targets: " in p.stdout and "not measured" in p.stdout  # no 350M / 8B-A1B row in a smoke run
    text = out_file.read_text()
    assert HEADER in text and "Targets: " in text and "in progress" not in text


def test_smoke_without_the_peer():
    p = run("--smoke", "--no-peer", "--models", "tiny", "--concurrency", "3")
    assert p.returncode == 0, p.stdout + p.stderr
    table = rows(p.stdout)
    assert list(table) == [("tiny", 3, "8 x (16 / 8)")] and table[("tiny", 3, "8 x (16 / 8)")][4] == "-"
    assert "transformers tiny: not run (--no-peer)" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: a real run would start")
def test_without_cuda_a_real_run_exits_2_with_one_line():
    p = run("--no-peer", timeout=60)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--smoke" in lines[0]


# benchmarks/gpu_profile.py, the decode-step profile the GPU session runs last: same checks, its own report
PROFILE = ROOT / "benchmarks" / "gpu_profile.py"


def test_profile_smoke_reports_every_section(tmp_path):
    out_file = tmp_path / "profile.md"
    p = subprocess.run([sys.executable, str(PROFILE), "--smoke", "--out", str(out_file)], capture_output=True,
                       text=True, timeout=120, env=ENV, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    for model in ("tiny", "tiny-moe"):
        section = p.stdout.split(f"## {model}: C=4, prompts of 16 tokens")[1].split("## ")[0]
        assert re.search(r"decode step as served, eager: .*: [\d.]+ ms \(median of 3\) = [\d,]+ output tok/s", section)
        assert "| family | ms / step | share |" in section and "| dense GEMMs |" in section
        assert re.search(r"roofline: [\d.]+ GB weights .* GB read per step", section)
        assert "error" not in section
    assert out_file.read_text().count("## tiny") == 2


def test_profile_names_kernel_families():
    env, path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(PROFILE.parent))
    try:  # the scripts set LFM_KERNELS=0 for themselves: not for the rest of this test process
        import gpu_profile as gp
    finally:
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
    assert gp.family("_decode_split") == gp.family("_decode_merge") == "decode attention"  # our Triton kernels
    assert gp.family("_short_conv") == "short conv" and gp.family("_grouped_gemm") == "expert GEMMs (grouped)"
    assert gp.family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "dense GEMMs"
    assert gp.family("Memcpy HtoD (Pinned -> Device)") == "copies / fills"
    assert gp.family("void at::native::vectorized_elementwise_kernel<4, silu>").startswith("other")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: a real run would start")
def test_profile_without_cuda_exits_2_with_one_line():
    p = subprocess.run([sys.executable, str(PROFILE)], capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "CUDA" in p.stderr
