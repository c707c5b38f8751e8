"""Demo GRPO prompts: held-in (none equals an `lfm eval` prompt), verifiable, and scored as `lfm eval` scores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm.eval.checks import follow_instructions
from lfm.eval.tool_match import score_tool_calls
from lfm.train.demo.corpus import build_corpus, read_jsonl
from lfm.train.demo.grpo_data import _norm, build_grpo_prompts, eval_prompts, reward, user_text

EVAL_DATA = Path(__file__).resolve().parents[1] / "lfm" / "eval" / "data"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    d = tmp_path_factory.mktemp("grpo_demo")
    build_corpus(d / "corpus.jsonl", max_chars=250_000)
    stats = build_grpo_prompts(d / "corpus.jsonl", d / "grpo.jsonl", n_tool=300, n_instruct=80, seed=3)
    return list(read_jsonl(d / "grpo.jsonl")), stats


def test_eval_prompts_read_both_eval_sets() -> None:
    held = eval_prompts()
    tools = [user_text(r) for r in read_jsonl(EVAL_DATA / "tools.jsonl")]
    ifeval = [r["prompt"] for r in read_jsonl(EVAL_DATA / "ifeval_lite.jsonl")]
    assert len(held) == len(set(map(_norm, tools + ifeval))) >= 60


def test_no_prompt_overlaps_the_eval_set(prompts: tuple[list[dict], dict]) -> None:
    rows, stats = prompts
    held = eval_prompts()
    assert stats["prompts"] == len(rows) == 380
    assert not {_norm(user_text(r)) for r in rows} & held
    # the references do not come from the eval either: no eval tool prompt (messages + tools) appears verbatim
    eval_msgs = {json.dumps(r["messages"]) for r in read_jsonl(EVAL_DATA / "tools.jsonl")}
    assert not {json.dumps([m for m in r["messages"] if m["role"] == "user"]) for r in rows} & eval_msgs


def test_kinds_and_references(prompts: tuple[list[dict], dict]) -> None:
    rows, stats = prompts
    assert set(stats["kinds"]) == {"doc", "sig", "list", "no_call", "instruct"}
    assert stats["kinds"]["instruct"] == 80 and stats["kinds"]["no_call"] == 36
    for r in rows:
        if r["kind"] == "instruct":
            assert "tools" not in r and r["instructions"]
            follow_instructions("some text", r["instructions"])  # every instruction is a known id with good kwargs
        else:
            assert sorted(t["function"]["name"] for t in r["tools"]) == ["get_signature", "list_functions", "lookup_doc"]
            want = {"doc": "lookup_doc", "sig": "get_signature", "list": "list_functions", "no_call": None}[r["kind"]]
            assert [e["name"] for e in r["expected"]] == ([want] if want else [])


def test_deterministic(prompts: tuple[list[dict], dict], tmp_path: Path) -> None:
    build_corpus(tmp_path / "corpus.jsonl", max_chars=250_000)
    build_grpo_prompts(tmp_path / "corpus.jsonl", tmp_path / "a.jsonl", n_tool=300, n_instruct=80, seed=3)
    assert list(read_jsonl(tmp_path / "a.jsonl")) == prompts[0]


def test_reward_is_the_eval_score(prompts: tuple[list[dict], dict]) -> None:
    rows, _ = prompts
    call = next(r for r in rows if r["kind"] == "sig")
    name = call["expected"][0]["arguments"]["name"][0]
    good = f'<|tool_call_start|>[get_signature(name="{name}")]<|tool_call_end|>'
    wrong_arg = '<|tool_call_start|>[get_signature(name="nothing.here")]<|tool_call_end|>'
    cut = f'<|tool_call_start|>[get_signature(name="{name}"'  # unclosed: the eval counts it as malformed
    assert reward(good, call) == 1.0 and score_tool_calls(good, call["expected"], call["tools"]).correct
    assert reward(wrong_arg, call) == 0.5
    assert reward(cut, call) == 0.0 and reward("It takes a name.", call) == 0.0
    no_call = next(r for r in rows if r["kind"] == "no_call")
    assert reward("Hello!", no_call) == 1.0 and reward(good, no_call) == 0.0
    inst = next(r for r in rows if r["kind"] == "instruct" and len(r["instructions"]) == 2)
    assert reward("a b", inst) == 1.0  # under any word limit drawn (>= 12), no comma
    assert reward("a, b", inst) == 0.5


def test_validation_split_is_disjoint_from_training_and_eval(prompts: tuple[list[dict], dict], tmp_path: Path) -> None:
    """The build's validation prompts (which pick the GRPO step shipped) share no text with the training prompts
    or `lfm eval`'s: the step is chosen on held-in data, and the eval stays held out."""
    build_corpus(tmp_path / "corpus.jsonl", max_chars=250_000)
    build_grpo_prompts(tmp_path / "corpus.jsonl", tmp_path / "train.jsonl", n_tool=300, n_instruct=80, seed=3)
    stats = build_grpo_prompts(tmp_path / "corpus.jsonl", tmp_path / "val.jsonl", n_tool=120, n_instruct=30, seed=2,
                               exclude=tmp_path / "train.jsonl")
    val = [_norm(user_text(r)) for r in read_jsonl(tmp_path / "val.jsonl")]
    train = {_norm(user_text(r)) for r in read_jsonl(tmp_path / "train.jsonl")}
    assert stats["prompts"] == len(val) == 150
    assert not set(val) & train and not set(val) & eval_prompts()
