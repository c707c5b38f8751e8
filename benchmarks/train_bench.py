"""Training throughput of a model shape through `lfm train`'s Trainer (random init, synthetic documents).

    python benchmarks/train_bench.py --preset LFM2.5-350M --seq-len 256 --batch 2 --steps 4 --threads 1
    python benchmarks/train_bench.py --demo --seq-len 256 --batch 16 --steps 6    # the demo model's shape

Prints tokens/s per step and the median over all but the first step (warm-up). float32 unless --bf16-autocast.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lfm.text.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from lfm.train.config import TrainConfig  # noqa: E402
from lfm.train.loop import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="LFM2.5-350M")
    p.add_argument("--demo", action="store_true", help="the demo model's shape (lfm/train/demo/pretrain.toml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--bf16-autocast", action="store_true")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lfm-train-bench-"))
    tok = build_tiny_tokenizer(tmp / "tok")
    r = random.Random(0)
    words = "the cat sat on a mat and the dog ran far away to see".split()
    with open(tmp / "d.jsonl", "w") as f:
        for _ in range(max(200, a.steps * a.batch * a.seq_len // 150)):
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(200))}) + "\n")
    model = {"init": a.preset, "tokenizer": str(tok), "overrides": {"vocab_size": 65536},
             "activation_checkpointing": a.activation_checkpointing}
    if a.demo:
        demo = tomllib.loads((ROOT / "lfm" / "train" / "demo" / "pretrain.toml").read_text())["model"]
        model.update(init=demo["init"], overrides={**demo["overrides"], "vocab_size": 4096})
    cfg = TrainConfig.from_dict({"out_dir": str(tmp / "run"), "steps": a.steps, "batch_size": a.batch, "save_every": 0,
                                 "eval_every": 0, "threads": a.threads, "bf16_autocast": a.bf16_autocast,
                                 "model": model, "data": {"train": [str(tmp / "d.jsonl")], "seq_len": a.seq_len}})
    t = Trainer(cfg, progress=False)
    n = sum(p.numel() for p in t.model.parameters())
    rates = []
    for i in range(a.steps):
        t0 = time.perf_counter()
        rec = t.train_step()
        rates.append(a.batch * a.seq_len / (time.perf_counter() - t0))
        print(f"step {i + 1}: loss {rec['loss']:.3f}, {rates[-1]:.0f} tokens/s", flush=True)
    rest = sorted(rates[1:] or rates)
    name = "demo shape" if a.demo else a.preset
    print(f"{name} ({n / 1e6:.1f}M params), {a.seq_len}-token rows x {a.batch}, threads {a.threads or 'default'}, "
          f"activation checkpointing {a.activation_checkpointing}: median {rest[len(rest) // 2]:.0f} tokens/s")


if __name__ == "__main__":
    main()
