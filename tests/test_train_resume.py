"""Crash safety and scale-out: SIGKILL mid-save never corrupts the latest checkpoint, resuming reproduces the
uninterrupted loss curve bit for bit, and FSDP2 over 2 processes equals 1 process (and their checkpoints swap)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lfm.train.config import TrainConfig
from lfm.train.loop import Trainer

from .test_train import write_docs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def write_config(tmp_path: Path, tokenizer_dir: Path, name: str, model: str = "tiny", **top) -> Path:
    data = tmp_path / "docs.jsonl"
    if not data.exists():
        write_docs(data, 300)
    cfg = TrainConfig.from_dict({
        "out_dir": str(tmp_path / name), "steps": 8, "batch_size": 2, "save_every": 2, "eval_every": 0,
        "keep_checkpoints": 10, "threads": 1, "model": {"init": model, "tokenizer": str(tokenizer_dir)},
        "data": {"train": [str(data)], "seq_len": 48}, "optim": {"lr": 3e-3, "warmup_steps": 2}, **top})
    path = tmp_path / f"{name}.toml"
    path.write_text(cfg.to_toml())
    return path


# Run training in a child that SIGKILLs itself while writing the optimizer file of step 6's checkpoint.
KILLER = """
import os, signal, sys
import lfm.train.state as state
real = state.save_file
def dying(tensors, path, *a, **k):
    if "step_0000006" in str(path):
        real({k: v for k, v in list(tensors.items())[:1]}, path)  # a partial file, then the power goes out
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
state.save_file = dying
from lfm.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_save_then_resume_is_bitwise_identical(tmp_path, tokenizer_dir):
    ref_cfg = write_config(tmp_path, tokenizer_dir, "ref")
    Trainer(TrainConfig.from_toml(ref_cfg), progress=False).run()
    ref = losses(tmp_path / "ref")

    cfg = write_config(tmp_path, tokenizer_dir, "crash")
    r = subprocess.run([sys.executable, "-c", KILLER, str(cfg), "--no-progress"], env=ENV, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run = tmp_path / "crash"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000004"  # the half-written step 6 is not named
    assert (ckpts / ".tmp-step_0000006").exists() and not (ckpts / "step_0000006").exists()
    assert max(losses(run)) == 6  # steps 5 and 6 ran before the kill; they are redone

    r = subprocess.run([sys.executable, "-m", "lfm.train", "--resume", str(run), "--no-progress"], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = losses(run)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # float32 on CPU: exactly the uninterrupted curve
    assert not (ckpts / ".tmp-step_0000006").exists() or (ckpts / "step_0000006").exists()


def torchrun(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lfm.train", *( [str(cfg)] if cfg else []), "--no-progress", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def rewind(run: Path, step: int) -> None:
    """Make a finished run look as if it stopped right after the checkpoint of `step`."""
    ckpts = run / "checkpoints"
    for d in ckpts.glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (ckpts / "latest").write_text(f"step_{step:07d}\n")


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_fsdp2_two_processes_equal_one_and_checkpoints_swap(tmp_path, tokenizer_dir, model):
    one = write_config(tmp_path, tokenizer_dir, "one", model, batch_size=2)
    two = write_config(tmp_path, tokenizer_dir, "two", model, batch_size=1)  # same global batch of 2 rows
    Trainer(TrainConfig.from_toml(one), progress=False).run()
    r = torchrun(two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])

    # a checkpoint written by 2 ranks resumes on 1 ...
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(tmp_path / "two", two_to_one)
    rewind(two_to_one, 4)
    r = subprocess.run([sys.executable, "-m", "lfm.train", "--resume", str(two_to_one), "--no-progress",
                        "--set", "batch_size=2"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # ... and one written by 1 process resumes on 2
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(tmp_path / "one", one_to_two)
    rewind(one_to_two, 4)
    r = torchrun(None, "--resume", str(one_to_two), "--set", "batch_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    for run in (two_to_one, one_to_two):
        c = losses(run)
        assert sorted(c) == list(range(1, 9))
        for s in range(5, 9):
            assert abs(c[s] - a[s]) <= 1e-5 * abs(a[s]), (run.name, s, c[s], a[s])


# ---------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict[int, float]]:
    """An 8-step run with checkpoints at 2, 4, 6 and 8, and its loss curve (the uninterrupted reference)."""
    tmp = tmp_path_factory.mktemp("finished")
    Trainer(TrainConfig.from_toml(write_config(tmp, tokenizer_dir, "ref")), progress=False).run()
    return tmp / "ref", losses(tmp / "ref")


def stopped_after_6(finished_run, dst: Path) -> Path:
    """The finished run as if it had been killed after step 6's checkpoint and step 7's metrics line."""
    run = dst / "run"
    shutil.copytree(finished_run[0], run)
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    (run / "checkpoints" / "latest").write_text("step_0000006\n")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:7]))
    return run


def test_truncating_any_file_of_the_newest_checkpoint_falls_back(finished_run, tmp_path):
    from lfm.train.state import find_checkpoint

    run = stopped_after_6(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_0000006"
    files = ["trainer_state.json", "optimizer.json", "optimizer.safetensors", "model/config.json",
             "model/model.safetensors"]
    for rel in files:
        f = newest / rel
        good = f.read_bytes()
        end = len(good.rstrip())  # cutting only trailing whitespace leaves the file whole
        for cut in sorted({0, 1, 7, 8, 9, 100, end // 3, end // 2, end - 1} & set(range(end))):
            f.write_bytes(good[:cut])
            found, damaged = find_checkpoint(run)
            assert found == run / "checkpoints" / "step_0000004", (rel, cut)
            assert len(damaged) == 1 and str(f) in damaged[0] and "\n" not in damaged[0], (rel, cut, damaged)
        f.write_bytes(good)
        assert find_checkpoint(run) == (newest, [])
    for junk in (b"\x00" * 64, b"\xff\xfe garbage", b'{"format": 1, "step": "six"}', b"[]"):
        (newest / "trainer_state.json").write_bytes(junk)
        found, damaged = find_checkpoint(run)
        assert found.name == "step_0000004" and "trainer_state.json" in damaged[0], (junk, damaged)


@pytest.mark.parametrize("damage", ["optimizer-truncated", "trainer-state-garbage"])
def test_resume_past_a_damaged_checkpoint_reproduces_the_uninterrupted_run(finished_run, tmp_path, damage, capsys):
    from lfm.train.cli import main

    run = stopped_after_6(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_0000006"
    if damage == "optimizer-truncated":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f = newest / "trainer_state.json"
        f.write_bytes(os.urandom(f.stat().st_size))
    with open(run / "metrics.jsonl", "a") as m:
        m.write('{"step": 8, "loss": 2.')  # the half-written last line of a killed run
    assert main(["--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"skipping a damaged checkpoint: {f}" in err, err
    assert f"resuming from {run / 'checkpoints' / 'step_0000004'}" in err, err
    got = losses(run)
    assert sorted(got) == list(range(1, 9))
    assert got == finished_run[1]  # steps 5..8 redone from step 4: exactly the uninterrupted curve


def test_resume_with_every_checkpoint_damaged_starts_clean(finished_run, tmp_path, capsys):
    from lfm.train.cli import main

    run = stopped_after_6(finished_run, tmp_path)
    for d in (run / "checkpoints").glob("step_*"):
        (d / "trainer_state.json").write_text("{")
    assert main(["--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "no complete checkpoint to resume from; starting from step 0" in err, err
    assert losses(run) == finished_run[1]  # a clean start of the same config: the same curve


def test_load_checkpoint_names_the_damaged_file(finished_run, tmp_path):
    import torch

    from lfm.model.checkpoint import CheckpointError
    from lfm.train.distributed import World
    from lfm.train.state import load_checkpoint

    run = stopped_after_6(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_0000006"
    (newest / "optimizer.json").write_text('{"param_groups": ')
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"step_0000006/optimizer\.json: unreadable"):
        load_checkpoint(newest, model, torch.optim.AdamW(model.parameters()), World())
