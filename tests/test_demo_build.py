"""`python -m lfm.train.demo.build` end to end at toy size: every stage runs (pretrain, SFT, GRPO), the card records
`lfm eval` before and after GRPO, and a second call finds every stage finished and does not train again."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lfm.train.demo.build import build


def test_build_runs_every_stage_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out, work = tmp_path / "demo", tmp_path / "work"
    card = build(out, work, pretrain_steps=2, sft_steps=2, threads=1, max_chars=200_000, grpo_steps=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "card.json", "grpo-metrics.jsonl",
                 "grpo-loss.png", "grpo.toml", "sft-metrics.jsonl", "pretrain-metrics.jsonl"):
        assert (out / name).is_file(), name
    for key in ("eval_before_grpo", "eval_after_grpo"):
        assert set(card[key]) == {"tools", "ifeval-lite"}
        assert 0 <= card[key]["tools"]["accuracy"] <= 1 and 0 <= card[key]["ifeval-lite"]["prompt_accuracy"] <= 1
    assert card["grpo"]["steps"] == 1 and card["grpo_minutes"] > 0
    rows = [json.loads(x) for x in (out / "grpo-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1]
    assert json.loads((work / "data" / "grpo.jsonl").read_text().splitlines()[0])["messages"]
    # the shipped step: the best greedy validation reward (the SFT start is step 0), ties to fewer steps
    val = {int(k): v for k, v in card["grpo_validation_reward"].items()}
    assert sorted(val) == [0, 1] and all(0 <= v <= 1 for v in val.values())
    assert card["grpo_step_shipped"] == (1 if val[1] > val[0] else 0)

    again = build(out, work, pretrain_steps=2, sft_steps=2, threads=1, max_chars=200_000, grpo_steps=1)
    metrics = [json.loads(x) for x in (out / "grpo-metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(rows)  # nothing trained again: the finished runs were found
    assert again["eval_after_grpo"] == card["eval_after_grpo"]
