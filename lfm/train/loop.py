"""The training loop: one function, `train(cfg)`, for pretraining and SFT, full or LoRA, 1 process or FSDP2.

Loss is normalised by the number of trained tokens in the *global* batch (summed over micro-batches and ranks), so a
step computes the same gradient whatever the split into ranks and accumulation steps. Everything random is a
function of (seed, step, rank) and the data order of (seed, rows consumed), which is why a resumed run continues the
uninterrupted loss curve bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.checkpoint import load_model, save_model
from ..model.lfm2 import LfmForCausalLM
from ..model.presets import PRESETS, preset
from ..text.tokenizer import Tokenizer
from .balance import imbalance, moe_layers, update_expert_bias
from .config import TrainConfig, TrainConfigError
from .data import IGNORE, Rows, RowOrder, StreamingRows, build_rows
from .distributed import World, close_world, init_world, shard_model
from .plot import plot_run, read_metrics
from .state import find_checkpoint, load_checkpoint, model_from_state, save_checkpoint, write_atomic


def warn(msg: str) -> None:
    """A one-line notice on stderr, in the shape of the CLI's one-line errors."""
    print(f"lfm: warning: {msg}", file=sys.stderr, flush=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr, WSD (flat, then linear decay over the last fraction) or constant."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    lo = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        decay_start = cfg.steps - max(1, int(cfg.steps * o.decay_fraction))
        if step < decay_start:
            return o.lr
        return o.lr + (lo - o.lr) * (step - decay_start + 1) / (cfg.steps - decay_start)
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * min(t, 1.0)))


def _is_preset(name: str) -> bool:
    return "/" not in name and name in PRESETS and not Path(name).exists()


def build_model(cfg: TrainConfig, tok: Tokenizer) -> LfmForCausalLM:
    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if _is_preset(m.init):
        ids = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
        config = preset(m.init, **{**{k: v for k, v in ids.items() if v is not None}, **m.overrides})
        if config.vocab_size < tok.vocab_size:
            raise TrainConfigError(f"model vocab_size {config.vocab_size} < tokenizer vocabulary {tok.vocab_size}")
        g = torch.Generator().manual_seed(m.seed)
        model = LfmForCausalLM(config)
        model.init_weights(m.init_std, generator=g)
        model = model.to(dtype)
    else:
        if m.overrides:
            raise TrainConfigError("model.overrides only apply to presets (training from scratch)")
        model = load_model(m.init, dtype=dtype)
    model.activation_checkpointing = m.activation_checkpointing
    return model.train()


def _tokenizer_dir(cfg: TrainConfig) -> Path:
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    if _is_preset(cfg.model.init):
        from ..model.checkpoint import DEMO_MODEL
        raise TrainConfigError(f"model.init = {cfg.model.init!r} trains from scratch: give model.tokenizer "
                               "(a tokenizer directory), e.g. --tokenizer DIR; for a toy run, the demo model's "
                               f"4,096-token tokenizer: --tokenizer {DEMO_MODEL}")
    from ..model.checkpoint import resolve
    return resolve(cfg.model.init)


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu" if batch["input_ids"].device.type == "cpu" else "cuda", dtype=torch.bfloat16,
                        enabled=autocast):
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")


class Trainer:
    """Holds a run's pieces so that tests and the demo builder can drive steps; `run()` is the whole loop."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.world: World = init_world()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.run_dir = Path(cfg.out_dir)
        self.tok_dir = _tokenizer_dir(cfg)
        self.tok = Tokenizer.from_dir(self.tok_dir)
        self.model = build_model(cfg, self.tok).to(self.world.device)
        self.lora = None
        ckpt, damaged = find_checkpoint(self.run_dir) if resume else (None, [])
        if self.world.is_main:
            for msg in damaged:
                warn(f"skipping a damaged checkpoint: {msg}")
            if resume and ckpt is None:
                warn(f"{self.run_dir}: no complete checkpoint to resume from; starting from step 0")
            elif ckpt is not None and damaged:
                warn(f"resuming from {ckpt}")
            o = cfg.optim
            if o.warmup_steps > cfg.steps:
                warn(f"optim.warmup_steps = {o.warmup_steps} is longer than the run (steps = {cfg.steps}): the learning "
                     f"rate peaks at {lr_at(cfg.steps - 1, cfg):.3g}, never reaching optim.lr = {o.lr:g}")
        if cfg.lora.enabled:
            if self.world.sharded:
                raise TrainConfigError("LoRA runs are single-process (the adapter is small); drop torchrun")
            from .lora import LoraConfig, apply_lora, load_adapter
            self.lora = LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                   targets=tuple(cfg.lora.targets))
            if ckpt is not None:
                load_adapter(self.model, ckpt / "adapter")
            else:
                torch.manual_seed(cfg.model.seed)
                apply_lora(self.model, self.lora)
        for _, m in moe_layers(self.model):
            m.aux_loss_coef = cfg.moe.aux_loss_coef
        if self.world.sharded:
            shard_model(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        o = cfg.optim
        self.optim = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.init_data()
        self.step, self.consumed, self.tokens_seen = 0, 0, 0
        if ckpt is not None:
            st = load_checkpoint(ckpt, self.model, self.optim, self.world, lora=self.lora is not None)
            self.step, self.consumed, self.tokens_seen = st["step"], st["rows_consumed"], st["tokens_seen"]
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is None:  # absolute paths: a resume reads the same files from any working directory
                write_atomic(self.run_dir / "config.toml", cfg.with_absolute_paths().to_toml())
                write_atomic(self.run_dir / "metrics.jsonl", "")
            else:  # forget what happened after the checkpoint: those steps run again
                problems: list[str] = []
                kept = [r for r in read_metrics(self.run_dir / "metrics.jsonl", problems) if r["step"] <= self.step]
                for msg in problems:
                    warn(msg)
                write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def init_data(self) -> None:
        """Training (and eval) rows; a task with other data (GRPO's prompts) overrides this."""
        cfg, d = self.cfg, self.cfg.data
        task = cfg.distill.data if d.task == "distill" else d.task
        if d.streaming:
            if task != "pretrain":
                raise TrainConfigError("data.streaming is for pretraining corpora; SFT data is read whole")
            self.stream: StreamingRows | None = StreamingRows(self.tok, d.train, d.seq_len, d.text_key)
            self.rows: Rows | None = None
        else:
            self.stream, self.rows = None, build_rows(self.tok, d.train, task, d.seq_len, d.text_key)
            self.order = RowOrder(len(self.rows), cfg.model.seed, d.shuffle)
        self.eval_rows = build_rows(self.tok, d.eval, task, d.seq_len, d.text_key) if d.eval else None

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed per-token loss of one micro-batch (distillation overrides it)."""
        return _loss_sum(self.model, batch, self.cfg.bf16_autocast)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world.size

    def _batch(self, micro: int) -> dict[str, torch.Tensor]:
        B, w = self.cfg.batch_size, self.world
        start = self.consumed + (micro * w.size + w.rank) * B
        if self.stream is not None:
            b = self.stream.take_range(start, B)
        else:
            b = self.rows.take(self.order.indices(start, B))
        return {k: v.to(w.device) for k, v in b.items()}

    @torch.enable_grad()
    def train_step(self) -> dict[str, Any]:
        cfg, w = self.cfg, self.world
        torch.manual_seed(cfg.model.seed * 7919 + self.step * w.size + w.rank)  # dropout: a function of the step
        lr = lr_at(self.step, cfg)
        for g in self.optim.param_groups:
            g["lr"] = lr
        batches = [self._batch(m) for m in range(cfg.grad_accum)]
        n_tok = w.all_reduce(torch.tensor([float(sum(int((b["labels"] != IGNORE).sum()) for b in batches))]))
        total = max(n_tok.item(), 1.0)
        loss_sum = torch.zeros(())
        aux_sum = torch.zeros(())
        moes = moe_layers(self.model)
        for b in batches:
            s = self.loss_sum(b)
            loss = s / total * w.size  # FSDP averages gradients over ranks; this makes it a global token mean
            aux = [m.aux_loss for _, m in moes if m.aux_loss is not None]
            if aux:
                a = torch.stack(aux).sum() / cfg.grad_accum
                loss = loss + a
                aux_sum += a.detach()
                for _, m in moes:
                    m.aux_loss = None
            loss.backward()
            loss_sum += s.detach().float()
        params = [p for p in self.model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        loads = update_expert_bias(self.model, cfg.moe.bias_update_rate, w)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed += self.global_batch
        self.tokens_seen += int(total)
        out: dict[str, Any] = {"step": self.step, "loss": w.all_reduce(loss_sum).item() / total, "lr": lr,
                               "grad_norm": float(gn), "tokens": self.tokens_seen}
        if aux:
            out["aux_loss"] = w.all_reduce(aux_sum).item() / w.size
        if loads:
            out["expert_load"] = loads
            out["max_imbalance"] = max(imbalance(v) for v in loads.values())
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_rows is None:
            return {}
        was = self.model.training
        self.model.eval()
        B, w = self.cfg.batch_size, self.world
        per = min(len(self.eval_rows), self.cfg.eval_batches * B * w.size) // w.size  # equal on every rank:
        if per == 0:                                                                  # FSDP forwards are collective
            return {}
        sums = torch.zeros(2)
        for lo in range(w.rank * per, (w.rank + 1) * per, B):
            b = {k: v.to(w.device) for k, v in self.eval_rows.take(list(range(lo, min(lo + B, (w.rank + 1) * per)))).items()}
            sums[0] += _loss_sum(self.model, b, self.cfg.bf16_autocast).float()
            sums[1] += (b["labels"] != IGNORE).sum()
        w.all_reduce(sums)
        self.model.train(was)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> Path | None:
        st = {"rows_consumed": self.consumed, "tokens_seen": self.tokens_seen, "world_size": self.world.size}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optim, self.world, st, self.tok_dir,
                               self.lora, self.cfg.keep_checkpoints)

    def log(self, rec: dict[str, Any]) -> None:
        if self.world.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run(self) -> Path:
        """Train to cfg.steps (checkpointing, evaluating, plotting) and write the final model; return its directory."""
        cfg = self.cfg
        bar = None
        if self.progress and self.world.is_main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        busy, done_tokens = 0.0, 0  # training time only: evals and checkpoints are not in tokens/s
        row_tokens = self.global_batch * cfg.data.seq_len  # processed per step (the loss may cover fewer)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            rec = self.train_step()
            busy += time.perf_counter() - t0
            done_tokens += rec.pop("processed_tokens", row_tokens)  # GRPO: prompt + sampled tokens
            rec["tokens_per_s"] = round(done_tokens / max(busy, 1e-9), 1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                rec.update(self.evaluate())
            self.log(rec)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                if "eval_loss" in rec:
                    post["eval"] = f"{rec['eval_loss']:.3f}"
                bar.set_postfix(post)
            elif self.world.is_main and cfg.log_every > 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                print(log_line(rec, cfg.steps), flush=True)  # no bar (logs, CI): a line every log_every steps
            if cfg.save_every and self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
                if self.world.is_main:
                    plot_run(self.run_dir)
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> Path:
        """The run's deliverable in `final/`: the trained model (or the adapter, and the merged model if asked)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        final = self.run_dir / "final"
        if self.lora is None:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            shutil.rmtree(final, ignore_errors=True)
            if self.lora is None:
                save_model(model_from_state(self.model.config, sd), final, self.tok_dir)
            else:
                from .lora import merge_lora, save_adapter
                save_adapter(self.model, final / "adapter", self.lora, base_model_name_or_path=self.cfg.model.init)
                if self.cfg.lora.merge:
                    merge_lora(self.model)
                    save_model(self.model, final / "merged", self.tok_dir)
            plot_run(self.run_dir)
        self.world.barrier()
        return final


def make_trainer(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Trainer:
    """The trainer of the config's task: pretrain / sft here, distill and grpo in their own modules."""
    if cfg.data.task == "distill":
        from .distill import DistillTrainer
        return DistillTrainer(cfg, resume=resume, progress=progress)
    if cfg.data.task == "grpo":
        from .grpo import GrpoTrainer
        return GrpoTrainer(cfg, resume=resume, progress=progress)
    return Trainer(cfg, resume=resume, progress=progress)


def log_line(rec: dict[str, Any], steps: int) -> str:
    """`step 10/200  loss 3.2145  lr 3.00e-04  grad_norm 0.812  tok/s 5123  [eval_loss 3.3012  ppl 27.1]`."""
    line = (f"step {rec['step']}/{steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  grad_norm {rec['grad_norm']:.3f}  "
            f"tok/s {rec.get('tokens_per_s', 0):.0f}")
    if "eval_loss" in rec:
        line += f"  eval_loss {rec['eval_loss']:.4f}  ppl {rec['eval_ppl']:.1f}"
    if "reward_mean" in rec:  # GRPO
        line += (f"  reward {rec['reward_mean']:.3f}  len {rec['response_len']:.1f}  "
                 f"rollouts/s {rec['rollouts_per_s']:.1f}")
    return line


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    trainer = make_trainer(cfg, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        close_world(trainer.world)


def config_of_run(run_dir: str | Path) -> TrainConfig:
    p = Path(run_dir) / "config.toml"
    if not p.is_file():
        raise TrainConfigError(f"{run_dir}: not a run directory (no config.toml)")
    return TrainConfig.from_toml(p)

