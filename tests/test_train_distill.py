"""Distillation: the top-K + tail KL equals a hand-written reference and is 0 for student = teacher, the top-K
cache round-trips exactly (and refuses other rows), and the task trains: cached and online teachers give the same
run bit for bit, and the student moves towards the teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lfm.model.checkpoint import save_model
from lfm.train.config import TrainConfig, TrainConfigError
from lfm.train.data import IGNORE, pack_documents
from lfm.train.distill import DistillTrainer, distill_loss
from lfm.train.distributed import World
from lfm.train.loop import build_model, make_trainer
from lfm.text.tokenizer import Tokenizer
from lfm.train.topk_cache import CacheMeta, TopKCache, TopKCacheError, build_cache, rows_digest, teacher_topk

from .conftest import CONFIGS, random_model
from .test_train import write_docs
from .test_train_resume import torchrun


def reference_loss(logits, labels, t_idx, t_lp, T, alpha):
    """Position by position in float64: KL over the teacher's K tokens + the 'everything else' bucket, and CE."""
    total = kl_sum = ce_sum = 0.0
    L = logits.double().reshape(-1, logits.shape[-1])
    for n, y in enumerate(labels.reshape(-1).tolist()):
        if y == IGNORE:
            continue
        q = torch.softmax(L[n] / T, -1)
        p = t_lp.reshape(-1, t_lp.shape[-1])[n].double().exp()
        ids = t_idx.reshape(-1, t_idx.shape[-1])[n]
        kl = sum(float(p[j]) * math.log(float(p[j]) / float(q[ids[j]])) for j in range(len(ids)))
        p_rest, q_rest = 1 - float(p.sum()), 1 - float(q[ids].sum())
        if p_rest > 0:
            kl += p_rest * math.log(p_rest / q_rest)
        ce = -math.log(float(torch.softmax(L[n], -1)[y]))
        kl_sum += kl
        ce_sum += ce
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total, kl_sum, ce_sum


@pytest.mark.parametrize("T,alpha,K", [(1.0, 0.5, 8), (2.0, 1.0, 3), (0.7, 0.2, 40)])
def test_distill_loss_equals_reference(T, alpha, K):
    g = torch.Generator().manual_seed(0)
    V = 50
    student = torch.randn(2, 5, V, generator=g) * 2
    teacher = torch.randn(2, 5, V, generator=g) * 2
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = IGNORE
    t_idx, t_lp = teacher_topk(teacher, K, T)
    got = distill_loss(student, labels, t_idx, t_lp, T, alpha)
    want = reference_loss(student, labels, t_idx, t_lp, T, alpha)
    for g_, w in zip(got, want):
        if alpha == 1.0 and w == want[2]:
            continue  # CE is not computed when it has weight 0
        assert abs(float(g_) - w) <= 1e-4 * max(1.0, abs(w)), (float(g_), w)


def test_distill_loss_is_zero_for_student_equal_teacher_and_positive_otherwise():
    model = random_model(CONFIGS["dense"]).eval()
    ids = torch.randint(14, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids)
    labels = torch.roll(ids, -1, 1)
    for K in (1, 16, 512):
        t_idx, t_lp = teacher_topk(logits, K, 1.5)
        total, kl, _ = distill_loss(logits, labels, t_idx, t_lp, 1.5, 1.0)
        assert abs(float(kl)) < 1e-5 * labels.numel(), (K, float(kl))
        other = random_model(CONFIGS["dense"], seed=1)
        with torch.no_grad():
            _, kl2, _ = distill_loss(other(ids), labels, t_idx, t_lp, 1.5, 1.0)
        assert float(kl2) > 0.1


def test_tail_bucket_keeps_the_students_mass_outside_top_k():
    # teacher: 60% on token 0, the rest spread; student that copies only the top-1 (all mass on 0) is penalised,
    # the student equal to the teacher is not (a renormalised top-1 KL would call both perfect)
    t = torch.log(torch.tensor([0.6] + [0.4 / 9] * 9))
    t_idx, t_lp = teacher_topk(t[None], 1, 1.0)
    lab = torch.tensor([0])
    _, kl_same, _ = distill_loss(t[None], lab, t_idx, t_lp, 1.0, 1.0)
    _, kl_peaked, _ = distill_loss(torch.tensor([[20.0] + [0.0] * 9]), lab, t_idx, t_lp, 1.0, 1.0)
    assert abs(float(kl_same)) < 1e-6 and float(kl_peaked) > 1.0


def test_topk_cache_round_trips_exactly_and_checks_rows(tmp_path):
    model = random_model(CONFIGS["dense"]).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(14, 512, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (30,), generator=g)]
    rows = pack_documents(docs, 32)
    meta = CacheMeta(top_k=7, temperature=1.3, seq_len=32, num_rows=len(rows), rows_per_shard=5,
                     rows_sha256=rows_digest(rows), teacher="random")
    fwd = lambda b: model(b["input_ids"], position_ids=b["position_ids"])  # noqa: E731
    build_cache(tmp_path / "c", rows, fwd, meta, World(), batch_size=3, device=torch.device("cpu"))
    assert len(list((tmp_path / "c").glob("shard_*.safetensors"))) == -(-len(rows) // 5)
    cache = TopKCache(tmp_path / "c")
    cache.check(rows, 7, 1.3)
    pick = [len(rows) - 1, 0, 6, 5, 11]
    idx, lp = cache.take(pick)
    b = rows.take(pick)
    with torch.no_grad():
        want_i, want_lp = teacher_topk(model(b["input_ids"], position_ids=b["position_ids"]), 7, 1.3)
    assert torch.equal(idx, want_i) and torch.equal(lp, want_lp)
    with pytest.raises(TopKCacheError, match="top_k"):
        cache.check(rows, 8, 1.3)
    other = pack_documents(docs[::-1], 32)
    with pytest.raises(TopKCacheError, match="other training rows"):
        cache.check(other, 7, 1.3)
    with pytest.raises(TopKCacheError, match="not a finished"):
        TopKCache(tmp_path / "missing")


def _distill_cfg(tmp_path: Path, tokenizer_dir: Path, teacher: Path, name: str, **distill) -> TrainConfig:
    data = tmp_path / "docs.jsonl"
    if not data.exists():
        write_docs(data, 120)
    return TrainConfig.from_dict({
        "out_dir": str(tmp_path / name), "steps": 6, "batch_size": 2, "save_every": 0, "eval_every": 0, "threads": 1,
        "model": {"init": "tiny", "tokenizer": str(tokenizer_dir), "seed": 1},
        "data": {"task": "distill", "train": [str(data)], "seq_len": 48},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.0},
        "distill": {"teacher": str(teacher), "top_k": 16, "temperature": 1.0, "alpha": 1.0, **distill}})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    cfg = TrainConfig.from_dict({"model": {"init": "tiny", "tokenizer": str(tokenizer_dir), "seed": 7,
                                           "init_std": 0.1}})
    out = tmp_path_factory.mktemp("teacher") / "t"
    save_model(build_model(cfg, Tokenizer.from_dir(tokenizer_dir)).eval(), out, tokenizer_dir)
    return out


def test_distill_task_cached_equals_online_and_kl_falls(tmp_path, tokenizer_dir, teacher_dir):
    online = make_trainer(_distill_cfg(tmp_path, tokenizer_dir, teacher_dir, "online"), progress=False)
    assert isinstance(online, DistillTrainer) and online.teacher is not None
    cached = make_trainer(_distill_cfg(tmp_path, tokenizer_dir, teacher_dir, "cached",
                                       cache=str(tmp_path / "cache"), rows_per_shard=4), progress=False)
    assert cached.teacher is None and (tmp_path / "cache" / "cache.json").is_file()
    a = [online.train_step() for _ in range(6)]
    b = [cached.train_step() for _ in range(6)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the cache holds exactly what the teacher computes
    assert a[-1]["kl"] < 0.8 * a[0]["kl"], [r["kl"] for r in a]
    # a cache is reused without the teacher, and refuses a run whose K differs
    again = _distill_cfg(tmp_path, tokenizer_dir, teacher_dir, "again", cache=str(tmp_path / "cache"))
    again.distill.teacher = ""
    assert make_trainer(again, progress=False).cache is not None
    again.distill.top_k = 8
    with pytest.raises(TopKCacheError, match="top_k=16"):
        make_trainer(again, progress=False)


def test_distill_mixes_ce_and_config_errors(tmp_path, tokenizer_dir, teacher_dir):
    cfg = _distill_cfg(tmp_path, tokenizer_dir, teacher_dir, "mix", alpha=0.3)
    rec = make_trainer(cfg, progress=False).train_step()
    assert rec["loss"] == pytest.approx(0.3 * rec["kl"] + 0.7 * rec["ce"], rel=1e-5)
    bad = _distill_cfg(tmp_path, tokenizer_dir, teacher_dir, "bad")
    bad.distill.teacher = ""
    with pytest.raises(TrainConfigError, match="distill.teacher"):
        bad.validate()


def test_distill_under_fsdp2_equals_one_process(tmp_path, tokenizer_dir, teacher_dir):
    """Student sharded by FSDP2, teacher whole on each rank: 2 ranks x batch 1 = 1 process x batch 2."""
    paths = {}
    for bs in (1, 2):
        cfg = _distill_cfg(tmp_path, tokenizer_dir, teacher_dir, f"bs{bs}", alpha=0.5)
        cfg.batch_size, cfg.steps = bs, 4
        paths[bs] = tmp_path / f"bs{bs}.toml"
        paths[bs].write_text(cfg.to_toml())
    make_trainer(TrainConfig.from_toml(paths[2]), progress=False).run()
    r = torchrun(paths[1])
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = read(tmp_path / "bs2"), read(tmp_path / "bs1")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for k in ("loss", "kl", "ce"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (k, a, b)
