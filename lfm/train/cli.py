"""`lfm train`: a config file and/or flags in, a run directory out (checkpoints, metrics.jsonl, loss.png, final/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  lfm train configs/sft-demo.toml                                  # everything in the config file
  lfm train --model tiny --tokenizer TOKDIR --data corpus.jsonl --steps 200 --out runs/tiny
  lfm train --model LiquidAI/LFM2.5-350M --task sft --data chats.jsonl --lora --out runs/lora
  lfm train --resume runs/tiny                                     # continue after a stop or a crash
  torchrun --nproc_per_node 2 -m lfm.train CONFIG                  # the same run, FSDP2-sharded over 2 processes
"""


def add_train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("config", nargs="?", help="a TOML run config (see configs/); flags below override it")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest complete checkpoint")
    s.add_argument("--model", help="preset to train from scratch (tiny, LFM2.5-350M, ...) or a checkpoint / Hub id")
    s.add_argument("--tokenizer", help="tokenizer directory (needed when training a preset from scratch; for a toy "
                   "run, the demo model's: lfm/assets/demo)")
    s.add_argument("--task", choices=["pretrain", "sft", "distill", "grpo"],
                   help="documents (pretrain), chat jsonl (sft), distill (see [distill]) or grpo (prompt jsonl)")
    s.add_argument("--data", nargs="+", metavar="FILE", help="training files: .txt .jsonl .json .parquet, globs, hf:NAME")
    s.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out files for eval loss / perplexity")
    s.add_argument("--steps", type=int, help="optimizer steps")
    s.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    s.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    s.add_argument("--seq-len", type=int, help="tokens per packed row")
    s.add_argument("--lr", type=float, help="peak learning rate")
    s.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    s.add_argument("--out", help="run directory (checkpoints, metrics, plot, final model)")
    s.add_argument("--threads", type=int, help="torch threads per process")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.schedule=wsd --set model.activation_checkpointing=true")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a line every log_every steps instead (everything also goes to metrics.jsonl)")


def config_from_args(a: argparse.Namespace):
    from .config import TrainConfig, TrainConfigError
    from .loop import config_of_run

    if a.resume:
        if a.config:
            raise TrainConfigError("give either a config or --resume RUN_DIR (the run keeps its own config)")
        cfg = config_of_run(a.resume)
        cfg.out_dir = a.resume
    else:
        cfg = TrainConfig.from_toml(a.config) if a.config else TrainConfig()
    flags = {"model.init": a.model, "model.tokenizer": a.tokenizer, "data.task": a.task, "data.train": a.data,
             "data.eval": a.eval_data, "steps": a.steps, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
             "data.seq_len": a.seq_len, "optim.lr": a.lr, "out_dir": a.out, "threads": a.threads}
    for key, value in flags.items():
        if value is not None:
            *sec, last = key.split(".")
            obj = getattr(cfg, sec[0]) if sec else cfg
            setattr(obj, last, value)
    if a.lora:
        cfg.lora.enabled = True
    for s in a.set:
        cfg.set(s)
    return cfg


def cmd_train(a: argparse.Namespace) -> None:
    from .loop import train

    cfg = config_from_args(a)
    final = train(cfg, resume=bool(a.resume), progress=not a.no_progress)
    print(f"done: {final}  (metrics: {Path(cfg.out_dir) / 'metrics.jsonl'}, plot: {Path(cfg.out_dir) / 'loss.png'})")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="pretrain, SFT or LoRA-tune an LFM2 model (FSDP2 under torchrun)",
                       description="Train on the same model definition the engine runs. A run directory gets "
                       "config.toml, metrics.jsonl, loss.png, atomic checkpoints (resume with --resume) and final/.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(s)
    s.set_defaults(fn=cmd_train)


def main(argv: list[str] | None = None) -> int:
    """`python -m lfm.train CONFIG` (what torchrun launches): the same flags as `lfm train`."""
    from ..console import run_command

    p = argparse.ArgumentParser(prog="python -m lfm.train", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.set_defaults(fn=cmd_train)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
