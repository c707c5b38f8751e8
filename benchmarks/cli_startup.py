"""How long `lfm` takes to answer before any model work: `--help`, a subcommand's help and an argument error,
next to a bare `python -c pass` (the floor) and `python -c "import torch"` (what every command paid before the
commands imported torch lazily). Wall time of a fresh process, median of --repeats.

    python benchmarks/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

CASES = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("lfm --help", [sys.executable, "-m", "lfm.cli", "--help"]),
    ("lfm chat --help", [sys.executable, "-m", "lfm.cli", "chat", "--help"]),
    ("lfm serve --help", [sys.executable, "-m", "lfm.cli", "serve", "--help"]),
    ("lfm chat --bogus (error)", [sys.executable, "-m", "lfm.cli", "chat", "--bogus"]),
    ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes per case; the median is shown")
    a = ap.parse_args()
    cases = list(CASES)
    script = shutil.which("lfm")
    if script:  # the installed console script (what a user types): it runs the installed lfm, maybe another tree
        where = subprocess.run([sys.executable, "-c", "import lfm; print(lfm.__file__)"], capture_output=True,
                               text=True, cwd="/").stdout.strip()
        print(f"console script {script} imports {where}")
        cases.insert(2, ("lfm --help (console script)", [script, "--help"]))
    for _, cmd in cases:  # warm the file cache once
        timed(cmd)
    print(f"{'command':30} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, cmd in cases:
        t = [timed(cmd) for _ in range(a.repeats)]
        print(f"{name:30} {statistics.median(t):9.3f} {min(t):7.3f} {max(t):7.3f}")
    print(f"{a.repeats} runs each, {sys.executable}")


if __name__ == "__main__":
    main()
