"""Naming models on the command line: `demo`, a path before a preset of the same name, `lfm list`, `lfm pull`
(offline path only: tests never download), `lfm info` with no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfm.hub import cached_models, list_text
from lfm.model.checkpoint import DEMO_MODEL, resolve, resolve_config


def lfm(*args: str, cwd: Path | None = None, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "lfm.cli", *args], capture_output=True, text=True, timeout=300,
                       cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), **(env or {})})
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_demo_is_a_name_and_a_path_wins(tmp_path, monkeypatch):
    assert resolve("demo") == resolve(None) == DEMO_MODEL
    assert resolve_config("demo").hidden_size == 256
    (tmp_path / "demo").mkdir()  # a local directory called demo is that directory
    monkeypatch.chdir(tmp_path)
    assert resolve("demo") == Path("demo")


def test_quantize_demo_by_name(tmp_path):
    """The issue's `lfm quantize demo -o d4`; the int4 copy then chats, and a dense model shows no experts bar."""
    p = lfm("quantize", "demo", "-o", str(tmp_path / "d4"))
    assert "wrote" in p.stdout and (tmp_path / "d4" / "config.json").exists()
    assert "experts" not in p.stderr and "0layer" not in p.stderr and "quantizing to int4" in p.stderr
    assert json.loads((tmp_path / "d4" / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_info_without_a_model_describes_the_demo():
    out = lfm("info").stdout
    assert out.startswith("demo  [lfm2; config.json]") and "8: 5 conv + 3 attention" in out


def test_a_directory_named_like_a_preset_is_not_the_preset(tmp_path):
    (tmp_path / "tiny").mkdir()  # a broken local checkpoint called `tiny`: its own error, not the preset's shape
    p = lfm("info", "tiny", cwd=tmp_path, ok=False)
    assert p.returncode == 2 and "config.json" in p.stderr and "built-in preset" not in p.stdout
    lfm("init", "tiny", "-o", str(tmp_path / "tiny2"))  # a real checkpoint under a preset's name
    (tmp_path / "tiny").rmdir()
    (tmp_path / "tiny2").rename(tmp_path / "tiny")
    out = lfm("info", "tiny", cwd=tmp_path).stdout
    assert "[lfm2; config.json]" in out  # read from ./tiny/config.json
    elsewhere = lfm("info", "tiny", cwd=tmp_path / "tiny").stdout  # no ./tiny here: the preset
    assert "built-in preset" in elsewhere


def _fake_cached_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout (models--OWNER--NAME/{blobs,snapshots/REV,refs/main}), written by hand."""
    d = cache / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(rev)
    for name, data in files.items():
        blob = d / "blobs" / f"{abs(hash(name)):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = d / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_list_shows_demo_cached_lfm_models_and_presets(tmp_path):
    cache = tmp_path / "hub"
    _fake_cached_repo(cache, "LiquidAI/LFM2.5-350M", {"config.json": json.dumps({"model_type": "lfm2"}).encode(),
                                                      "model.safetensors": b"\0" * 3_000_000})
    _fake_cached_repo(cache, "someone/a-gguf", {"m-Q4_K_M.gguf": b"GGUF" + b"\0" * 1000})
    _fake_cached_repo(cache, "openai/gpt-oss", {"config.json": json.dumps({"model_type": "gpt_oss"}).encode()})
    found = cached_models(cache)
    assert [(m.repo_id, m.kind) for m in found] == [("LiquidAI/LFM2.5-350M", "checkpoint"), ("someone/a-gguf", "gguf")]
    text = list_text(cache)
    assert text.splitlines()[0].split() == ["NAME", "SIZE", "WHERE"]
    row = next(ln for ln in text.splitlines() if ln.startswith("LiquidAI/LFM2.5-350M"))
    assert " 3 MB " in row  # as Ollama writes sizes: MB whole, GB with a decimal
    assert text.splitlines()[1].startswith("demo") and "gpt-oss" not in text and "LFM2-8B-A1B" in text
    p = lfm("list", env={"HF_HUB_CACHE": str(cache)})
    assert "LiquidAI/LFM2.5-350M" in p.stdout and "demo" in p.stdout
    empty = lfm("list", env={"HF_HUB_CACHE": str(tmp_path / "none")}).stdout
    assert "lfm pull" in empty  # nothing cached: says how to get a model


def test_pull_offline_is_one_clear_line(tmp_path):
    p = lfm("pull", "LiquidAI/LFM2.5-350M", env={"HF_HUB_CACHE": str(tmp_path / "hub")}, ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # one line
    assert p.stderr.startswith("lfm: error: cannot download LiquidAI/LFM2.5-350M: HF_HUB_OFFLINE is set")
    bad = lfm("pull", "not a repo", ok=False)
    assert bad.returncode == 2 and "not a Hugging Face Hub id" in bad.stderr


def test_pull_offline_of_a_cached_model_says_where_it_is(tmp_path):
    cache = tmp_path / "hub"
    _fake_cached_repo(cache, "LiquidAI/LFM2.5-350M", {"config.json": b'{"model_type": "lfm2"}'})
    p = lfm("pull", "LiquidAI/LFM2.5-350M", env={"HF_HUB_CACHE": str(cache)})
    assert "already in the cache" in p.stdout and "lfm chat LiquidAI/LFM2.5-350M" in p.stdout


@pytest.mark.parametrize("argv", [["chat", "--help"], ["pull", "--help"], ["list", "--help"]])
def test_new_commands_have_help(argv):
    assert "usage: lfm" in lfm(*argv).stdout
