"""A local lm-evaluation-harness multiple-choice task (YAML over tests/data/tiny_mc.jsonl): no downloads."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data" / "tiny_mc.jsonl"


def write_mc_task(tmp: Path, name: str, dataset: str = "json") -> Path:
    """Write `name.yaml` into `tmp` and return `tmp` (an lm-eval include path). `dataset="json"` reads the local
    jsonl; any other value is passed as `dataset_path` (e.g. an unreachable Hub id, to test the offline error)."""
    local = (f"dataset_kwargs:\n  data_files:\n    test: {DATA}\n  cache_dir: {tmp / 'hf-cache'}\n"
             if dataset == "json" else "")
    (tmp / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: {dataset}
{local}test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return tmp
