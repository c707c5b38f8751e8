"""The KV cache's default size (lfm/engine/memory.py): 4 GiB on CPU; on a GPU, vLLM's rule: gpu_memory_utilization
(default 0.9) of the device's memory, less what is in use and a step's measured need, becomes KV blocks."""

from __future__ import annotations

import pytest
import torch

from lfm import LLM
from lfm.engine.memory import CPU_KV_CACHE_MEMORY, GiB, gpu_kv_budget

from .conftest import DENSE, random_model


def test_gpu_budget_is_the_allowed_share_less_what_is_used_and_the_step():
    # an 80 GiB card, 2 GiB in use (weights + context), a step needing 3 GiB: 0.9 x 80 - 2 - 3 = 67 GiB of KV
    assert gpu_kv_budget(80 * GiB, 78 * GiB, 0.9, 3 * GiB) == int(0.9 * 80 * GiB) - 5 * GiB
    assert gpu_kv_budget(80 * GiB, 78 * GiB, 1.0, 0) == 78 * GiB  # everything that is free, nothing more


def test_gpu_budget_refuses_what_does_not_fit_with_one_line():
    with pytest.raises(ValueError, match=r"no GPU memory left for the KV cache: gpu_memory_utilization 0.5 allows "
                                         r"40.0 GiB of 80.0, 38.0 GiB are in use .* a step needs ~3.0 GiB"):
        gpu_kv_budget(80 * GiB, 42 * GiB, 0.5, 3 * GiB)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            gpu_kv_budget(80 * GiB, 80 * GiB, bad, 0)


def test_cpu_default_is_4_gib_and_an_explicit_size_wins():
    model = random_model(DENSE)
    assert LLM(model).engine.config.kv_cache_memory == CPU_KV_CACHE_MEMORY
    assert LLM(model, kv_cache_memory=1 << 20).engine.config.kv_cache_memory == 1 << 20
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        LLM(model, gpu_memory_utilization=1.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_default_takes_the_allowed_share_and_serves():
    model = random_model(DENSE).cuda()
    free, total = torch.cuda.mem_get_info()
    llm = LLM(model, gpu_memory_utilization=0.5, max_num_seqs=8, max_model_len=256)
    kv = llm.engine.config.kv_cache_memory
    assert 0 < kv <= 0.5 * total - (total - free)
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
