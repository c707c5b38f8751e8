"""Rollouts for RL: the engine (`LLMEngine`: paged KV, continuous batching, the one sampler) run on the very module
the trainer optimises, so every rollout samples from the policy's current weights with no copy and no sync.

The engine is built once around the policy and reused. Its prefix cache is emptied at the start of every rollout
(a block cached by the previous rollout holds keys computed with older weights, as verl resets vLLM's), and within a
rollout the first sample of each prompt is prefilled before its siblings are added, so a group of G samples
computes its prompt once. During a rollout the policy is
in eval mode and under inference_mode; under FSDP2 its shards are gathered first (`unshard`) and released after, so
each rank samples its own prompts with the whole model. The sampler reports the log-probability of each token under
the distribution it drew from (temperature applied: logprobs_mode="processed_logprobs"), which is what the
trainer's importance weights compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.llm_engine import EngineConfig, LLMEngine
from ..engine.sampling import SamplingParams
from ..text.tokenizer import Tokenizer


@dataclass
class Sample:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens, a final stop token included (the policy learns to stop)
    logprobs: list[float]  # the sampler's log-probability of each generated token
    text: str  # the completion as rewards read it: special tokens kept (tool-call markers), final stop dropped
    finish_reason: str


def stop_ids(model: nn.Module, tok: Tokenizer, chat: bool) -> set[int]:
    eos = model.config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if chat and tok.im_end_id is not None:
        ids.add(tok.im_end_id)
    return ids


@contextlib.contextmanager
def inference_view(model: nn.Module) -> Iterator[None]:
    """The trainer's module, ready for the engine: eval mode, FSDP2 shards gathered; restored afterwards."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    was = model.training
    model.eval()
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
        model.train(was)


class Rollouts:
    """`generate(prompts, params, chat)` -> one `Sample` per prompt, from the policy as it is now."""

    def __init__(self, model: nn.Module, tok: Tokenizer, max_model_len: int, max_num_seqs: int,
                 kv_cache_memory: int = 1 << 30) -> None:
        self.model, self.tok = model, tok
        cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_model_len),
                           kv_cache_memory=kv_cache_memory, enable_prefix_caching=True,
                           max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                           # no CUDA graphs: FSDP2 unshards into fresh memory for every rollout, and a captured graph
                           # would keep reading the first rollout's weight addresses
                           enforce_eager=True)
        with inference_view(model):
            self.engine = LLMEngine(model, tok, stop_ids(model, tok, False), stop_ids(model, tok, True), cfg)
        self._n = 0

    def _step(self) -> None:
        for d in self.engine.step():
            if d.finish_reason == "error":
                raise RuntimeError(f"rollout failed: {d.error}")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams], chat: list[bool]) -> list[Sample]:
        eng = self.engine
        seqs: list = []
        with inference_view(self.model):
            if not eng.block_manager.reset_prefix_cache():
                raise RuntimeError("rollout engine still holds sequences of an earlier rollout")
            try:
                leaders: dict[tuple[int, ...], int] = {}
                for i, p in enumerate(prompts):
                    leaders.setdefault(tuple(p), i)
                order = sorted(range(len(prompts)), key=lambda i: leaders[tuple(prompts[i])] != i)  # leaders first
                seqs = [None] * len(prompts)
                for i in order:
                    if leaders[tuple(prompts[i])] != i and seqs[i] is None:
                        while any(s.num_output_tokens == 0 and s.finish_reason is None
                                  for s in seqs if s is not None):  # leaders' prompts computed and cached first
                            self._step()
                    self._n += 1
                    seqs[i] = eng.add_request(f"rl-{self._n}", prompts[i], params[i], chat[i])
                while eng.has_unfinished_requests():
                    self._step()
            finally:
                for s in seqs:
                    if s is not None:
                        eng.abort_request(s.request_id)
        out = []
        for s in seqs:
            assert s is not None
            o = s.to_output()
            ids = list(o.token_ids)
            body = ids[:-1] if ids and o.finish_reason == "stop" and ids[-1] in s.stop_ids else ids
            out.append(Sample(list(o.prompt_token_ids), ids, [r.logprob for r in o.logprobs or []],
                              self.tok.decode(body, skip_special_tokens=False), o.finish_reason or "length"))
        return out
