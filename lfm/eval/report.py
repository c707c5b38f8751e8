"""Results of `lfm eval`: a text table, a JSON file and a bar chart PNG. Files are written whole or not at all
(a temporary file renamed into place), so an interrupted run never leaves a corrupt result."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .tasks import TaskResult

LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # shown on their own axis, not as a score in [0, 1]


def format_table(results: list[TaskResult]) -> str:
    rows = [("task", "metric", "value", "n")]
    for r in results:
        for k, v in r.metrics.items():
            rows.append((r.task, k + (" *" if k == r.primary else ""), f"{v:.4f}" if isinstance(v, float) else str(v),
                         str(r.n)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(* the task's main metric)"


def _atomic_write(path: Path, write: Any, suffix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, results: list[TaskResult], config: dict[str, Any]) -> None:
    payload = {"config": config,
               "results": {r.task: {"metrics": r.metrics, "primary": r.primary, "n": r.n} for r in results},
               "samples": {r.task: r.samples for r in results if r.samples}}

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(payload, indent=1, ensure_ascii=False,
                                        default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    _atomic_write(path, write, ".json")


def plot(path: Path, results: list[TaskResult], title: str) -> bool:
    """A bar per score (fractions, one colour per task) and, on a second axis, perplexities; False without
    matplotlib (the train extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scores = [(r.task, k, v) for r in results for k, v in r.metrics.items() if not k.endswith(LOWER_IS_BETTER)]
    ppl = [(r.task, k, v) for r in results for k, v in r.metrics.items() if k.endswith(LOWER_IS_BETTER)]
    panels = [p for p in (scores, ppl) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 0.45 * len(scores) + 3) + 4 * (len(panels) - 1), 4.5),
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, len(p)) for p in panels]})
    tasks = list(dict.fromkeys(r.task for r in results))
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(tasks)}
    for ax, items in zip(axes[0], panels):
        xs = range(len(items))
        bars = ax.bar(xs, [v for _, _, v in items], color=[colors[t] for t, _, _ in items])
        ax.set_xticks(list(xs), [f"{t}\n{k}" for t, k, _ in items], rotation=60, ha="right", fontsize=7)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if items is scores:
            ax.set_ylim(0, 1.08)
            ax.set_ylabel("score (higher is better)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("lower is better (log scale)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)
    return True
