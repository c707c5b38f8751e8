"""A training run in one TOML file: every value that changes the result is here, so a config reproduces a run.

Sections mirror the parts of the loop (`model`, `data`, `optim`, `lora`, `moe`) plus top-level run settings. The
run directory keeps a copy (`config.toml`), which is what `--resume` reads.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A config value a user must fix; the message names the key."""


@dataclass
class ModelSection:
    init: str = "tiny"  # a preset name (from scratch), or a checkpoint directory / Hub id to continue from
    tokenizer: str = ""  # tokenizer directory; defaults to the checkpoint's own
    dtype: str = "float32"  # parameter dtype; bfloat16 autocast is a separate switch
    seed: int = 0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields changed on a preset (hidden_size, ...)


@dataclass
class DataSection:
    task: str = "pretrain"  # "pretrain" (documents), "sft" (chat jsonl), "distill" (see [distill]), "grpo" (prompts)
    train: list[str] = field(default_factory=list)  # files (.txt .jsonl .json .parquet), globs, or hf:NAME[:SPLIT]
    eval: list[str] = field(default_factory=list)
    text_key: str = "text"
    seq_len: int = 512
    shuffle: bool = True
    streaming: bool = False  # read sources lazily (large corpora); resume then skips already used rows


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd | constant (all after linear warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj",
                                                          "w1", "w2", "w3"])
    merge: bool = False  # also write the merged full model at the end


@dataclass
class MoeSection:
    bias_update_rate: float = 1e-3  # aux-loss-free balancing; 0 turns it off
    aux_loss_coef: float = 0.0


@dataclass
class DistillSection:
    """task = "distill": a teacher's top-K log-probabilities (online, or from a precomputed cache) teach the student."""

    teacher: str = ""  # checkpoint directory / Hub id (lfm2 or lfm2_moe, any size; same tokenizer)
    data: str = "pretrain"  # how data.train is read: "pretrain" (documents) or "sft" (chat jsonl)
    top_k: int = 64
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KL term; the data cross-entropy gets 1 - alpha
    cache: str = ""  # a top-K cache directory: built once if missing, then streamed; empty = teacher online
    rows_per_shard: int = 1024


@dataclass
class GrpoSection:
    """task = "grpo": G samples per prompt from the engine on the policy's own weights, verifiable rewards."""

    group_size: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: list[str] = field(default_factory=lambda: ["exact"])  # built-in names or module:function
    reward_weights: list[float] = field(default_factory=list)  # default: 1 each
    clip_low: float = 0.2  # DAPO's asymmetric clip: ratio kept in [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28
    is_cap: float = 2.0  # the trainer/sampler importance weight is capped here (truncated IS)
    kl_coef: float = 0.0  # > 0: k3 KL to a frozen reference model
    ref_model: str = ""  # default: model.init (the starting policy)
    scale_rewards: bool = True  # divide advantages by the group's std (GRPO); false: Dr. GRPO
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (> 1 makes the clip bite)
    shuffle_rewards: bool = False  # a control: rewards permuted across samples (no signal left)
    kv_cache_memory: int = 1 << 30


@dataclass
class TrainConfig:
    out_dir: str = "runs/run"
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch on each rank
    grad_accum: int = 1
    bf16_autocast: bool = False
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads per process; 0 = torch's default
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    moe: MoeSection = field(default_factory=MoeSection)
    distill: DistillSection = field(default_factory=DistillSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _build(cls, d, "")

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise TrainConfigError(f"{p}: no such config file")
        try:
            d = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{p}: not valid TOML ({e})") from None
        cfg = cls.from_dict(d)
        base = p.resolve().parent  # relative data paths are relative to the config file
        cfg.data.train = [_rel(base, s) for s in cfg.data.train]
        cfg.data.eval = [_rel(base, s) for s in cfg.data.eval]
        if cfg.distill.cache:
            cfg.distill.cache = _rel(base, cfg.distill.cache)
        return cfg

    def set(self, assignment: str) -> None:
        """Apply one `section.key=value` override (value parsed as TOML, bare words as strings)."""
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise TrainConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *path, last = key.strip().split(".")
        obj: Any = self
        for part in path:
            if not hasattr(obj, part) or not dataclasses.is_dataclass(getattr(obj, part)):
                raise TrainConfigError(f"--set {key}: no section {part!r}")
            obj = getattr(obj, part)
        if last not in {f.name for f in dataclasses.fields(obj)}:
            raise TrainConfigError(f"--set {key}: unknown key {last!r}")
        setattr(obj, last, _coerce(getattr(obj, last), value, key))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        top = {k: v for k, v in self.to_dict().items() if not isinstance(v, dict)}
        lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
        for name, sec in self.to_dict().items():
            if isinstance(sec, dict):
                lines.append(f"\n[{name}]")
                for k, v in sec.items():
                    if isinstance(v, dict):
                        inner = ", ".join(f"{ik} = {_toml_value(iv)}" for ik, iv in v.items())
                        lines.append(f"{k} = {{ {inner} }}")
                    else:
                        lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def with_absolute_paths(self) -> "TrainConfig":
        """A copy whose local paths (data, eval data, tokenizer, a checkpoint to start from) are absolute, resolved
        against the working directory as this process reads them: what a run directory's config.toml stores, so
        `--resume RUN` reads the same files from any working directory."""
        c = dataclasses.replace(self, model=dataclasses.replace(self.model), data=dataclasses.replace(self.data))
        c.data.train = [_abs(s) for s in self.data.train]
        c.data.eval = [_abs(s) for s in self.data.eval]
        if c.model.tokenizer:
            c.model.tokenizer = _abs(c.model.tokenizer)
        if Path(c.model.init).expanduser().exists():  # a local checkpoint (a preset name or Hub id stays a name)
            c.model.init = _abs(c.model.init)
        c.distill, c.grpo = dataclasses.replace(self.distill), dataclasses.replace(self.grpo)
        if c.distill.cache:
            c.distill.cache = _abs(c.distill.cache)
        if c.distill.teacher and Path(c.distill.teacher).expanduser().exists():
            c.distill.teacher = _abs(c.distill.teacher)
        if c.grpo.ref_model and Path(c.grpo.ref_model).expanduser().exists():
            c.grpo.ref_model = _abs(c.grpo.ref_model)
        return c

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TrainConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.data.task not in ("pretrain", "sft", "distill", "grpo"):
            raise TrainConfigError(f"data.task = {self.data.task!r}: expected pretrain, sft, distill or grpo")
        if self.data.task == "distill":
            d = self.distill
            if not d.teacher and not d.cache:
                raise TrainConfigError("data.task = 'distill' needs distill.teacher (a checkpoint) or distill.cache")
            if d.data not in ("pretrain", "sft"):
                raise TrainConfigError(f"distill.data = {d.data!r}: expected 'pretrain' or 'sft'")
            if d.top_k < 1 or d.temperature <= 0 or not 0 <= d.alpha <= 1:
                raise TrainConfigError("distill: top_k >= 1, temperature > 0 and 0 <= alpha <= 1")
        if self.data.task == "grpo":
            g = self.grpo
            if g.group_size < 2 or g.max_tokens < 1 or g.updates_per_rollout < 1:
                raise TrainConfigError("grpo: group_size >= 2, max_tokens >= 1, updates_per_rollout >= 1")
            if g.reward_weights and len(g.reward_weights) != len(g.rewards):
                raise TrainConfigError("grpo.reward_weights: one weight per entry of grpo.rewards")
            if g.clip_low < 0 or g.clip_high < 0 or g.is_cap < 1 or g.kl_coef < 0:
                raise TrainConfigError("grpo: clip_low, clip_high, kl_coef >= 0 and is_cap >= 1")
        if not self.data.train:
            raise TrainConfigError("data.train is empty: give training files (--data FILE or data.train in the config)")
        if self.data.seq_len < 2:
            raise TrainConfigError("data.seq_len must be >= 2")
        if self.optim.schedule not in ("cosine", "wsd", "constant"):
            raise TrainConfigError(f"optim.schedule = {self.optim.schedule!r}: expected cosine, wsd or constant")
        if self.model.dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(f"model.dtype = {self.model.dtype!r}: expected float32 or bfloat16")


def _abs(s: str) -> str:
    if s.startswith("hf:"):
        return s
    return os.path.abspath(os.path.expanduser(s))


def _rel(base: Path, s: str) -> str:
    if s.startswith("hf:") or Path(s).is_absolute():
        return s
    return str(base / s)


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise TrainConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{where}.{k}" if where else k
        if k not in fields:
            raise TrainConfigError(f"unknown config key {name!r}")
        default = fields[k].default_factory() if fields[k].default_factory is not dataclasses.MISSING else fields[k].default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kwargs[k] = _build(type(default), v, name)
        else:
            kwargs[k] = _coerce(default, v, name)
    return cls(**kwargs)


def _coerce(default: Any, value: Any, key: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TrainConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, str):
        return [value]
    if default is not None and not isinstance(value, type(default)):
        raise TrainConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")
