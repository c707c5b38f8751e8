"""RL with verifiable rewards (`data.task = "grpo"`): GRPO with DAPO's token-level asymmetric clipping.

One trainer step: take this rank's prompts (the same seeded order and `rows_consumed` position as the other tasks),
sample `group_size` completions of each from the engine running on the policy module itself (`rollout.Rollouts`: no
copy, no sync), score them with the reward functions, turn rewards into group-relative advantages and dropping groups
whose rewards are all equal (they carry no signal; DAPO), then update the policy on the sampled tokens:

    ratio_t = pi(y_t) / pi_old(y_t)                    pi_old: the policy that sampled (before this step's updates)
    pg_t    = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)
    w_t     = min(pi_old(y_t) / sampler(y_t), is_cap)  importance weight against the sampler's own log-probs (detached)
    loss    = sum_t (w_t * pg_t + kl_coef * k3_t) / (tokens in the global batch)
    k3_t    = exp(ref_t - lp_t) - (ref_t - lp_t) - 1   (Schulman's k3 estimator of KL(pi || ref), when kl_coef > 0)

pi_old and the sampler are the same weights, so w_t measures only numerics: engine (paged, one token at a time) vs
trainer (full-sequence forward). The step logs that gap; in float32 it is ~0. Log-probabilities are of the tempered
distribution softmax(logits / temperature) on both sides (the engine reports processed log-probs); with top_p < 1 the
sampler's distribution is also truncated and the gap includes that.

Randomness is a function of (seed, step, rank): the sampling seed of every completion, the reward shuffle of the
control. With the checkpointed step, optimizer and prompt position that makes a resumed run repeat the
uninterrupted one bit for bit. Under FSDP2 every rank samples its own prompts with the gathered weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ..engine.sampling import SamplingParams
from ..model.checkpoint import load_model
from .balance import imbalance, moe_layers, update_expert_bias
from .config import TrainConfig
from .data import DataError, RowOrder, iter_records
from .loop import Trainer, build_model, lr_at
from .rewards import combined
from .rollout import Rollouts, Sample


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per sample, keep mask). As TRL's GRPOTrainer: (r - group mean) / (group std + 1e-4), the std
    unbiased (torch's default); scale=False keeps r - mean (Dr. GRPO). Groups with all-equal rewards are dropped."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    keep = (r != r[:, :1]).any(1, keepdim=True).expand_as(r)
    return adv.flatten(), keep.flatten()


def grpo_loss(lp: torch.Tensor, old_lp: torch.Tensor, sampler_lp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip_low: float, clip_high: float, is_cap: float,
              ref_lp: torch.Tensor | None = None, kl_coef: float = 0.0) -> dict[str, torch.Tensor]:
    """Sums over the masked tokens ([n, T] tensors; adv [n]): loss, clipped-token count, importance weights, k3."""
    m = mask.to(lp.dtype)
    A = adv[:, None].to(lp.dtype)
    ratio = torch.exp(lp - old_lp)
    surr = ratio * A
    surr_clip = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    w = torch.exp(torch.where(mask, old_lp - sampler_lp, 0.0)).clamp(max=is_cap).detach()
    per = w * -torch.minimum(surr, surr_clip)
    out = {"clipped": ((surr_clip < surr).to(lp.dtype) * m).sum().detach(), "is_weight": (w * m).sum()}
    if ref_lp is not None and kl_coef > 0:
        d = torch.where(mask, ref_lp - lp, 0.0)
        k3 = torch.exp(d) - d - 1
        per = per + kl_coef * k3
        out["kl"] = (k3 * m).sum().detach()
    out["loss"] = (per * m).sum()
    return out


class GrpoTrainer(Trainer):
    """The shared loop (optimizer, schedule, checkpoints, resume, FSDP2) with rollouts and the GRPO loss."""

    def init_data(self) -> None:
        cfg, d, g = self.cfg, self.cfg.data, self.cfg.grpo
        if d.streaming:
            raise DataError("grpo reads its prompt file whole: set data.streaming = false")
        if d.eval:
            raise DataError("grpo has no eval data (data.eval): score checkpoints with `lfm eval` instead")
        self.stream = self.rows = self.eval_rows = None
        self.records: list[dict[str, Any]] = []
        self.prompts: list[list[int]] = []
        self.chat: list[bool] = []
        for n, rec in enumerate(iter_records(d.train, d.text_key)):
            if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                ids = self.tok.apply_chat_template(rec["messages"], tools=rec.get("tools"), add_generation_prompt=True)
            elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                ids = self.tok.encode(rec["prompt"])
            else:
                raise DataError(f"prompt record {n}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}, "
                                f"got {str(rec)[:80]!r}")
            if not ids or len(ids) + g.max_tokens > d.seq_len:
                raise DataError(f"prompt record {n}: {len(ids)} prompt tokens + grpo.max_tokens {g.max_tokens} "
                                f"exceed data.seq_len {d.seq_len}")
            self.records.append(rec)
            self.prompts.append(list(ids))
            self.chat.append("messages" in rec)
        if not self.records:
            raise DataError("no prompts in the training data")
        self.order = RowOrder(len(self.records), cfg.model.seed, d.shuffle)

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, resume=resume, progress=progress)
        g = cfg.grpo
        self.reward_fn = combined(g.rewards, g.reward_weights)
        max_len = max(len(p) for p in self.prompts) + g.max_tokens
        self.rollouts = Rollouts(self.model, self.tok, max_len, cfg.batch_size * cfg.grad_accum * g.group_size,
                                 g.kv_cache_memory)
        self.ref: torch.nn.Module | None = None
        if g.kl_coef > 0:  # the reference: a given checkpoint, or the run's starting policy (also on resume)
            dtype = getattr(torch, cfg.model.dtype)
            ref = load_model(g.ref_model, dtype=dtype) if g.ref_model else build_model(cfg, self.tok)
            self.ref = ref.to(self.world.device).eval().requires_grad_(False)

    def _seed(self, j: int) -> int:
        return ((self.cfg.model.seed * 1_000_003 + self.step) * 1_000_000_007 + j) % (1 << 62)

    def sample(self) -> tuple[list[tuple[int, int]], list[Sample]]:
        """This rank's prompts for the step as (micro-batch, prompt index), and group_size samples of each. A
        sample's seed is a function of (seed, step, its place in the global batch), not of the rank: 2 ranks with
        batch_size 1 sample what 1 process with batch_size 2 samples."""
        cfg, g, w = self.cfg, self.cfg.grpo, self.world
        picks, where = [], []
        for m in range(cfg.grad_accum):
            start = self.consumed + (m * w.size + w.rank) * cfg.batch_size
            picks += [(m, int(i)) for i in self.order.indices(start, cfg.batch_size)]
            where += range(start - self.consumed, start - self.consumed + cfg.batch_size)
        prompts, params, chat = [], [], []
        for (_, i), pos in zip(picks, where):
            for k in range(g.group_size):
                prompts.append(self.prompts[i])
                chat.append(self.chat[i])
                params.append(SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                                             seed=self._seed(pos * g.group_size + k), logprobs=0,
                                             skip_special_tokens=False))
        return picks, self.rollouts.generate(prompts, params, chat)

    def _batch_of(self, idx: list[int], samples: list[Sample], adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Right-padded rows prompt + completion; mask marks the positions whose next token was sampled. An empty
        micro-batch becomes one fully masked row: under FSDP every rank must still run its forwards."""
        empty = not idx
        idx = idx or [0]
        L = max(len(samples[i].prompt_ids) + len(samples[i].ids) for i in idx) - 1
        n = len(idx)
        pad = self.tok.pad_token_id or 0
        b = {"input_ids": torch.full((n, L), pad, dtype=torch.long), "targets": torch.zeros(n, L, dtype=torch.long),
             "mask": torch.zeros(n, L, dtype=torch.bool), "sampler_lp": torch.zeros(n, L),
             "position_ids": torch.arange(L).expand(n, L).contiguous(), "adv": adv[idx].clone()}
        for r, i in enumerate(idx):
            s = samples[i]
            full, P, R = s.prompt_ids + s.ids, len(s.prompt_ids), len(s.ids)
            b["input_ids"][r, :len(full) - 1] = torch.tensor(full[:-1])
            b["targets"][r, :len(full) - 1] = torch.tensor(full[1:])
            b["mask"][r, P - 1:P - 1 + R] = not empty
            b["sampler_lp"][r, P - 1:P - 1 + R] = torch.tensor(s.logprobs[:R], dtype=torch.float32)
        return {k: v.to(self.world.device) for k, v in b.items()}

    def logprobs(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the targets under softmax(logits / temperature), and the entropy."""
        with torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            logits = model(b["input_ids"], position_ids=b["position_ids"])
        lsm = torch.log_softmax(logits.float() / self.cfg.grpo.temperature, -1)
        ent = -(lsm.exp() * lsm).sum(-1).detach()
        return lsm.gather(-1, b["targets"][..., None]).squeeze(-1), ent

    def _max(self, x: float) -> float:
        t = torch.tensor([x], device=self.world.device)
        if self.world.sharded:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def train_step(self) -> dict[str, Any]:
        cfg, g, w = self.cfg, self.cfg.grpo, self.world
        torch.manual_seed(cfg.model.seed * 7919 + self.step * w.size + w.rank)
        lr = lr_at(self.step, cfg)
        for grp in self.optim.param_groups:
            grp["lr"] = lr
        t0 = time.perf_counter()
        picks, samples = self.sample()
        t_roll = time.perf_counter() - t0
        G = g.group_size
        rewards = torch.tensor([self.reward_fn(s.text, self.records[picks[n // G][1]]) for n, s in enumerate(samples)],
                               dtype=torch.float32)
        if g.shuffle_rewards:  # the control: same rewards, randomly reassigned, so no completion earns its own
            gen = torch.Generator().manual_seed(self._seed(-1 - w.rank))
            rewards = rewards[torch.randperm(len(rewards), generator=gen)]
        adv, keep = group_advantages(rewards, G, g.scale_rewards)
        batches = [self._batch_of([n for n in range(len(samples)) if keep[n] and picks[n // G][0] == m], samples, adv)
                   for m in range(cfg.grad_accum)]
        n_tok = w.all_reduce(torch.tensor([float(sum(int(b["mask"].sum()) for b in batches))], device=w.device))
        total = max(float(n_tok), 1.0)
        if g.updates_per_rollout > 1 or self.ref is not None:
            with torch.no_grad():
                for b in batches:
                    if g.updates_per_rollout > 1:
                        b["old_lp"] = self.logprobs(self.model, b)[0]
                    if self.ref is not None:
                        b["ref_lp"] = self.logprobs(self.ref, b)[0]
        sums = torch.zeros(6)  # loss, clipped, kl, entropy, |gap| sum, importance weight (first update)
        gap_max, clipped_all, gn, loads = 0.0, 0.0, torch.zeros(()), {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        for u in range(g.updates_per_rollout):
            for b in batches:
                with torch.enable_grad():
                    lp, ent = self.logprobs(self.model, b)
                    old = b.get("old_lp", lp.detach())
                    t = grpo_loss(lp, old, b["sampler_lp"], b["adv"], b["mask"], g.clip_low, g.clip_high, g.is_cap,
                                  b.get("ref_lp"), g.kl_coef)
                    (t["loss"] / total * w.size).backward()
                clipped_all += float(t["clipped"])
                if u == 0:
                    m = b["mask"]
                    gap = (old - b["sampler_lp"]).abs()[m]
                    gap_max = max(gap_max, float(gap.max()) if gap.numel() else 0.0)
                    sums += torch.tensor([float(t["loss"].detach()), 0.0, float(t.get("kl", 0.0)), float(ent[m].sum()),
                                          float(gap.sum()), float(t["is_weight"])])
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(params, clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            loads = update_expert_bias(self.model, cfg.moe.bias_update_rate, w)  # MoE: as in pretraining
            for _, moe in moe_layers(self.model):
                moe.aux_loss = None  # the auxiliary loss is a pretraining device; RL does not add it
            if float(n_tok) > 0:  # nothing to learn from (every group tied): no step, no weight decay drift
                self.optim.step()
            self.optim.zero_grad(set_to_none=True)
        sums[1] = clipped_all
        sums = w.all_reduce(sums.to(w.device)).cpu()
        lens = [len(s.ids) for s in samples]
        stats = w.all_reduce(torch.tensor([float(rewards.sum()), float((rewards ** 2).sum()), float(len(rewards)),
                                           float(sum(lens)), float(keep.sum()), float(t_roll),
                                           float(sum(len(s.prompt_ids) + len(s.ids) for s in samples))],
                                          device=w.device)).cpu()
        n = float(stats[2])
        mean = float(stats[0]) / n
        self.step += 1
        self.consumed += self.global_batch
        self.tokens_seen += int(float(n_tok))
        rec: dict[str, Any] = {
            "step": self.step, "loss": float(sums[0]) / total, "lr": lr, "grad_norm": float(gn),
            "tokens": self.tokens_seen, "reward_mean": mean,
            "reward_std": max(float(stats[1]) / n - mean * mean, 0.0) ** 0.5, "response_len": float(stats[3]) / n,
            "groups_kept": float(stats[4]) / n,
            "rollouts_per_s": n / max(float(stats[5]) / w.size, 1e-9),
            "sample_tokens_per_s": float(stats[3]) / max(float(stats[5]) / w.size, 1e-9),
            "processed_tokens": int(stats[6])}
        if loads:
            rec["max_imbalance"] = max(imbalance(v) for v in loads.values())
        gap_max = self._max(gap_max)
        if float(n_tok) > 0:  # per trained token: absent when every group tied
            rec.update({"entropy": float(sums[3]) / total,
                        "clip_frac": float(sums[1]) / (total * g.updates_per_rollout),
                        "logprob_gap": float(sums[4]) / total, "logprob_gap_max": gap_max,
                        "is_weight": float(sums[5]) / total})
            if self.ref is not None:
                rec["kl"] = float(sums[2]) / total
        return rec
