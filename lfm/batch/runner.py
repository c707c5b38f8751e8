"""The batch loop: keep the engine full, turn finished requests into result rows, write them chunk by chunk.

`process_rows` feeds the one engine continuously (up to a window of requests in flight, then one `step`, then more
as rows finish: no barrier between chunks) and yields one result per input row, in completion order. It is what
both the local job (`run_batch`) and each Ray replica (`lfm.ray.LfmPredictor`) run, so the two give the same rows.

A result has the row's id, `output` (the parsed JSON object for a schema, the label for --classify, else the text),
the raw `text`, token counts, `finish_reason`, `error` (why the row could not be done; then output is None) and for
--classify `logprobs`: each label's log-probability given the prompt (the sum over its tokens).

--classify is a constrained choice evaluated exactly: every label is scored whole (as lm-eval's multiple choice
does), and the row's label is the most likely one (temperature 0) or drawn from the labels' renormalized
probabilities (temperature > 0, seeded per row). So the label is always from the list and agrees with the reported
log-probabilities; a token-by-token constrained decode (`SamplingParams(choice=...)`) can commit to a label's likely
first token and end on a label that is unlikely as a whole.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from .io import InputRow
from .progress import Progress
from .prompt import PromptTemplate, RowError
from .sink import Sink

_req = itertools.count()


@dataclass
class BatchJob:
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    schema: dict | None = None  # every output parses and validates (constrained decoding + jsonschema check)
    classify: list[str] | None = None  # one label per row, constrained; with per-label log-probabilities
    max_tokens: int = 256
    temperature: float = 0.0  # greedy by default: extraction wants the most likely answer, reproducibly
    seed: int | None = None  # with temperature > 0: each row seeded from (seed, id), whatever the batching
    chunk_size: int = 100  # rows per atomic write (the most a kill can lose)

    def __post_init__(self) -> None:
        if self.schema is not None and self.classify is not None:
            raise ValueError("--schema and --classify are exclusive")
        if self.classify is not None:
            labels = [c for c in self.classify if c]
            if not labels or len(set(labels)) != len(labels):
                raise ValueError("--classify needs distinct, non-empty labels (e.g. positive,negative,neutral)")
            self.classify = labels
        if self.chunk_size < 1:
            raise ValueError("chunk size must be at least 1")

    def sampling_params(self, row_id: str) -> SamplingParams:
        seed = None if self.seed is None else zlib.crc32(f"{self.seed}:{row_id}".encode())
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, seed=seed,
                              json_schema=self.schema)


@dataclass
class _Group:
    """One row's requests: the generation, plus one scoring request per label for --classify."""

    row: InputRow
    gen: Any = None  # the generation Sequence (None for --classify)
    scores: dict[str, tuple[Any, int, int]] = field(default_factory=dict)  # label -> (Sequence, start, n)
    open: int = 0
    error: str | None = None


def _error_row(row_id: str, error: str) -> dict[str, Any]:
    return {"id": row_id, "output": None, "text": None, "prompt_tokens": 0, "completion_tokens": 0,
            "finish_reason": None, "error": error, "logprobs": None}


class RowFeed:
    """Rows that arrive while the job runs (`lfm.ray.LfmPredictor`: several Ray batches feeding one engine, so it
    stays full between batches). `put` from any thread; `close` ends `process_rows` once its rows are done."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.done = False

    def put(self, row: InputRow) -> None:
        self._q.put(row)

    def close(self) -> None:
        self._q.put(self._END)

    def next(self, block: bool) -> InputRow | None:
        """The next row; None when none is there now (block=False) or after `close`."""
        import queue

        if self.done:
            return None
        try:
            row = self._q.get(block)
        except queue.Empty:
            return None
        if row is self._END:
            self.done = True
            return None
        return row


class _IterFeed:
    def __init__(self, rows: Iterable[InputRow]) -> None:
        self._it = iter(rows)
        self.done = False

    def next(self, block: bool) -> InputRow | None:
        row = None if self.done else next(self._it, None)
        self.done = row is None
        return row


def process_rows(llm: LLM, rows: Iterable[InputRow] | RowFeed, job: BatchJob) -> Iterator[dict[str, Any]]:
    """One result per row (completion order). Rows that cannot be done come back at once with their error. `rows`
    may be a `RowFeed`: then new rows are taken between engine steps, and waited for only when nothing runs."""
    eng = llm.engine
    window = max(2 * eng.config.max_num_seqs, 8)
    validator = _validator(job.schema)
    label_ids = {lab: llm._need_tokenizer().encode(lab, add_bos=False) for lab in job.classify or []}
    reqs: dict[str, _Group] = {}
    source = rows if isinstance(rows, RowFeed) else _IterFeed(rows)
    try:
        while True:
            while len(reqs) < window:
                row = source.next(block=not reqs)  # block only when the engine has nothing to do
                if row is None:
                    break
                if row.error is not None:
                    yield _error_row(row.id, row.error)
                else:
                    try:
                        _submit(llm, job, row, label_ids, reqs)
                    except (RowError, ValueError, TypeError, KeyError) as e:
                        yield _error_row(row.id, str(e) or type(e).__name__)
                    except Exception as e:  # noqa: BLE001  a chat template that fails on this row's messages
                        yield _error_row(row.id, f"cannot build the prompt: {type(e).__name__}: {e}")
            if not reqs:
                if source.done:
                    return
                continue
            if not eng.has_unfinished_requests():
                raise RuntimeError("the engine stopped with batch requests unfinished")
            for d in eng.step():
                g = reqs.get(d.request_id)
                if g is None or d.finish_reason is None:
                    continue
                del reqs[d.request_id]
                g.open -= 1
                if d.finish_reason == "error":
                    g.error = d.error or "generation failed"
                if g.open == 0:
                    yield _result(g, job, validator)
    finally:
        for r in reqs:
            eng.abort_request(r)


def _submit(llm: LLM, job: BatchJob, row: InputRow, label_ids: dict[str, list[int]], reqs: dict[str, _Group]) -> None:
    rendered = job.prompt.render(row.fields or {})
    chat = not isinstance(rendered, str)
    ids = llm.encode_chat(rendered) if chat else llm._encode(rendered)
    eng = llm.engine
    g = _Group(row)
    added: list[str] = []
    try:
        if job.classify is None:
            rid = f"batch-{next(_req)}"
            g.gen = eng.add_request(rid, ids, llm.with_constraint(job.sampling_params(row.id)), chat)
            added.append(rid)
        for lab, lids in label_ids.items():  # log P(label | prompt): the label's tokens scored as prompt tokens
            rid = f"batch-{next(_req)}"
            seq = eng.add_request(rid, ids + lids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                  chat)
            g.scores[lab] = (seq, len(ids), len(lids))
            added.append(rid)
    except Exception:
        for r in added:
            eng.abort_request(r)
        raise
    g.open = len(added)
    for r in added:
        reqs[r] = g


def _classified(g: _Group, job: BatchJob) -> dict[str, Any]:
    res = _error_row(g.row.id, g.error) if g.error else {"id": g.row.id, "error": None}
    if g.error:
        return res
    lp = {lab: float(sum(rec.logprob for rec in seq.prompt_logprobs[start:start + n]))
          for lab, (seq, start, n) in g.scores.items()}
    labels = list(lp)
    if job.temperature == 0:
        pick = max(labels, key=lambda lab: lp[lab])
    else:
        import torch

        gen = torch.Generator().manual_seed(job.sampling_params(g.row.id).seed or 0)
        probs = torch.softmax(torch.tensor([lp[lab] for lab in labels]) / job.temperature, 0)
        pick = labels[int(torch.multinomial(probs, 1, generator=gen))]
    seq, start, n = g.scores[pick]
    return {**res, "output": pick, "text": pick, "prompt_tokens": start, "completion_tokens": n,
            "finish_reason": "stop", "logprobs": lp}


def _result(g: _Group, job: BatchJob, validator: Any) -> dict[str, Any]:
    if job.classify is not None:
        return _classified(g, job)
    out = g.gen.to_output()
    res = {"id": g.row.id, "output": None, "text": out.text, "prompt_tokens": len(out.prompt_token_ids),
           "completion_tokens": len(out.token_ids), "finish_reason": out.finish_reason, "error": g.error,
           "logprobs": None}
    if g.error is not None:
        return res
    if job.schema is not None:
        try:
            obj = json.loads(out.text)
            validator.validate(obj)
            res["output"] = obj
        except Exception as e:  # noqa: BLE001  never a silently wrong row: the reason goes in `error`
            hint = " (raise --max-tokens)" if out.finish_reason == "length" else ""
            res["error"] = f"output does not validate against the schema{hint}: {str(e).splitlines()[0][:200]}"
    else:
        res["output"] = out.text
    return res


def _validator(schema: dict | None) -> Any:
    if schema is None:
        return None
    try:
        import jsonschema
    except ImportError:
        raise ValueError("--schema needs jsonschema (pip install jsonschema)") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"the schema is not a valid JSON schema: {e.message}") from None
    return cls(schema)


@dataclass
class BatchStats:
    total: int
    skipped: int  # already in the output (resume)
    written: int
    errors: int
    seconds: float
    completion_tokens: int


def run_batch(llm: LLM, rows: list[InputRow], job: BatchJob, sink: Sink, progress: bool = True) -> BatchStats:
    """Do every row not yet in `sink`, writing chunk by chunk (each chunk atomic). Input rows = output rows."""
    import time

    done = sink.done_ids()
    todo = [r for r in rows if r.id not in done]
    bar = Progress(len(rows), len(rows) - len(todo), progress)
    t0 = time.perf_counter()
    buf: list[dict[str, Any]] = []
    written = errors = tokens = 0
    if job.schema is not None:  # compile once up front: a bad schema fails the job now, not on every row
        llm.with_constraint(job.sampling_params(""))
    for res in process_rows(llm, todo, job):
        buf.append(res)
        errors += res["error"] is not None
        tokens += res["completion_tokens"] or 0
        bar.update(1, res["completion_tokens"] or 0, int(res["error"] is not None))
        if len(buf) >= job.chunk_size:
            sink.write(buf)
            written += len(buf)
            buf = []
    sink.write(buf)
    written += len(buf)
    bar.close()
    return BatchStats(len(rows), len(rows) - len(todo), written, errors, time.perf_counter() - t0, tokens)
