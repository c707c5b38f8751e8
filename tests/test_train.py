"""Training: packing keeps documents apart, SFT masks, schedules, MoE balancing, the loop learns, outputs load."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .conftest import CONFIGS, random_model
from lfm.model.checkpoint import load_model
from lfm.text.tokenizer import Tokenizer
from lfm.train.balance import imbalance, update_expert_bias
from lfm.train.config import TrainConfig, TrainConfigError
from lfm.train.data import IGNORE, DataError, build_rows, pack_chats, pack_documents
from lfm.train.distributed import World
from lfm.train.loop import Trainer, lr_at

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


def write_docs(path: Path, n: int = 200, seed: int = 0) -> Path:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 50)))}) + "\n")
    return path


def write_chats(path: Path, n: int = 40) -> Path:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                msgs = [{"role": "user", "content": f"Weather in city {i}?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{i}"}}}]},
                        {"role": "tool", "content": "sunny"},
                        {"role": "assistant", "content": f"It is sunny in c{i}."}]
                f.write(json.dumps({"messages": msgs, "tools": tools}) + "\n")
            else:
                msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
                        {"role": "assistant", "content": f"{i}."}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def small_cfg(tmp_path: Path, tokenizer_dir: Path, **kw) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_dict({
        "out_dir": str(tmp_path / "run"), "steps": 12, "batch_size": 4, "save_every": 0, "eval_every": 0,
        "threads": 1, "model": {"init": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": [str(write_docs(tmp_path / "docs.jsonl"))], "seq_len": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2}})
    for k, v in kw.items():
        cfg.set(f"{k}={json.dumps(v)}")
    return cfg


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("name", ["dense", "moe", "dense-all-conv", "dense-mqa-kernel4-untied", "dense-conv-bias", "dense-kernel1-headdim32-kv1"])
def test_packed_rows_give_the_per_document_loss_of_unpacked(name):
    model = random_model(CONFIGS[name]).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(14, 512, (n,), generator=g).tolist() for n in (7, 1 + 12, 5, 20)]
    rows = pack_documents(docs, seq_len=sum(len(d) for d in docs) - 1)
    assert len(rows) == 1
    b = rows.take([0])
    logits = model(b["input_ids"], position_ids=b["position_ids"])
    packed = F.cross_entropy(logits[0], b["labels"][0], ignore_index=IGNORE, reduction="none")
    alone, mixed = [], []
    for d in docs:
        x = torch.tensor([d])
        alone.append(F.cross_entropy(model(x)[0, :-1], x[0, 1:], reduction="none"))
    ref = torch.cat(alone)
    got = packed[b["labels"][0] != IGNORE]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # the same row without document boundaries is different: the check above can fail
    naive = F.cross_entropy(model(b["input_ids"])[0], b["labels"][0], ignore_index=IGNORE, reduction="none")
    assert (naive[b["labels"][0] != IGNORE] - ref).abs().max() > 1e-3


def test_pack_documents_positions_and_labels():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]]
    rows = pack_documents(docs, seq_len=4)
    stream = sum(docs, [])
    assert len(rows) == (len(stream) - 1) // 4
    assert rows.tokens.ravel().tolist() == stream[:12]
    assert rows.positions.ravel().tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    # a label is the next token of the same document, never the next document's BOS
    assert rows.labels.ravel().tolist() == [5, 6, 2, IGNORE, 7, 2, IGNORE, 8, 9, 10, 11, 2]
    with pytest.raises(DataError, match="seq_len"):
        pack_documents([[1, 2, 3]], seq_len=8)


def test_sft_labels_are_exactly_the_assistant_turns(tmp_path, tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    path = write_chats(tmp_path / "chats.jsonl", n=4)
    rows = build_rows(tok, [str(path)], "sft", 256)
    labels = rows.labels[rows.labels != IGNORE].tolist()
    text = tok.decode(labels, skip_special_tokens=False)
    assert "<|tool_call_start|>[get_weather(city=\"c1\")]<|tool_call_end|>" in text
    assert "It is sunny in c1.<|im_end|>" in text and "0.<|im_end|>" in text
    for leaked in ("Be brief", "Weather in city", "sunny<", "<|im_start|>user", "system"):
        assert leaked not in text
    # conversations are never split across rows, and each restarts its positions
    assert (rows.positions[:, 0] == 0).all()
    with pytest.raises(DataError, match="messages"):
        build_rows(tok, [str(write_docs(tmp_path / "d.jsonl", 2))], "sft", 64)
    with pytest.raises(DataError, match="no conversations"):
        pack_chats([], 8, 0)


# ---------------------------------------------------------------- config and schedule


def test_schedules():
    cfg = TrainConfig.from_dict({"steps": 100, "optim": {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}})
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    cfg.optim.schedule = "wsd"
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[50] == 1.0 and lrs[79] == 1.0 and lrs[-1] == pytest.approx(0.1) and lrs[85] < 1.0


def test_config_errors_are_one_line(tmp_path, tokenizer_dir):
    with pytest.raises(TrainConfigError, match="unknown config key 'optim.lrr'"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(TrainConfigError, match="steps: expected int"):
        TrainConfig.from_dict({"steps": "many"})
    cfg = TrainConfig()
    cfg.set("optim.lr=0.01")
    cfg.set("model.init=tiny-moe")
    assert cfg.optim.lr == 0.01 and cfg.model.init == "tiny-moe"
    with pytest.raises(TrainConfigError, match="unknown key"):
        cfg.set("optim.nope=1")
    assert TrainConfig.from_dict(__import__("tomllib").loads(cfg.to_toml())) == cfg
    # the CLI turns them into one line and exit status 2, no traceback
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = 3\n[data]\ntrain = ['missing.jsonl']\n[model]\ntokenizer = '%s'\n" % tokenizer_dir)
    r = subprocess.run([sys.executable, "-m", "lfm.train", str(bad), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "missing.jsonl: no such data file" in r.stderr


# ---------------------------------------------------------------- the loop


def test_loss_decreases_and_outputs_load_everywhere(tmp_path, tokenizer_dir):
    cfg = small_cfg(tmp_path, tokenizer_dir, steps=25, eval_every=25, save_every=25)
    cfg.data.eval = [str(write_docs(tmp_path / "eval.jsonl", 30, seed=9))]
    final = Trainer(cfg, progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    assert rows[-1]["eval_loss"] < 5.5 and rows[-1]["eval_ppl"] == pytest.approx(np.exp(rows[-1]["eval_loss"]))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.toml").is_file()
    # the final model is a Hugging Face checkpoint: lfm and transformers load it and agree
    ours = load_model(final, dtype="float32")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    x = torch.randint(14, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    from lfm import LLM, SamplingParams
    out = LLM(str(final)).generate(["the cat"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) >= 1


def test_grad_accumulation_equals_one_big_batch(tmp_path, tokenizer_dir):
    a = Trainer(small_cfg(tmp_path / "a", tokenizer_dir, steps=3, batch_size=4, grad_accum=1), progress=False)
    b = Trainer(small_cfg(tmp_path / "b", tokenizer_dir, steps=3, batch_size=2, grad_accum=2), progress=False)
    la = [a.train_step()["loss"] for _ in range(3)]
    lb = [b.train_step()["loss"] for _ in range(3)]
    assert np.allclose(la, lb, rtol=1e-5), (la, lb)


def test_sft_run_and_lora_run(tmp_path, tokenizer_dir):
    chats = str(write_chats(tmp_path / "chats.jsonl"))
    base = small_cfg(tmp_path / "base", tokenizer_dir, steps=4)
    base_final = Trainer(base, progress=False).run()
    cfg = small_cfg(tmp_path / "lora", tokenizer_dir, steps=6, save_every=3)
    cfg.model.init, cfg.model.tokenizer = str(base_final), ""
    cfg.data.train, cfg.data.task, cfg.data.seq_len = [chats], "sft", 128
    cfg.lora.enabled, cfg.lora.merge = True, True
    t = Trainer(cfg, progress=False)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    final = t.run()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora" / "run" / "checkpoints" / "step_0000006" / "adapter" / "adapter_config.json").is_file()
    # merged model == base + adapter
    from lfm.train.lora import load_adapter
    with_adapter = load_model(base_final, dtype="float32")
    load_adapter(with_adapter, final / "adapter")
    merged = load_model(final / "merged", dtype="float32")
    x = torch.randint(14, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_adapter(x), atol=1e-5, rtol=1e-5)
        assert (merged(x) - load_model(base_final, dtype="float32")(x)).abs().max() > 1e-4


# ---------------------------------------------------------------- MoE


def test_expert_bias_update_moves_load_towards_balance():
    model = random_model(CONFIGS["moe"]).train()
    for m in model.modules():
        if hasattr(m, "expert_bias") and m.expert_bias is not None:
            m.expert_bias.zero_()
    x = torch.randint(14, 512, (4, 64), generator=torch.Generator().manual_seed(3))
    world = World()

    def measure() -> float:
        with torch.no_grad():
            model(x)
        return max(imbalance(v) for v in update_expert_bias(model, 0.0, world).values())

    before = measure()
    for _ in range(60):  # weights fixed: only the selection bias moves
        with torch.no_grad():
            model(x)
        update_expert_bias(model, 0.02, world)
    after = measure()
    assert after < before - 0.2, (before, after)
    bias = [m.expert_bias for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    assert all(abs(float(b.sum())) < 1e-4 for b in bias)  # updates are zero-mean


def test_moe_training_logs_expert_load_and_aux_loss(tmp_path, tokenizer_dir):
    cfg = small_cfg(tmp_path, tokenizer_dir, steps=3)
    cfg.model.init = "tiny-moe"
    cfg.moe.aux_loss_coef = 0.01
    t = Trainer(cfg, progress=False)
    rec = t.train_step()
    assert rec["aux_loss"] > 0 and rec["expert_load"]
    layer, load = next(iter(rec["expert_load"].items()))
    assert len(load) == 8 and sum(load) == 4 * 64 * 2  # every token picks 2 experts
    bias = dict(t.model.named_buffers())[layer + ".expert_bias"]
    assert bias.abs().sum() > 0  # the update ran


# ---------------------------------------------------------------- sources and options


def test_sources_parquet_txt_and_streaming_rows_agree(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lfm.train.data import StreamingRows, iter_records

    tok = Tokenizer.from_dir(tokenizer_dir)
    docs = [json.loads(x)["text"] for x in write_docs(tmp_path / "d.jsonl", 120).read_text().splitlines()]
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "t").mkdir()
    for i, d in enumerate(docs[:3]):
        (tmp_path / "t" / f"{i}.txt").write_text(d)
    assert [r["text"] for r in iter_records([str(tmp_path / "d.parquet")])] == docs
    assert list(iter_records([str(tmp_path / "t" / "*.txt")])) == docs[:3]
    whole = build_rows(tok, [str(tmp_path / "d.parquet")], "pretrain", 32)
    same = build_rows(tok, [str(tmp_path / "d.jsonl")], "pretrain", 32)
    assert (whole.tokens == same.tokens).all() and (whole.labels == same.labels).all()
    stream = StreamingRows(tok, [str(tmp_path / "d.parquet")], 32)
    got = [stream.take_range(i, 4) for i in range(0, 40, 4)]
    assert torch.equal(torch.cat([g["input_ids"] for g in got]), whole.take(list(range(40)))["input_ids"])
    # a resumed stream (fresh object, starts mid-way) serves the same rows
    again = StreamingRows(tok, [str(tmp_path / "d.parquet")], 32).take_range(20, 4)
    assert torch.equal(again["labels"], whole.take(list(range(20, 24)))["labels"])
    with pytest.raises(DataError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a")
        list(iter_records([str(tmp_path / "x.csv")]))
    with pytest.raises(DataError, match="not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"text": 1\n')
        list(iter_records([str(tmp_path / "bad.jsonl")]))


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model(CONFIGS["moe"]).train()
    x = torch.randint(14, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).repeat(2, 1)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        F.cross_entropy(model(x, position_ids=pos).flatten(0, 1), x.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_step_runs_and_learns(tmp_path, tokenizer_dir):
    cfg = small_cfg(tmp_path, tokenizer_dir, steps=8, bf16_autocast=True)
    t = Trainer(cfg, progress=False)
    losses = [t.train_step()["loss"] for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_expert_counts_are_not_doubled_by_activation_checkpointing():
    model = random_model(CONFIGS["moe"]).train()
    x = torch.randint(14, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    counts = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model(x, position_ids=torch.arange(16).repeat(2, 1)).sum().backward()
        counts.append(update_expert_bias(model, 0.0, World()))
    assert counts[0] == counts[1]


# ---------------------------------------------------------------- the command line's run handling


def test_resume_from_another_directory_with_relative_paths(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from lfm.train.cli import main
    from lfm.train.loop import config_of_run

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tokenizer_dir, work / "tok")
    write_docs(work / "docs.jsonl", 150)
    monkeypatch.chdir(work)
    args = ["--model", "tiny", "--tokenizer", "tok", "--data", "docs.jsonl", "--eval-data", "docs.jsonl", "--steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--out", "run", "--threads", "1", "--no-progress",
            "--set", "save_every=2", "--set", "eval_every=0", "--set", "keep_checkpoints=5"]
    assert main(args) == 0
    run = work / "run"
    first = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    stored = config_of_run(run)  # what --resume reads: absolute, whatever the working directory
    assert stored.data.train == [str(work / "docs.jsonl")] and stored.data.eval == [str(work / "docs.jsonl")]
    assert stored.model.tokenizer == str(work / "tok")
    # stopped after step 2; resumed from somewhere else (the run directory given relative to there)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["--resume", "../work/run", "--no-progress"]) == 0, capsys.readouterr().err
    again = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert again == first  # steps 3 and 4 redone from the same files: the same losses


def test_warmup_longer_than_the_run_warns(tmp_path, tokenizer_dir, capsys):
    Trainer(small_cfg(tmp_path / "a", tokenizer_dir, steps=5, **{"optim.warmup_steps": 5}), progress=False)
    assert "warmup" not in capsys.readouterr().err  # the last step reaches the peak: nothing to say
    Trainer(small_cfg(tmp_path / "b", tokenizer_dir, steps=5, **{"optim.warmup_steps": 50}), progress=False)
    err = capsys.readouterr().err
    # with warmup 50 the 5th and last step runs at 5/50 of the peak
    assert "optim.warmup_steps = 50 is longer than the run (steps = 5): the learning rate peaks at 0.0003," in err, err


def test_no_progress_prints_a_line_every_log_every_steps(tmp_path, tokenizer_dir, capsys):
    t = Trainer(small_cfg(tmp_path, tokenizer_dir, steps=5, log_every=2), progress=False)
    t.run()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["2/5", "4/5", "5/5"], out  # every 2 steps and the last
    recs = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert out[1].startswith(f"step 4/5  loss {recs[3]['loss']:.4f}  lr {recs[3]['lr']:.2e}")


def test_missing_tokenizer_suggests_the_demo_tokenizer_which_works(tmp_path, tokenizer_dir):
    from lfm.model.checkpoint import DEMO_MODEL

    cfg = small_cfg(tmp_path, tokenizer_dir, steps=1, **{"model.tokenizer": ""})
    with pytest.raises(TrainConfigError) as e:
        Trainer(cfg, progress=False)
    assert f"--tokenizer {DEMO_MODEL}" in str(e.value) and "\n" not in str(e.value)
    cfg.model.tokenizer = str(DEMO_MODEL)  # the suggestion, taken: a from-scratch toy run trains
    final = Trainer(cfg, progress=False).run()
    assert load_model(final).config.vocab_size == Tokenizer.from_dir(DEMO_MODEL).vocab_size
