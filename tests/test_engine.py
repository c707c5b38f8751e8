"""The one engine (sequence, block manager, scheduler, model runner): its logits equal the plain model's full
forward whatever the batch mixes, chunking, prefix-cache hits or preemption; its bookkeeping never loses a block or
a slot; memory is bounded by the pool. The plain forward (`model(ids)`, no cache) is the reference; it equals
transformers (tests/test_model_parity.py)."""

from __future__ import annotations

import random

import pytest
import torch

from lfm import LLM, SamplingParams
from lfm.engine.block_manager import BlockManager
from lfm.engine.sampling import SamplingParams as SP
from lfm.engine.scheduler import Scheduler
from lfm.engine.sequence import Sequence

from .conftest import CONFIGS, random_model
from .engine_util import capture as _capture
from .engine_util import check_against_full_forward as _check_against_full_forward

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


def _model(name: str = "dense", dtype: torch.dtype = torch.float32):
    return random_model(CONFIGS[name]).to(dtype)


def _prompts(seed: int, lengths: list[int], vocab: int = 500) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(10, vocab) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_prefill_and_decode_batches_equal_full_forward(name):
    """Prompts of different lengths, a 7-token step budget: chunks of several prompts and decodes share steps."""
    m = _model(name)
    llm = LLM(m, max_num_batched_tokens=7, block_size=4, max_num_seqs=8)
    rec = _capture(llm)
    prompts = _prompts(1, [1, 5, 17, 33, 9, 2])
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(6)])
    _check_against_full_forward(m, rec)
    assert any(n > 1 for n in [len(t) for t, _ in rec])


def test_step_mixes_prefill_chunks_of_several_sequences_with_decodes():
    m = _model()
    llm = LLM(m, max_num_batched_tokens=16, block_size=4)
    seen: list[list[int]] = []
    run = llm.engine.runner.run
    llm.engine.runner.run = lambda sch: (seen.append([it.num_tokens for it in sch]), run(sch))[1]
    a, b = _prompts(2, [3, 10])
    eng = llm.engine
    eng.add_request("a", a, GREEDY)
    eng.step()  # a's prompt
    eng.add_request("b", b, GREEDY)
    eng.add_request("c", _prompts(3, [30])[0], GREEDY)
    eng.step()  # a decodes while b's whole prompt and c's first chunk prefill
    assert seen[-1] == [1, 10, 5]


def test_a_long_prompt_never_stalls_running_decodes():
    """A 200-token prompt arriving while another sequence decodes is chunked around it: that sequence gets its
    token in every step (decodes are scheduled before prompt chunks, as vLLM does)."""
    m = _model()
    llm = LLM(m, max_num_batched_tokens=16, block_size=4)
    eng = llm.engine
    shares = []
    run = eng.runner.run
    eng.runner.run = lambda sch: (shares.append({it.seq.request_id: it.num_tokens for it in sch}), run(sch))[1]
    eng.add_request("short", [11, 12, 13], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    eng.step()
    eng.add_request("long", _prompts(15, [200])[0], GREEDY)
    for _ in range(12):
        eng.step()
    assert all(sh.get("short") == 1 and sh.get("long") == 15 for sh in shares[1:13])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_and_batched_prefill_equal_one_shot(dtype):
    m = _model("dense", dtype)
    prompts = _prompts(4, [37, 20, 3])
    logits = []
    for budget in (3, 11, 4096):
        llm = LLM(m, max_num_batched_tokens=budget, block_size=8, enable_prefix_caching=False)
        rec = _capture(llm)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        logits.append({tuple(t): x for t, x in rec})
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for other in logits[:2]:
        assert other.keys() == logits[2].keys()
        for k in other:
            torch.testing.assert_close(other[k], logits[2][k], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_prefix_hit_restores_conv_state_and_equals_no_cache(name):
    """A second prompt sharing 37 tokens with the first (block 8): the hit covers 32 (it ends mid-block, so the
    rest is computed), conv state restored from the block-32 snapshot; logits = the full forward."""
    m = _model(name)
    llm = LLM(m, block_size=8, max_num_batched_tokens=64)
    rec = _capture(llm)
    base = _prompts(5, [60])[0]
    llm.generate([base], GREEDY)
    hit0 = llm.engine.block_manager.hit_tokens
    other = base[:37] + _prompts(6, [10])[0]
    llm.generate([other], GREEDY)
    assert llm.engine.block_manager.hit_tokens - hit0 == 32
    _check_against_full_forward(m, rec)


def test_whole_prompt_cached_still_computes_its_last_token():
    m = _model()
    llm = LLM(m, block_size=4)
    rec = _capture(llm)
    p = _prompts(7, [16])[0]
    a = llm.generate([p], GREEDY)[0].token_ids
    b = llm.generate([p], GREEDY)[0].token_ids
    assert a == b and llm.engine.block_manager.hit_tokens == 12  # 3 blocks: the last token is recomputed
    _check_against_full_forward(m, rec)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_second_chat_turn_reuses_first_turn_including_generated_tokens(name):
    m = _model(name)
    llm = LLM(m, block_size=4)
    rec = _capture(llm)
    turn1 = _prompts(8, [23])[0]
    reply = llm.generate([turn1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    turn2 = turn1 + reply + _prompts(9, [7])[0]
    before = llm.engine.block_manager.hit_tokens
    llm.generate([turn2], GREEDY)
    # the first turn's blocks filled during decode are cached too (their conv state snapshotted by decode steps):
    # everything up to the last full block of the first turn's computed tokens (23 + 12 - 1 = 34 -> 32)
    assert llm.engine.block_manager.hit_tokens - before == 32
    _check_against_full_forward(m, rec)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_prefix_caching_on_and_off_give_the_same_logits(kv):
    m = _model()
    system = _prompts(10, [45])[0]
    prompts = [system + p for p in _prompts(11, [5, 9, 2])]
    res = []
    for caching in (True, False):
        llm = LLM(m, block_size=8, enable_prefix_caching=caching, kv_cache_dtype=kv)
        rec = _capture(llm)
        for p in prompts:  # one after another: each later one hits the shared system prompt
            llm.generate([p], GREEDY)
        res.append(rec)
        if caching:
            assert llm.engine.block_manager.hit_tokens == 2 * 40
    assert [t for t, _ in res[0]] == [t for t, _ in res[1]]
    for (_, a), (_, b) in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_preemption_by_recompute_gives_the_same_tokens():
    """A pool too small for everyone: the newest running sequences yield and are recomputed; greedy and seeded
    outputs equal an unconstrained run's."""
    m = _model()
    prompts = _prompts(12, [30, 25, 28, 22, 26, 31])
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(temperature=0.7, top_p=0.9, seed=4, max_tokens=40, ignore_eos=True,
                             presence_penalty=0.5, frequency_penalty=0.3)] * 2
    big = LLM(m, block_size=4, enable_prefix_caching=False)
    ref = [o.token_ids for o in big.generate(prompts, params)]
    from lfm.engine.cache import PagedCache

    per_block = PagedCache.block_bytes(m.config, 4, m.dtype, m.dtype, True)
    small = LLM(m, block_size=4, kv_cache_memory=60 * per_block, max_model_len=72)
    got = [o.token_ids for o in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == ref
    bm = small.engine.block_manager
    bm.check([])
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_slots) == bm.num_slots


def test_flood_of_long_requests_queues_within_the_pool():
    m = _model()
    from lfm.engine.cache import PagedCache

    per_block = PagedCache.block_bytes(m.config, 8, m.dtype, m.dtype, True)
    llm = LLM(m, block_size=8, kv_cache_memory=40 * per_block, max_model_len=200, max_num_seqs=16)
    eng, bm = llm.engine, llm.engine.block_manager
    peak = 0
    step = eng.step

    def watched():
        nonlocal peak
        out = step()
        peak = max(peak, bm.num_used_blocks)
        bm.check(eng.scheduler.running)
        return out

    eng.step = watched
    outs = llm.generate(_prompts(13, [150] * 10), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert all(len(o.token_ids) == 20 for o in outs)
    assert peak <= bm.num_blocks == 40


def test_random_admits_aborts_finishes_and_preemptions_leave_everything_free():
    """Thousands of random operations on the block manager and scheduler (no model): invariants hold at every
    step, and at the end every block and conv slot is free."""
    rng = random.Random(0)
    for caching in (True, False):
        bm = BlockManager(num_blocks=48, block_size=4, num_slots=6, enable_prefix_caching=caching)
        sch = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24)
        alive: list[Sequence] = []
        shared = [rng.randrange(100) for _ in range(40)]
        for op in range(3000):
            r = rng.random()
            if r < 0.15 and len(alive) < 30:
                n = rng.randrange(1, 60)
                toks = shared[:rng.randrange(0, 40)] + [rng.randrange(100) for _ in range(n)]
                s = Sequence(f"r{op}", toks, SP(max_tokens=rng.randrange(1, 40)), set(), 10**6, None, 100)
                sch.add(s)
                alive.append(s)
            elif r < 0.22 and alive:
                s = alive.pop(rng.randrange(len(alive)))
                sch.finish(s)  # abort, waiting or running
            scheduled = sch.schedule()
            sch.commit(scheduled)
            for it in scheduled:  # "sample" for those that reached their last token; maybe finish
                s = it.seq
                if s.num_computed_tokens == len(s):
                    s.token_ids.append(rng.randrange(100))
                    if rng.random() < 0.05 and s in alive:
                        alive.remove(s)
                        sch.finish(s)
            bm.check(sch.running)
            assert len({b for s in sch.running for b in s.block_table}) <= bm.num_blocks
        for s in alive:
            sch.finish(s)
        bm.check([])
        assert bm.num_free_blocks == bm.num_blocks and sorted(bm.free_slots) == list(range(6))
        assert sch.num_preemptions > 0
        if caching:
            assert bm.hit_tokens > 0


def test_engine_with_real_model_random_aborts_frees_everything():
    m = _model()
    llm = LLM(m, block_size=4, max_num_seqs=4, max_num_batched_tokens=20)
    eng, rng = llm.engine, random.Random(1)
    ids = []
    for step in range(200):
        if rng.random() < 0.3:
            rid = f"q{step}"
            eng.add_request(rid, _prompts(step, [rng.randrange(1, 30)])[0],
                            SamplingParams(temperature=0.8, seed=step, max_tokens=rng.randrange(1, 15)))
            ids.append(rid)
        if rng.random() < 0.1 and ids:
            eng.abort_request(ids.pop(rng.randrange(len(ids))))
        eng.step()
        eng.block_manager.check(eng.scheduler.running)
    for rid in ids:
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_slots) == bm.num_slots and not eng.seqs


def test_prompt_beyond_the_context_is_refused():
    llm = LLM(_model(), max_model_len=16)
    with pytest.raises(ValueError, match="no room"):
        llm.generate([[5] * 16], GREEDY)
    assert llm.generate([[5] * 15], GREEDY)[0].finish_reason == "length"  # room for exactly one token


def test_a_sequence_whose_sampling_breaks_ends_alone():
    m = _model()
    llm = LLM(m)
    eng = llm.engine
    eng.add_request("bad", [5, 6, 7], SamplingParams(temperature=1e-42, max_tokens=5, ignore_eos=True))
    eng.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    ends = {}
    while eng.has_unfinished_requests():
        for d in eng.step():
            if d.finish_reason:
                ends[d.request_id] = (d.finish_reason, d.completion_tokens)
    assert ends["bad"][0] == "error" and ends["good"] == ("length", 5)


def test_prompt_logprobs_equal_the_full_forward():
    m = _model()
    llm = LLM(m, max_num_batched_tokens=5, block_size=4)
    p = _prompts(14, [13])[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, logprobs=1))[0]
    ref = torch.log_softmax(m(torch.tensor([p]))[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        rec = out.prompt_logprobs[j]
        assert rec.token_id == p[j]
        assert abs(rec.logprob - float(ref[j - 1, p[j]])) < 1e-4
        assert [t for t, _ in rec.top] == ref[j - 1].topk(2).indices.tolist()
    assert len(out.logprobs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_engine_on_cuda_equals_the_cpu_reference(name):
    """The engine on a GPU as served (TritonBackend and decode graphs where triton imports): mixed prefill / decode
    steps and a prefix hit give the CPU full forward's logits (float32) and the same greedy tokens. (Preemption:
    test_cuda_graph.py::test_cuda_engine_under_preemption_equals_the_cpu_reference.)"""
    m = _model(name)
    cpu_tokens = [o.token_ids for o in LLM(m, block_size=8).generate(_prompts(16, [3, 40, 17]), GREEDY)]
    gpu = LLM(_model(name).cuda(), block_size=8, max_num_batched_tokens=16)
    rec = _capture(gpu)
    prompts = _prompts(16, [3, 40, 17])
    assert [o.token_ids for o in gpu.generate(prompts, GREEDY)] == cpu_tokens
    gpu.generate([prompts[1][:33] + [5, 6]], GREEDY)  # a prefix hit (32 tokens)
    assert gpu.engine.block_manager.hit_tokens >= 32
    _check_against_full_forward(m, [(t, x.cpu()) for t, x in rec])


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_prefill_after_cached_positions_reads_keys_in_blocks(monkeypatch, one_thread, kv):
    """A chunk after cached positions attends over the cached keys one block at a time, merged by log-sum-exp
    (bounded memory at long context): with key blocks much smaller than the context, every prompt position and
    every generated token still match the full forward (float32; int8 KV within its quantization)."""
    from lfm.engine import backend

    monkeypatch.setattr(backend, "KEY_BLOCK", 8)
    m = random_model(CONFIGS["dense"])
    llm = LLM(m, block_size=4, max_num_batched_tokens=16, kv_cache_dtype=kv)
    rec = _capture(llm, all_rows=True)
    ids = list(range(3, 60))
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0))
    assert len(rec) > 40
    tol = 1e-4 if kv == "auto" else 3e-2
    _check_against_full_forward(m, rec, atol=tol, rtol=tol)
