"""GRPO: advantages and the clipped, importance-weighted loss equal a hand-written reference; rollouts run on the
policy module itself and their log-probabilities equal the trainer's (float32); GRPO raises the reward on a toy
verifiable task while a shuffled-reward control does not; a killed run resumes bit for bit; every reward function
on hand-made cases."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lfm.train.config import TrainConfig, TrainConfigError
from lfm.train.data import DataError
from lfm.train.grpo import GrpoTrainer, group_advantages, grpo_loss
from lfm.train.loop import make_trainer
from lfm.train.rewards import RewardError, combined, exact, json_schema, load_reward, regex, tool_call

from .test_train_resume import torchrun

TIMING = {"tokens_per_s", "rollouts_per_s", "sample_tokens_per_s"}


# ---------------------------------------------------------------- advantages and loss


def test_group_advantages_equal_reference():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 0.0])
    adv, keep = group_advantages(r, 4)
    for g in range(3):
        xs = r[4 * g:4 * g + 4].tolist()
        mean = sum(xs) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)  # unbiased, as torch.std / TRL
        for j in range(4):
            assert adv[4 * g + j].item() == pytest.approx((xs[j] - mean) / (std + 1e-4), abs=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4  # the all-equal group is dropped
    adv2, _ = group_advantages(r, 4, scale=False)
    assert adv2[:4].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def reference_loss(lp, old, samp, adv, mask, cl, ch, cap, ref=None, beta=0.0):
    loss = clipped = kl_sum = 0.0
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not mask[i][t]:
                continue
            ratio = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            unclipped, clip = ratio * a, min(max(ratio, 1 - cl), 1 + ch) * a
            w = min(math.exp(old[i][t] - samp[i][t]), cap)
            per = -w * min(unclipped, clip)
            clipped += clip < unclipped
            if ref is not None:
                k3 = math.exp(ref[i][t] - lp[i][t]) - (ref[i][t] - lp[i][t]) - 1
                per += beta * k3
                kl_sum += k3
            loss += per
    return loss, clipped, kl_sum


def test_grpo_loss_equals_reference_on_a_toy_batch():
    g = torch.Generator().manual_seed(0)
    n, T = 4, 6
    old = -torch.rand(n, T, generator=g) * 3
    lp = (old + torch.randn(n, T, generator=g) * 0.4).requires_grad_()  # ratios well outside [0.8, 1.28]
    samp = old + torch.randn(n, T, generator=g) * 0.9  # some importance weights hit the cap
    ref = old + torch.randn(n, T, generator=g) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5])
    mask = torch.rand(n, T, generator=g) > 0.25
    out = grpo_loss(lp, old, samp, adv, mask, 0.2, 0.28, 1.5, ref, 0.05)
    want, clipped, kl = reference_loss(lp.tolist(), old.tolist(), samp.tolist(), adv.tolist(), mask.tolist(),
                                       0.2, 0.28, 1.5, ref.tolist(), 0.05)
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-5)
    assert float(out["clipped"]) == clipped and clipped > 0
    assert float(out["kl"]) == pytest.approx(kl, rel=1e-5)
    # the gradient flows only through unclipped tokens (and the KL term): finite differences agree
    out["loss"].backward()
    eps = 1e-3
    for i, t in [(0, 1), (1, 3), (3, 0), (2, 5)]:
        if not mask[i, t]:
            continue
        plus, minus = lp.detach().clone(), lp.detach().clone()
        plus[i, t] += eps
        minus[i, t] -= eps
        f = lambda x: reference_loss(x.tolist(), old.tolist(), samp.tolist(), adv.tolist(), mask.tolist(),  # noqa: E731
                                     0.2, 0.28, 1.5, ref.tolist(), 0.05)[0]
        assert lp.grad[i, t].item() == pytest.approx((f(plus) - f(minus)) / (2 * eps), abs=2e-3)


# ---------------------------------------------------------------- rewards


def test_rewards_on_hand_made_cases(tmp_path, monkeypatch):
    assert exact(" 42\n", {"answer": "42"}) == 1.0 and exact("42.", {"answer": "42"}) == 0.0
    assert regex("so it is 42.", {"answer_regex": r"\b42\b"}) == 1.0 and regex("421", {"answer_regex": r"\b42\b"}) == 0
    with pytest.raises(RewardError, match="answer_regex"):
        regex("x", {})
    with pytest.raises(RewardError, match="bad answer_regex"):
        regex("x", {"answer_regex": "("})
    schema = {"type": "object", "required": ["k"], "properties": {"k": {"type": "integer"}}}
    assert json_schema('{"k": 3}', {"schema": schema}) == 1.0
    assert json_schema('```json\n{"k": 3}\n```', {"schema": schema}) == 1.0
    assert json_schema('{"k": "3"}', {"schema": schema}) == 0.0  # wrong type
    assert json_schema('{"j": 3}', {"schema": schema}) == 0.0  # key missing
    assert json_schema('{"k": 3', {"schema": schema}) == 0.0  # not JSON
    assert json_schema('{"k": 3, "c": "x"}', {"schema": schema, "fields": {"k": 3, "c": "y"}}) == 0.75
    with pytest.raises(RewardError, match="schema is not valid"):
        json_schema('{"k": 3}', {"schema": {"type": "nope"}})
    ref = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert tool_call('<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>', ref) == 1.0
    assert tool_call('<|tool_call_start|>[get_weather(city="Rome")]<|tool_call_end|>', ref) == 0.5
    assert tool_call('<|tool_call_start|>[get_time()]<|tool_call_end|>', ref) == 0.0
    assert tool_call("It is sunny in Paris.", ref) == 0.0
    openai_style = {"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert tool_call('<|tool_call_start|>[f(a=1)]<|tool_call_end|>', openai_style) == 1.0
    # IFEval-kind instructions through lfm.eval.checks: the share followed
    inst = {"instructions": [{"id": "punctuation:no_comma", "kwargs": {}},
                             {"id": "length_constraints:number_words", "kwargs": {"relation": "less than",
                                                                                  "num_words": 5}}]}
    assert load_reward("instructions")("two words", inst) == 1.0
    assert load_reward("instructions")("one, two", inst) == 0.5
    assert load_reward("instructions")("one, two, three, four, five, six", inst) == 0.0
    with pytest.raises(RewardError, match="bad instruction list"):
        load_reward("instructions")("x", {"instructions": [{"id": "no:such"}]})
    # module:function of the user's, and weighted sums
    (tmp_path / "my_rewards.py").write_text("def short(completion, record):\n    return float(len(completion) < 5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:short")("abc", {}) == 1.0
    both = combined(["exact", "my_rewards:short"], [2.0, 0.5])
    assert both("42", {"answer": "42"}) == 2.5
    with pytest.raises(RewardError, match="unknown reward"):
        load_reward("nope")
    with pytest.raises(RewardError, match="cannot import"):
        load_reward("no_such_module_xyz:f")


# ---------------------------------------------------------------- the trainer


def write_prompts(path: Path, n: int = 16, **extra) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}: the answer is", **extra}) + "\n")
    return path


def grpo_cfg(tmp_path: Path, tokenizer_dir: Path, name: str, steps: int = 30, batch_size: int = 2,
             **grpo) -> TrainConfig:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts, answer_regex="k")
    return TrainConfig.from_dict({
        "out_dir": str(tmp_path / name), "steps": steps, "batch_size": batch_size, "save_every": 0, "eval_every": 0,
        "threads": 1, "model": {"init": "tiny", "tokenizer": str(tokenizer_dir), "seed": 0},
        "data": {"task": "grpo", "train": [str(prompts)], "seq_len": 64},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
        "grpo": {"group_size": 8, "max_tokens": 6, "rewards": ["regex"], **grpo}})


def trainer_logprobs(model, s, temperature):
    full = torch.tensor([s.prompt_ids + s.ids])
    with torch.no_grad():
        lsm = torch.log_softmax(model(full).float() / temperature, -1)[0]
    P = len(s.prompt_ids)
    return torch.stack([lsm[P - 1 + j, t] for j, t in enumerate(s.ids)])


@pytest.mark.parametrize("model,temperature,dtype", [("tiny", 1.0, "float32"), ("tiny", 0.7, "float32"),
                                                     ("tiny-moe", 1.0, "float32"), ("tiny", 1.0, "bfloat16")])
def test_rollouts_use_the_policy_module_and_match_trainer_logprobs(tmp_path, tokenizer_dir, model, temperature, dtype):
    cfg = grpo_cfg(tmp_path, tokenizer_dir, "gap", temperature=temperature)
    cfg.model.init, cfg.model.dtype = model, dtype
    tol = 1e-5 if dtype == "float32" else 5e-2  # bfloat16: paged decode and full forward round differently
    t = make_trainer(cfg, progress=False)
    assert isinstance(t, GrpoTrainer)
    assert t.rollouts.engine.model is t.model  # no copy: the engine runs the module the optimizer updates
    trained = 0
    for _ in range(4):
        rec = t.train_step()  # the weights move; the sampler must follow with no sync
        if rec["groups_kept"] > 0:
            trained += 1
            assert rec["logprob_gap_max"] <= tol, rec
            assert abs(rec["is_weight"] - 1.0) <= tol
    assert trained >= 2
    assert t.model.training  # back in train mode after the rollout
    _, samples = t.sample()
    for s in samples:
        assert len(s.logprobs) == len(s.ids) > 0
        gap = (trainer_logprobs(t.model, s, temperature) - torch.tensor(s.logprobs)).abs().max().item()
        assert gap <= tol, gap


def _mean_reward(recs):
    return sum(r["reward_mean"] for r in recs) / len(recs)


def test_grpo_raises_the_reward_and_a_shuffled_control_does_not(tmp_path, tokenizer_dir):
    # the task: the completion contains a "k" (verifiable by the built-in regex reward; ~10% of random samples do)
    real = make_trainer(grpo_cfg(tmp_path, tokenizer_dir, "real"), progress=False)
    shuf = make_trainer(grpo_cfg(tmp_path, tokenizer_dir, "shuf", shuffle_rewards=True), progress=False)
    a = [real.train_step() for _ in range(30)]
    b = [shuf.train_step() for _ in range(30)]
    assert a[0]["reward_mean"] == b[0]["reward_mean"] < 0.3  # same seed: the same first rollout
    assert _mean_reward(a[-5:]) >= 0.8, [r["reward_mean"] for r in a]
    assert _mean_reward(b[-5:]) <= 0.4, [r["reward_mean"] for r in b]
    for r in a:
        assert set(r) >= {"reward_mean", "reward_std", "response_len", "groups_kept", "rollouts_per_s"}
        if r["groups_kept"] > 0:
            assert set(r) >= {"entropy", "clip_frac", "logprob_gap", "logprob_gap_max", "is_weight"}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_grpo_run_resumes_bit_for_bit(tmp_path, tokenizer_dir):
    kw = dict(steps=6, kl_coef=0.05, updates_per_rollout=2)
    full = grpo_cfg(tmp_path, tokenizer_dir, "full", **kw)
    full.save_every = 3
    make_trainer(full, progress=False).run()
    cut = grpo_cfg(tmp_path, tokenizer_dir, "cut", **kw)
    cut.save_every = 3
    t = make_trainer(cut, progress=False)
    for _ in range(4):  # step 3 is checkpointed, step 4 is logged, then the process "dies"
        rec = t.train_step()
        rec.pop("processed_tokens")  # what run() does (it turns it into tokens_per_s)
        t.log(rec)
        if t.step == 3:
            t.save()
    del t
    resumed = make_trainer(cut, resume=True, progress=False)
    assert resumed.step == 3
    resumed.run()
    want, got = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert len(want) == 6 and got == want
    assert any(r.get("clip_frac", 0) > 0 for r in want) and any("kl" in r for r in want)


def test_grpo_config_and_data_errors(tmp_path, tokenizer_dir):
    cfg = grpo_cfg(tmp_path, tokenizer_dir, "bad", group_size=1)
    with pytest.raises(TrainConfigError, match="group_size"):
        cfg.validate()
    cfg = grpo_cfg(tmp_path, tokenizer_dir, "bad2", max_tokens=60)
    with pytest.raises(DataError, match="exceed data.seq_len"):
        make_trainer(cfg, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    cfg = grpo_cfg(tmp_path, tokenizer_dir, "bad3")
    cfg.data.train = [str(tmp_path / "bad.jsonl")]
    with pytest.raises(DataError, match="prompt record 0"):
        make_trainer(cfg, progress=False)


def test_fsdp2_two_ranks_sample_and_learn_as_one_process(tmp_path, tokenizer_dir):
    """Rollouts per rank on gathered FSDP2 shards: 2 ranks x batch 1 give the 1 x batch 2 run (same samples, since
    seeds follow the place in the global batch; gradients equal up to float reduction order)."""
    paths = {}
    for bs in (1, 2):
        cfg = grpo_cfg(tmp_path, tokenizer_dir, f"bs{bs}", steps=4, batch_size=bs)
        cfg.batch_size = bs
        paths[bs] = tmp_path / f"bs{bs}.toml"
        paths[bs].write_text(cfg.to_toml())
    make_trainer(TrainConfig.from_toml(paths[2]), progress=False).run()
    r = torchrun(paths[1])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _metrics(tmp_path / "bs2"), _metrics(tmp_path / "bs1")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["response_len"] == b["response_len"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b.get("logprob_gap_max", 0.0) <= 1e-5


def test_shipped_configs_parse_and_validate():
    root = Path(__file__).resolve().parents[1]
    g = TrainConfig.from_toml(root / "configs" / "grpo-tools.toml")
    g.validate()
    assert g.data.task == "grpo" and Path(g.data.train[0]).is_file() and g.grpo.rewards == ["tool_call"]
    rec = json.loads(Path(g.data.train[0]).read_text().splitlines()[0])
    assert {"messages", "tools", "tool_calls"} <= set(rec)
    d = TrainConfig.from_toml(root / "configs" / "distill-demo.toml")
    d.validate()
    assert d.data.task == "distill" and d.distill.top_k == 64 and Path(d.distill.cache).is_absolute()


def test_sigkilled_grpo_process_resumes_to_the_uninterrupted_metrics(tmp_path, tokenizer_dir):
    """A real kill: `python -m lfm.train` SIGKILLed mid-run, then `--resume`: every step's metrics equal the run
    that was never interrupted (float32, CPU)."""
    import os
    import signal
    import subprocess
    import time

    full = grpo_cfg(tmp_path, tokenizer_dir, "full", steps=16, kl_coef=0.05)
    full.save_every = 4
    make_trainer(full, progress=False).run()
    killed = grpo_cfg(tmp_path, tokenizer_dir, "killed", steps=16, kl_coef=0.05)
    killed.save_every = 4
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(killed.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "lfm.train", str(cfg_path), "--no-progress"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len(metrics.read_text().splitlines())
    assert 6 <= done < 16
    r = subprocess.run([sys.executable, "-m", "lfm.train", "--resume", str(tmp_path / "killed"), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
    assert len(want) == 16 and got == want


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tokenizer_dir):
    big = make_trainer(grpo_cfg(tmp_path, tokenizer_dir, "big", steps=4, batch_size=2), progress=False)
    acc_cfg = grpo_cfg(tmp_path, tokenizer_dir, "acc", steps=4, batch_size=1)
    acc_cfg.grad_accum = 2
    acc = make_trainer(acc_cfg, progress=False)
    for _ in range(4):
        a, b = big.train_step(), acc.train_step()
        assert a["reward_mean"] == b["reward_mean"] and a["tokens"] == b["tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
