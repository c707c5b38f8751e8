"""Helpers for tests that look inside the engine: record the logits of every row it computes, steer what it samples
(teacher forcing), and compare with the plain model's full forward (`model(ids)`, no cache: the reference)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lfm import LLM


def capture(llm: LLM, all_rows: bool = False,
            force: Callable[[list[int], int], int | None] | None = None) -> list[tuple[list[int], torch.Tensor]]:
    """Record (tokens the logits condition on, logits) for every row the engine samples from; with all_rows, also
    every prompt position the engine returns logits for (requests with `prompt_logprobs` set).

    force(tokens, num_prompt_tokens) -> a token id (or None: leave the row alone) makes the engine sample that token
    from the row (its logits are recorded first, untouched): decoding a fixed continuation, as a cache fed given
    tokens did."""
    rec: list[tuple[list[int], torch.Tensor]] = []
    run = llm.engine.runner.run

    def wrapped(scheduled):
        out = run(scheduled)
        covered: set[int] = set()
        if all_rows:
            for i, (first, count) in out.prompt_rows.items():
                s = scheduled[i]
                c0 = s.seq.num_computed_tokens
                for j in range(count):
                    rec.append((list(s.seq.token_ids[:c0 + j + 1]), out.logits[first + j].clone()))
                    covered.add(first + j)
        for i, r in out.sample_row.items():
            s = scheduled[i]
            tokens = list(s.seq.token_ids[:s.seq.num_computed_tokens + s.num_tokens])
            if r not in covered:
                rec.append((tokens, out.logits[r].clone()))
            t = force(tokens, s.seq.num_prompt_tokens) if force is not None else None
            if t is not None:
                with torch.inference_mode():  # the runner's logits are inference tensors
                    out.logits[r] = -1e4
                    out.logits[r, t] = 1e4
        return out

    llm.engine.runner.run = wrapped
    return rec


def scripted(continuations: dict[tuple[int, ...], list[int]]) -> Callable[[list[int], int], int | None]:
    """A `force` for capture(): the prompt `p` continues with continuations[tuple(p)], token by token."""

    def force(tokens: list[int], num_prompt: int) -> int | None:
        script = continuations.get(tuple(tokens[:num_prompt]))
        k = len(tokens) - num_prompt
        return script[k] if script is not None and k < len(script) else None

    return force


def by_tokens(rec: list[tuple[list[int], torch.Tensor]]) -> dict[tuple[int, ...], torch.Tensor]:
    return {tuple(t): x for t, x in rec}


def check_against_full_forward(model, rec, atol=1e-4, rtol=1e-4) -> None:
    assert rec
    for tokens, logits in rec:
        ref = model(torch.tensor([tokens]))[0, -1].float()
        torch.testing.assert_close(logits, ref, atol=atol, rtol=rtol, msg=lambda m: f"{len(tokens)} tokens: {m}")


def paged_kernel_calls(monkeypatch) -> list[bool]:
    """Record, for every call of lfm.kernels.paged_decode_attention, whether the kernel ran (not None). The general
    step's path: the fused CPU decode step (which has its own attention inside) is turned off for the test."""
    from lfm import kernels

    monkeypatch.setenv("LFM_FUSED_DECODE", "0")

    used: list[bool] = []
    paged = kernels.paged_decode_attention

    def counting(*a, **k):
        o = paged(*a, **k)
        used.append(o is not None)
        return o

    monkeypatch.setattr(kernels, "paged_decode_attention", counting)
    return used
