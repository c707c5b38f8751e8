"""The `lfm` command: info, init, generate, chat — run as a user runs them, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def lfm(*args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "lfm.cli", *args], input=stdin, capture_output=True, text=True,
                       env=ENV, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("name,total,active", [
    ("LiquidAI/LFM2.5-350M", "354,483,968", "354,483,968"),
    ("LFM2.5-1.2B", "1,170,340,608", "1,170,340,608"),
    ("LFM2-2.6B", "2,569,272,320", "2,569,272,320"),
    ("LiquidAI/LFM2-8B-A1B", "8,339,929,856", "1,557,740,288"),
])
def test_info_prints_the_published_parameter_counts(name, total, active, tmp_path):
    out = lfm("info", name).stdout
    assert f"total {total}" in out and f"active/token {active}" in out
    if "350M" in name:
        assert "10 conv + 6 attention (at 2, 5, 8, 10, 12, 14)" in out
        assert "12.00 KiB/token" in out and "384.00 MiB at 32K" in out and "40.00 KiB per sequence" in out


def test_info_reads_a_checkpoint_config(checkpoints):
    out = lfm("info", str(checkpoints["moe"])).stdout
    assert "[lfm2_moe; config.json]" in out and "8 experts x 32, top-2" in out


def test_init_then_generate_streams_text(tmp_path):
    lfm("init", "tiny", "-o", str(tmp_path / "m"))
    p = lfm("generate", str(tmp_path / "m"), "Once upon a time", "--max-tokens", "8", "--temperature", "0")
    assert p.stdout.startswith("Once upon a time") and len(p.stdout) > len("Once upon a time\n")
    again = lfm("generate", str(tmp_path / "m"), "Once upon a time", "--max-tokens", "8", "--temperature", "0.9",
                "--seed", "3").stdout
    assert again == lfm("generate", str(tmp_path / "m"), "Once upon a time", "--max-tokens", "8", "--temperature",
                        "0.9", "--seed", "3").stdout


def test_chat_session_with_commands_and_ctrl_d(checkpoints):
    p = lfm("chat", str(checkpoints["dense"]), "--max-tokens", "5", "--temperature", "0",
            stdin="hello\n/system Be brief.\nhi again\n/reset\nthird\n")
    assert p.stdout.count(">>> ") == 6  # five prompts answered or handled, then the prompt that met Ctrl-D
    assert "conversation cleared" in p.stderr and "system prompt set" in p.stderr
    assert p.stderr.count("tok/s") == 3  # a speed line under each of the three replies


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    p = lfm("generate", str(tmp_path / "nope"), "hi", ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("lfm: error:") and "no such file or directory" in p.stderr
    p = lfm("info", "LiquidAI/not-a-model", ok=False)
    assert p.returncode == 2 and "hf download" in p.stderr and "Traceback" not in p.stderr
    p = lfm("generate", str(tmp_path), "hi", "--max-tokens", "0", ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    if not torch.cuda.is_available():  # a GPU asked of a CPU-only torch: one line naming the way out
        for args in (("bench", "tiny", "--device", "cuda"), ("generate", "tiny", "hi", "--device", "cuda")):
            p = lfm(*args, ok=False)
            assert p.returncode == 2 and "Traceback" not in p.stderr and "--device cpu" in p.stderr, p.stderr
    p = lfm("generate", "tiny", "hi", "--device", "gpu0", ok=False)  # not a device torch knows
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "lfm: error: unknown device 'gpu0': use cpu or cuda (cuda:N for one " \
                                                "of several GPUs)"


def test_cli_on_a_checkpoint_saved_by_transformers(tmp_path, tokenizer_dir):
    """The user path the issue names: a model and tokenizer written by transformers' save_pretrained."""
    import torch
    from transformers import AutoTokenizer, Lfm2Config, Lfm2ForCausalLM

    from .conftest import DENSE

    cfg = Lfm2Config(**{k: v for k, v in DENSE.items() if k != "model_type"})
    torch.manual_seed(0)
    Lfm2ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "hf")
    d = str(tmp_path / "hf")
    assert "[lfm2; config.json]" in lfm("info", d).stdout
    out = lfm("generate", d, "Hello there", "--max-tokens", "6", "--temperature", "0").stdout
    assert out.startswith("Hello there")
    p = lfm("chat", d, "--max-tokens", "4", "--temperature", "0", stdin="hi\n")
    assert p.stdout.count(">>> ") == 2
