"""Edge cases of the engine found in review: regression tests for the bugs it found (marked "Was:", each failed
before its fix), and tricky cases that tests/test_engine.py does not cover (short chunks after a hit with wide convs,
twins, preemption that re-hits decode-filled blocks, score(), a scheduled victim's budget)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from lfm import LLM, SamplingParams
from lfm.engine.async_engine import AsyncEngine, EngineRequest
from lfm.engine.block_manager import BlockManager
from lfm.engine.cache import PagedCache
from lfm.engine.scheduler import Scheduler
from lfm.engine.sequence import Sequence, SequenceStatus

from .conftest import CONFIGS, random_model
from .engine_util import capture, check_against_full_forward

torch.set_grad_enabled(False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(seed: int, lengths: list[int], vocab: int = 500) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(10, vocab) for _ in range(n)] for n in lengths]


def _small_llm(m, bs: int, blocks: int, **kw) -> LLM:
    per_block = PagedCache.block_bytes(m.config, bs, m.dtype, m.dtype, kw.get("enable_prefix_caching", True))
    return LLM(m, block_size=bs, kv_cache_memory=blocks * per_block, **kw)


# ---------------------------------------------------------------------------------------------------------- bugs
def test_prompt_logprobs_are_not_duplicated_by_preemption():
    """Was: a preempted sequence with prompt_logprobs is
    recomputed from token 0 (match_prefix refuses it a hit), and every recomputed prompt position appends another
    record to seq.prompt_logprobs: the output has more records than prompt tokens."""
    m = random_model(CONFIGS["dense"])
    prompts = _prompts(0, [20, 18, 22])
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    ref = LLM(m, block_size=4).generate(prompts, sp)
    llm = _small_llm(m, 4, 16, max_model_len=40, max_num_batched_tokens=8)
    outs = llm.generate(prompts, sp)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, r, o in zip(prompts, ref, outs):
        assert o.token_ids == r.token_ids
        assert len(o.prompt_logprobs) == len(p), f"{len(o.prompt_logprobs)} prompt logprobs for {len(p)} tokens"
        assert [x and x.token_id for x in o.prompt_logprobs] == [x and x.token_id for x in r.prompt_logprobs]
        for x, y in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:]):
            assert abs(x.logprob - y.logprob) < 1e-4


def _wait_idle(a: AsyncEngine, timeout: float = 2.0) -> None:
    """Until the thread has been through its loop at least once and has nothing left (or the timeout: a fix may
    leave it nothing to wake up for)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with a._cv:
            idle = a.steps >= 1 and not a._inbox and not a._aborts and not a.engine.has_unfinished_requests()
        if idle:
            return
        time.sleep(0.01)


def test_async_abort_of_a_request_still_in_the_inbox_never_runs_it():
    """Was: the engine thread applies the aborts it drained *before* the adds it drained;
    a request submitted and aborted (client gone) before the thread's next drain is added after its abort was a
    no-op, and then runs to max_tokens with nobody listening (holding a slot and blocks all the while)."""
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, block_size=4)

    async def main() -> int:
        a = AsyncEngine(llm.engine)
        a.start()
        try:
            with a._cv:  # the thread is between two drains (e.g. busy in a step)
                s = a.submit([EngineRequest("x", [5, 6, 7], SamplingParams(temperature=0, max_tokens=40,
                                                                              ignore_eos=True))])
                a.abort(s)
            await asyncio.sleep(0)
            _wait_idle(a)
            return llm.engine.steps
        finally:
            a.shutdown()

    assert asyncio.run(main()) == 0, "the aborted request was generated anyway"


def test_async_shutdown_ends_requests_still_in_the_inbox():
    """Was: on shutdown the thread breaks out before draining its inbox, and
    fail_all only reaches requests already in the engine: a request submitted just before shutdown never gets a final
    delta, so its stream waits forever."""
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, block_size=4)

    async def main() -> bool:
        a = AsyncEngine(llm.engine)
        a.start()
        with a._cv:
            s = a.submit([EngineRequest("x", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5))])
            a._stop = True  # what shutdown() sets, taken before the thread drained the inbox
            a._cv.notify()
        a._thread.join(5)
        for _ in range(10):
            await asyncio.sleep(0.01)
        try:
            d = s.queue.get_nowait()
        except asyncio.QueueEmpty:
            return False
        return d.finish_reason is not None

    assert asyncio.run(main()), "the stream of a request in the inbox at shutdown never ends"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lfm.text import Tokenizer
    from lfm.text.tiny_tokenizer import build_tiny_tokenizer

    return Tokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_llm_stream_survives_a_generate_call_while_it_is_open(tok):
    """Was: every `_steps` loop drains the shared engine's deltas and drops other callers' ones
    ("another caller's request"). A generate() run while a stream() is open swallows the stream's text and its
    finish; when the stream resumes, its request is gone and it raises "the engine stopped with requests
    unfinished"."""
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, tokenizer=tok)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = llm.generate(["hello there"], sp)[0].text
    pieces = []
    for i, piece in enumerate(llm.stream("hello there", sp)):
        pieces.append(piece)
        if i == 0:
            llm.generate(["other prompt"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert "".join(pieces) == ref


def test_logit_bias_token_ids_are_checked_against_the_vocabulary():
    """Was: add_request checks prompt ids but not logit_bias ids (only
    the HTTP layer does). Through LLM / LLMEngine a negative id silently biases a token counted from the end of the
    vocabulary (-1 -> V-1), and an id >= V raises IndexError inside step(), after the step was committed."""
    m = random_model(CONFIGS["dense"])
    eng = LLM(m).engine
    V = m.config.vocab_size
    for bad in (-1, V):
        with pytest.raises(ValueError):
            eng.add_request(f"r{bad}", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, logit_bias={bad: 50.0}))
        eng.abort_request(f"r{bad}")


def test_a_step_whose_sampling_raises_does_not_wedge_the_engine():
    """Was: step() commits the computed tokens before sampling; if sampling raises
    (a grammar backend error, an unchecked logit_bias id, a KeyboardInterrupt), every scheduled sequence is left
    owing 0 tokens without a new one. The next steps schedule them with num_tokens=0 and fail for good (an empty
    float id tensor reaches the embedding). LLM aborts only its own requests after an error, so another caller's
    open stream is wedged; AsyncEngine survives only because fail_all ends everyone's requests. Whatever the fix
    (resample, or end just those sequences with an error), later steps must work and every request must end."""
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, block_size=4)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    eng = llm.engine

    class Flaky:  # the sampler fails once
        def __init__(self, inner):
            self.inner, self.failed = inner, False

        def __call__(self, logits, seqs):
            if not self.failed:
                self.failed = True
                raise RuntimeError("sampling failed once")
            return self.inner(logits, seqs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    eng.sampler = Flaky(eng.sampler)
    eng.add_request("a", prompts[0], sp)
    eng.add_request("c", prompts[1], sp)
    got = {"a": ([], None), "c": ([], None)}
    for d in eng.step():  # the failing step ends the sequences it was sampling, with an error, and raises nothing
        got[d.request_id] = (got[d.request_id][0] + d.token_ids, d.finish_reason)
        assert d.finish_reason == "error" and "sampling failed once" in d.error
    for _ in range(20):
        if not eng.has_unfinished_requests():
            break
        for d in eng.step():
            got[d.request_id] = (got[d.request_id][0] + d.token_ids, d.finish_reason)
    for (ids, reason), r in zip(got.values(), ref):
        assert reason == "error" or (reason == "length" and ids == r)
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_slots) == bm.num_slots


def test_reset_prefix_cache_with_a_running_sequence_never_serves_stale_blocks():
    """Was: reset_prefix_cache ("e.g. after the weights
    change") unregisters the running sequences' blocks, but those sequences keep their block_hashes chain and go on
    registering every block they fill afterwards, whose KV and conv snapshots continue the pre-reset computation.
    A later request recomputes (and registers) the leading blocks, and the next one hits those fresh blocks *and*
    the stale ones chained after them. (vLLM refuses to reset while blocks are in use.)"""
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, block_size=4)
    eng = llm.engine
    seq = eng.add_request("a", list(range(20, 28)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(3):
        eng.step()
    for p in m.parameters():  # new weights (an RL update), then the documented reset
        p.mul_(1.3)
    try:
        ok = eng.block_manager.reset_prefix_cache()
    except RuntimeError:
        ok = False
    while eng.has_unfinished_requests():
        eng.step()
    if ok is False:  # a fix may refuse to reset while blocks are in use (as vLLM): then reset once nothing runs
        assert eng.block_manager.reset_prefix_cache() is not False
    q = seq.token_ids[:18] + [5]
    rec = capture(llm)
    llm.generate([q], SamplingParams(temperature=0, max_tokens=1))
    llm.generate([q], SamplingParams(temperature=0, max_tokens=1))
    check_against_full_forward(m, rec)


# ------------------------------------------------------------------------------------- edge cases that work
@pytest.mark.parametrize("name", ["dense-mqa-kernel4-untied", "dense-kernel1-headdim32-kv1", "moe-top1-untied-kernel4"])
@pytest.mark.parametrize("bs,budget", [(2, 1), (3, 2), (4, 5)])
def test_one_or_two_tokens_after_a_hit_with_short_blocks_equal_full_forward(name, bs, budget):
    """conv_L_cache 4 (L-1 = 3 > block size 2, and > the 1-2 tokens computed after the hit) and 1 (no state): the
    conv gather reads the restored snapshot rows; blocks filled by decode steps and by 1-token chunks snapshot
    correctly (a later hit on them is exact)."""
    m = random_model(CONFIGS[name])
    llm = LLM(m, block_size=bs, max_num_batched_tokens=budget, max_num_seqs=4)
    rec = capture(llm)
    base = _prompts(20, [13])[0]
    reply = llm.generate([base], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].token_ids
    bm = llm.engine.block_manager
    cut = (len(base) // bs) * bs
    computed = len(base) + len(reply) - 1  # the last sampled token was never fed back
    for p in (base[:cut] + [5], base[:cut] + [5, 6], base + reply + [9], base + reply[:3] + [9, 8]):
        h = bm.hit_tokens
        llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert bm.hit_tokens - h == (min(len(p) - 1, computed) // bs) * bs  # every full block computed before hits
    check_against_full_forward(m, rec)
    bm.check([])


def test_twins_computing_the_same_blocks_in_one_step_then_a_hit():
    m = random_model(CONFIGS["dense-mqa-kernel4-untied"])
    llm = LLM(m, block_size=4, max_num_batched_tokens=64)
    rec = capture(llm)
    p = _prompts(21, [19])[0]
    outs = llm.generate([p, p, p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outs}) == 1
    bm = llm.engine.block_manager
    assert bm.hit_tokens == 0  # admitted together: each computed its own blocks
    bm.check([])
    h = bm.hit_tokens
    llm.generate([p + outs[0].token_ids + [3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert bm.hit_tokens - h == 24
    check_against_full_forward(m, rec)


def test_preempted_sequences_rehit_their_blocks_and_keep_tokens_and_logprobs():
    """A tiny pool with a shared prefix: preempted sequences are re-admitted on a hit of their own (decode-filled)
    blocks; seeded sampled tokens and output logprobs equal an unconstrained run's, nothing is duplicated, and every
    sampled row equals the full forward."""
    m = random_model(CONFIGS["dense-mqa-kernel4-untied"])
    g = random.Random(7)
    base = _prompts(22, [20])[0]
    prompts = [base[:g.randrange(1, 20)] + _prompts(30 + i, [g.randrange(0, 6)])[0] for i in range(10)]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=g.randrange(4, 14), ignore_eos=True, logprobs=1)
              for i in range(10)]
    ref = LLM(m, block_size=2, enable_prefix_caching=False).generate(prompts, params)
    llm = _small_llm(m, 2, 21, max_num_batched_tokens=8, max_model_len=40, max_num_seqs=6)
    rec = capture(llm)
    got = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.hit_tokens > 0
    for r, o in zip(ref, got):
        assert o.token_ids == r.token_ids and len(o.logprobs) == len(o.token_ids)
        for x, y in zip(r.logprobs, o.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
    check_against_full_forward(m, rec)
    bm = llm.engine.block_manager
    bm.check([])
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_score_equals_full_forward_frees_everything_and_its_blocks_hit_exactly(chunk):
    m = random_model(CONFIGS["dense-mqa-kernel4-untied"])
    llm = LLM(m, block_size=4)
    eng, bm = llm.engine, llm.engine.block_manager
    p = _prompts(23, [22])[0]
    logits = eng.score(p, chunk_size=chunk)
    torch.testing.assert_close(logits, m(torch.tensor([p]))[0].float(), atol=1e-4, rtol=1e-4)
    assert bm.num_used_blocks == 0 and len(bm.free_slots) == bm.num_slots and not eng.seqs
    assert not eng.has_unfinished_requests()
    bm.check([])
    rec = capture(llm)
    llm.generate([p[:18] + [3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert bm.hit_tokens == 16  # score's blocks (and its conv snapshots) serve a hit
    check_against_full_forward(m, rec)


def test_preempting_a_victim_scheduled_earlier_in_the_step_returns_its_budget_and_blocks():
    bm = BlockManager(num_blocks=5, block_size=2, num_slots=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=4)
    P = Sequence("P", list(range(10, 22)), SamplingParams(), set(), 100, None, 100)  # older, mid-prefill
    D = Sequence("D", [1, 2, 3], SamplingParams(), set(), 100, None, 100)  # newer, decoding
    for s, n in ((P, 4), (D, 3)):
        bm.admit(s, [], [], n)
        bm.commit(s, n)
        s.status = SequenceStatus.RUNNING
        sch.running.append(s)
    D.token_ids.append(4)  # D owes one token (decode, scheduled first), P owes 8 and needs 2 more blocks (1 free)
    out = sch.schedule()
    assert [(it.seq.request_id, it.num_tokens) for it in out] == [("P", 3)]
    assert list(sch.waiting) == [D] and D.status is SequenceStatus.WAITING and not D.block_table
    assert sum(it.num_tokens for it in out) <= sch.max_num_batched_tokens
    bm.check(sch.running)
