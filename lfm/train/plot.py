"""The loss curves as a PNG beside the run's metrics (a person would rather look than read JSONL)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The records of metrics.jsonl. A line that is not a JSON record with an integer `step` (the half-written last
    line of a killed run, damage) is skipped, and named in `problems` when given: logs never block a resume."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.append(r)
        elif problems is not None:
            problems.append(f"{path}:{n}: not a metrics record, dropped ({line[:60]!r})")
    return rows


def plot_run(run_dir: Path) -> Path | None:
    """Write `loss.png` (train and eval loss per step, learning rate below); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if not train and not evals:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", lw=1.5, ms=3)
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        last = evals[-1][1]
        ax.set_title(f"{run_dir.name}: eval loss {last:.3f} (perplexity {math.exp(min(last, 50)):.1f})")
    if lrs:
        ax_lr.plot(*zip(*lrs), color="gray", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
