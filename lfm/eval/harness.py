"""lm-evaluation-harness tasks for `lfm eval --tasks lm-eval:NAME,...`: `simple_evaluate` with `LfmLM` over the
already-loaded engine. lm-eval fetches task data from the Hugging Face Hub; when that is unreachable (offline) or a
name is unknown, the user gets one line saying which tasks and why, not a traceback."""

from __future__ import annotations

import logging
import math
from typing import Any

from ..engine.llm import LLM
from .tasks import TaskResult


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip(": ")


def run_lm_eval(llm: LLM, names: list[str], batch_size: int | None, seed: int, limit: int | None,
                num_fewshot: int | None, apply_chat_template: bool, include_path: str | None, max_gen_toks: int,
                progress: bool) -> list[TaskResult]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm import LfmLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING if progress else logging.ERROR)
    lm = LfmLM(llm=llm, batch_size=batch_size or "auto", seed=seed, max_gen_toks=max_gen_toks)
    lm.scorer.progress = progress
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(f"lm-eval has no task named {', '.join(unknown)} (see `lm_eval ls tasks`)")
    try:
        out: dict[str, Any] | None = simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False)
    except (ConnectionError, OSError, RuntimeError, ValueError, KeyError, ImportError, LookupError) as e:
        raise ValueError(f"lm-eval task(s) {', '.join(names)} could not run: their data must be reachable (lm-eval "
                         f"downloads it from the Hugging Face Hub; offline, only local YAML tasks via --include-path "
                         f"run): {_one_line(e)}") from None
    if out is None:
        return []
    results = []
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isnan(float(value)):
                continue
            clean[name if filt in ("", "none") else f"{name} ({filt})"] = float(value)
        if clean:
            n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
            results.append(TaskResult(f"lm-eval:{task}", clean, next(iter(clean)), int(n)))
    return results
