"""Every edge-engine target in one command: the four benchmarks one after another, each in its own process.

    python benchmarks/edge_suite.py                  # about 35 minutes on 2 cores: run it on an idle machine
    python benchmarks/edge_suite.py --only quality,moe

edge_bench.py (350M: lfm vs transformers vs llama.cpp F16 / Q8_0 / Q4_K_M), quality_bench.py (perplexity / KL vs bf16),
long_context_bench.py (32K at int4, bf16 and int8 KV: RSS, decode at 32K vs 512), moe_bench.py (8B-A1B at 4 bits vs
llama.cpp Q4_0). Each prints its own tables (ratios, PASS / MISS) and writes benchmarks/results/; the suite stops at
the first one that fails and says which.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = {
    "edge": ["edge_bench.py", "--engines", "lfm-bf16,lfm-int8-bf16,lfm-int4-bf16,hf-bf16,llama-f16,llama-q8_0,llama-q4_k_m",
             "--out", str(HERE / "results" / "edge_bench_v2.json")],
    "quality": ["quality_bench.py"],
    "long": ["long_context_bench.py", "--kv-cache-dtype", "auto,int8", "--sweep", ""],
    "moe": ["moe_bench.py"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SUITE), help="comma list of: " + ", ".join(SUITE))
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    if bad := [n for n in names if n not in SUITE]:
        ap.error(f"unknown benchmark(s) {bad}; choose from {', '.join(SUITE)}")
    for n in names:
        cmd = [sys.executable, str(HERE / SUITE[n][0]), *SUITE[n][1:]]
        print(f"\n===== {n}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"===== {n}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            raise SystemExit(f"{n} failed (exit {rc})")


if __name__ == "__main__":
    main()
