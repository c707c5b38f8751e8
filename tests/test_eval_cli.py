"""`lfm eval`: the built-in tasks on the demo model write the table, results.json and the bar chart; task lists
parse; bad input is one line (exit 2) before the model loads; lm-eval tasks run through LfmLM from a local YAML
task, and an unreachable lm-eval dataset is one line. The built-in prompts are held out from the demo model's SFT
data: none is a phrasing its generator (lfm/train/demo/chat_data.py) can produce."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lfm.cli import main
from lfm.eval.cli import parse_tasks
from lfm.eval.tasks import DEFAULT_FILES, read_jsonl
from lfm.eval.tool_match import score_tool_calls

from .lm_eval_util import DATA, write_mc_task



def test_demo_model_builtin_tasks_write_table_json_and_png(tmp_path, capsys, one_thread):
    out = tmp_path / "res"
    rc = main(["eval", "--tasks", f"tools,json,ifeval-lite,mc:{DATA},ppl", "--limit", "4", "--max-tokens", "24",
               "-o", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    for task in ("tools", "json", "ifeval-lite", f"mc:{DATA}", "ppl"):
        assert task in cap.out
    assert "accuracy *" in cap.out and "bits_per_byte *" in cap.out
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"tools", "json", "ifeval-lite", f"mc:{DATA}", "ppl"}
    assert res["config"]["seed"] == 0 and res["config"]["temperature"] == 0.0
    for task, r in res["results"].items():
        assert r["n"] == (1 if task == "ppl" else 4)
        for k, v in r["metrics"].items():
            assert (v > 0 if "perplexity" in k or k == "bits_per_byte" else 0 <= v <= 1), (task, k, v)
    # the recorded outputs score to the reported accuracy
    rows = read_jsonl(DEFAULT_FILES["tools"])[:4]
    again = [score_tool_calls(s["output"], r["expected"], r["tools"]).correct
             for s, r in zip(res["samples"]["tools"], rows)]
    assert res["results"]["tools"]["metrics"]["accuracy"] == pytest.approx(sum(again) / 4)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_tasks():
    assert parse_tasks("tools,mc:a.jsonl,ppl") == [("tools", None), ("mc", "a.jsonl"), ("ppl", None)]
    assert parse_tasks("tools:t.jsonl,ifeval-lite:i.jsonl") == [("tools", "t.jsonl"), ("ifeval-lite", "i.jsonl")]
    assert parse_tasks("lm-eval:ifeval,mmlu_pro,gpqa_diamond_zeroshot,json") == [
        ("lm-eval", "ifeval"), ("lm-eval", "mmlu_pro"), ("lm-eval", "gpqa_diamond_zeroshot"), ("json", None)]
    for bad, msg in [("mmlu", "unknown task"), ("mc:a,mmlu", "unknown task"), ("lm-eval:", "needs a task"),
                     ("", "no task"), ("mc:", "give a file")]:
        with pytest.raises(ValueError, match=msg):
            parse_tasks(bad)


@pytest.mark.parametrize("args,msg", [(["--tasks", "nope"], "unknown task 'nope'"),
                                      (["--tasks", "mc:/no/such.jsonl"], "no such file"),
                                      (["--batch-size", "0"], "--batch-size")])
def test_bad_input_is_one_line(args, msg, capsys, tmp_path):
    assert main(["eval", *args, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "loading" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def _task(tmp: Path, name: str, dataset: str) -> None:
    write_mc_task(tmp, name, dataset)


def test_lm_eval_tasks_local_yaml_and_unreachable_data(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _task(tmp_path, "lfm_cli_tiny_mc", "json")
    _task(tmp_path, "lfm_cli_remote_mc", "lfm-no-such-org/no-such-dataset")
    rc = main(["eval", "--tasks", "lm-eval:lfm_cli_tiny_mc", "--include-path", str(tmp_path), "-o",
               str(tmp_path / "out"), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["lm-eval:lfm_cli_tiny_mc"]
    assert res["n"] == len(DATA.read_text().splitlines()) and 0 <= res["metrics"]["acc"] <= 1
    rc = main(["eval", "--tasks", "lm-eval:lfm_cli_remote_mc", "--include-path", str(tmp_path), "-o",
               str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    line = [x for x in err.splitlines() if x.startswith("lfm: error:")]
    assert len(line) == 1 and "lfm_cli_remote_mc could not run" in line[0] and "reachable" in line[0]
    assert not (tmp_path / "out2").exists()
    assert main(["eval", "--tasks", "lm-eval:lfm_no_such_task", "-o", str(tmp_path / "out3")]) == 2
    assert "no task named lfm_no_such_task" in capsys.readouterr().err


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{n\}|\{noun\}|\{t\})", template)
    fill = {"{n}": r"`?[\w.]+`?", "{noun}": r"\w+", "{t}": r".+"}
    return re.compile("".join(fill.get(p, re.escape(p)) for p in parts), re.IGNORECASE)


def test_builtin_prompts_are_not_demo_sft_phrasings():
    from lfm.train.demo import chat_data as cd

    templates = [_template_regex(t) for t in (*cd.ASK_DOC, *cd.ASK_MODULE, *cd.ASK_SIG, *cd.ASK_LIST, *cd.ASK_TOPIC,
                                              *cd.ASK_FOLLOW, *cd.ASK_BOTH)]
    small_talk = {u.lower() for users, _ in cd.SMALL_TALK for u in users}
    prompts = [r["messages"][-1]["content"] for r in read_jsonl(DEFAULT_FILES["tools"])]
    prompts += [r["prompt"] for r in read_jsonl(DEFAULT_FILES["json"]) + read_jsonl(DEFAULT_FILES["ifeval-lite"])]
    assert len(prompts) >= 80
    # the check can fail: an SFT phrasing is caught
    assert any(t.fullmatch("What does `json.dumps` do?") for t in templates)
    for p in prompts:
        assert p.lower() not in small_talk, p
        assert not any(t.fullmatch(p) for t in templates), p
    tools = read_jsonl(DEFAULT_FILES["tools"])
    assert sum(not r["expected"] for r in tools) >= 6  # no-call-needed items
    for r in tools:  # every reference call names an offered tool and its required parameter
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in r["tools"]}
        for e in r["expected"]:
            assert set(offered[e["name"]]["required"]) <= set(e["arguments"])


def test_parser_import_is_light():
    """`lfm eval` is registered by importing lfm.eval.cli: argparse only, no lm-eval, engine code or task modules
    (those load when the command runs). torch itself is lfm/__init__'s business."""
    import subprocess
    import sys

    code = ("import sys, lfm.eval.cli; mods = [m for m in ('lm_eval', 'lfm.eval.lm', 'lfm.eval.tasks', "
            "'lfm.eval.scoring', 'matplotlib', 'jsonschema') if m in sys.modules]; print(mods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("task,row,msg", [
    ("mc", {"question": "q", "choices": [" a", " b"], "answer": 2}, "answer must be the index"),
    ("ifeval-lite", {"prompt": "p", "instructions": [{"id": "keywords:nope"}]}, "unknown instruction id"),
    ("tools", {"messages": [], "tools": []}, "missing expected"),
    ("json", "not json", "not JSON")])
def test_bad_task_data_is_one_line_before_loading(task, row, msg, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
    assert main(["eval", "--tasks", f"{task}:{data}", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and str(data) in err and err.count("\n") == 1 and "loading" not in err
    assert not (tmp_path / "out").exists()
