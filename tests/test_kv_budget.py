"""The KV cache's default size (lfm/engine/memory.py): 4 GiB on CPU; on a GPU, vLLM's rule: this engine's share,
gpu_memory_utilization (default 0.9) of the device's memory, less its weights and a step's measured need, becomes KV
blocks, never more than the device has free."""

from __future__ import annotations

import pytest
import torch

from lfm import LLM
from lfm.engine.memory import CPU_KV_CACHE_MEMORY, GiB, gpu_kv_budget

from .conftest import DENSE, random_model


def test_gpu_budget_is_this_engines_share_less_its_weights_and_the_step():
    # an 80 GiB card, 2 GiB of weights, a step needing 3 GiB: 0.9 x 80 - 2 - 3 = 67 GiB of KV
    assert gpu_kv_budget(80 * GiB, 77 * GiB, 2 * GiB, 0.9, 3 * GiB) == int(0.9 * 80 * GiB) - 5 * GiB
    # the share is per engine, as vLLM's: a second server at 0.45 beside a first one at 0.45 still gets its own
    first = gpu_kv_budget(80 * GiB, 78 * GiB, 1 * GiB, 0.45, 2 * GiB)
    assert gpu_kv_budget(80 * GiB, 80 * GiB - 36 * GiB - 2 * GiB, 1 * GiB, 0.45, 2 * GiB) == first
    # but never more than the device has free (another process holds 60 GiB): free less the step's need
    assert gpu_kv_budget(80 * GiB, 18 * GiB, 2 * GiB, 0.9, 3 * GiB) == 15 * GiB


def test_gpu_budget_refuses_what_does_not_fit_with_one_line():
    with pytest.raises(ValueError, match=r"no GPU memory left for the KV cache: gpu_memory_utilization 0.1 gives this "
                                         r"engine 8.0 GiB of 80.0, the weights take 6.0, a step needs ~3.0 and 74.0 "
                                         r"GiB are free"):
        gpu_kv_budget(80 * GiB, 74 * GiB, 6 * GiB, 0.1, 3 * GiB)
    with pytest.raises(ValueError, match="no GPU memory left"):  # the share is there, the device is full
        gpu_kv_budget(80 * GiB, 2 * GiB, 6 * GiB, 0.9, 3 * GiB)


def test_cpu_default_is_4_gib_and_an_explicit_size_wins():
    model = random_model(DENSE)
    assert LLM(model).engine.config.kv_cache_memory == CPU_KV_CACHE_MEMORY
    assert LLM(model, kv_cache_memory=1 << 20).engine.config.kv_cache_memory == 1 << 20
    for bad in (0.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            LLM(model, gpu_memory_utilization=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_default_takes_the_allowed_share_and_serves():
    model = random_model(DENSE).cuda()
    free, total = torch.cuda.mem_get_info()
    llm = LLM(model, gpu_memory_utilization=0.5, max_num_seqs=8, max_model_len=256)
    kv = llm.engine.config.kv_cache_memory
    assert 0 < kv <= min(0.5 * total, free)
    assert torch.cuda.memory_allocated() <= 0.5 * total  # weights + the (capped) pool stay inside the share
    out = llm.generate([[5, 6, 7]], None)
    assert out[0].token_ids


def test_serve_rejects_an_impossible_share_with_one_line():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "lfm.cli", "serve", "--gpu-memory-utilization", "2", "--port", "1"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "lfm: error: gpu_memory_utilization must be in (0, 1], got 2.0"
    assert "Traceback" not in p.stderr


def test_batch_defaults_follow_vllm_on_a_gpu(monkeypatch):
    """max_num_seqs / max_num_batched_tokens when the user names neither: this project's CPU values; on a GPU vLLM's
    (vllm/engine/arg_utils.py, EngineArgs.get_batch_defaults: >= 70 GiB and not an A100 -> LLM class 1024 / 16384,
    API server 1024 / 8192; otherwise 256 / 8192 and 256 / 2048). The GPU is faked: only its name and memory are
    read."""
    from types import SimpleNamespace

    from lfm.engine import memory

    assert memory.batch_defaults("cpu", server=False) == (256, 2048)
    assert memory.batch_defaults("cpu", server=True) == (64, 512)
    assert memory.batch_defaults("not-a-device", server=True) == (64, 512)  # loading says what is wrong
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, gib, llm, server in (("NVIDIA H100 80GB HBM3", 80, (1024, 16384), (1024, 8192)),
                                   ("NVIDIA A100-SXM4-80GB", 80, (256, 8192), (256, 2048)),
                                   ("NVIDIA L4", 24, (256, 8192), (256, 2048))):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, n=name, g=gib: SimpleNamespace(name=n, total_memory=g * GiB))
        assert memory.batch_defaults("cuda", server=False) == llm
        assert memory.batch_defaults("cuda:0", server=True) == server
    model = random_model(DENSE)
    engine = LLM(model).engine  # a CPU model: the CPU values, whatever CUDA says
    assert (engine.config.max_num_seqs, engine.config.max_num_batched_tokens) == (256, 2048)
