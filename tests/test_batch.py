"""`lfm batch` on one machine and offline structured output (`SamplingParams(json_schema=..., regex=..., choice=...,
grammar=...)`), from random weights: every output validates, bad rows are carried with an error (input rows = output
rows), labels come from the list, and a job killed with SIGKILL resumes with every row exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lfm
from lfm.batch.io import read_rows
from lfm.batch.prompt import PromptTemplate
from lfm.batch.runner import BatchJob, run_batch
from lfm.batch.sink import JsonlFile, PartsDir, open_sink, read_results

SCHEMA = {"type": "object", "properties": {
    "product": {"type": "string", "maxLength": 24},
    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
    "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["product", "sentiment", "stars"], "additionalProperties": False}
LABELS = ["positive", "negative", "neutral"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def llm(checkpoints):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lfm.LLM(checkpoints["dense"], dtype="float32", max_num_seqs=16)
    torch.set_num_threads(before)


def _reviews(n: int) -> list[dict]:
    things = ["phone", "laptop", "kettle", "bike", "lamp", "chair"]
    moods = ["I love my new", "Terrible", "It is an okay", "Best ever:", "Broken after a week:"]
    return [{"id": f"r{i}", "text": f"{moods[i % 5]} {things[i % 6]} number {i}"} for i in range(n)]


def _write_jsonl(path, rows, bad_lines=()):
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if i < len(bad_lines):
                f.write(bad_lines[i] + "\n")


# ---- offline structured output (vLLM: SamplingParams(structured_outputs=StructuredOutputsParams(json=...)) ----------
def test_each_request_in_a_batch_gets_its_own_constraint(llm):
    # vLLM: every request carries its own structured_outputs; choice = exactly one of the strings, regex = a full
    # match, json = a schema-valid document (docs.vllm.ai/en/latest/features/structured_outputs)
    params = [lfm.SamplingParams(max_tokens=80, temperature=1.0, seed=s, json_schema=SCHEMA) for s in range(4)]
    params += [lfm.SamplingParams(max_tokens=20, temperature=1.0, seed=9, choice=LABELS + ['say "hi"']),
               lfm.SamplingParams(max_tokens=24, temperature=1.0, seed=5, regex=r"[0-9]{3}-[a-z]{2,6}"),
               lfm.SamplingParams(max_tokens=24, temperature=1.0, seed=6,
                                  structured_outputs=lfm.StructuredOutputsParams(grammar='root ::= "yes" | "no" | "maybe"')),
               lfm.SamplingParams(max_tokens=24, temperature=1.0, seed=7)]
    outs = llm.generate([f"Review {i}:" for i in range(len(params))], params)
    for o in outs[:4]:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert outs[4].text in LABELS + ['say "hi"']
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,6}", outs[5].text), outs[5].text
    assert outs[6].text in ("yes", "no", "maybe")
    unconstrained = llm.generate("Review 7:", lfm.SamplingParams(max_tokens=24, temperature=1.0, seed=7))[0]
    assert outs[7].text == unconstrained.text  # a neighbour's constraint never leaks into another request


def test_chat_takes_structured_output_too(llm):
    out = llm.chat([{"role": "user", "content": "Rate it."}],
                   lfm.SamplingParams(max_tokens=80, temperature=1.0, seed=1, structured_outputs={"json": SCHEMA}))
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_structured_output_errors_are_clear(llm):
    with pytest.raises(ValueError, match="exactly one"):
        lfm.StructuredOutputsParams(json=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="not both"):
        lfm.SamplingParams(json_schema=SCHEMA, structured_outputs={"regex": "a+"})
    with pytest.raises(ValueError, match="non-empty list"):
        lfm.SamplingParams(choice=[])
    with pytest.raises(ValueError, match="invalid grammar"):
        llm.generate("x", lfm.SamplingParams(grammar="root ::= ("))


# ---- lfm batch, local ------------------------------------------------------------------------------------------------
def test_every_row_is_schema_valid_and_bad_rows_carry_an_error(llm, tmp_path):
    good = _reviews(10)
    _write_jsonl(tmp_path / "a.jsonl", good[:6], bad_lines=["{not json", "[1, 2]", '{"id": "x1"}'])
    with open(tmp_path / "b.csv", "w") as f:
        f.write("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in good[6:8]) + "c1,too,many,values\n")
    pq.write_table(pa.table({"id": [r["id"] for r in good[8:]], "text": [r["text"] for r in good[8:]]}),
                   tmp_path / "c.parquet")
    rows = read_rows([str(tmp_path / "a.jsonl"), str(tmp_path / "*.csv"), str(tmp_path / "c.parquet")])
    assert len(rows) == 14
    job = BatchJob(prompt=PromptTemplate("Extract product, sentiment and stars: {text}"), schema=SCHEMA,
                   max_tokens=80, temperature=1.0, seed=0, chunk_size=4)
    stats = run_batch(llm, rows, job, open_sink(str(tmp_path / "out")), progress=False)
    out = read_results(str(tmp_path / "out"))
    assert stats.written == len(out) == len(rows) and sorted(r["id"] for r in out) == sorted(r.id for r in rows)
    errors = {r["id"]: r["error"] for r in out if r["error"]}
    assert set(errors) == {"1", "3", "5", "11"}, errors  # bad JSON, a list, no 'text' field, a bad CSV line
    assert "not valid JSON" in errors["1"] and "no field 'text'" in errors["5"] and "more values" in errors["11"]
    for r in out:
        if not r["error"]:
            jsonschema.validate(r["output"], SCHEMA)
            assert json.loads(r["text"]) == r["output"] and r["completion_tokens"] > 0


def test_too_long_prompt_is_an_error_row_not_a_crash(checkpoints, tmp_path):
    small = lfm.LLM(checkpoints["dense"], dtype="float32", max_model_len=64)
    rows = read_rows([str(_jsonl(tmp_path, [{"text": "short"}, {"text": "long " * 200}, {"text": "also short"}]))])
    job = BatchJob(prompt=PromptTemplate("{text}", chat=False), schema=SCHEMA, max_tokens=40)
    run_batch(small, rows, job, open_sink(str(tmp_path / "o.jsonl")), progress=False)
    out = {r["id"]: r for r in read_results(str(tmp_path / "o.jsonl"))}
    assert len(out) == 3 and "no room" in out["1"]["error"] and out["1"]["output"] is None
    assert out["0"]["error"] is None or "max-tokens" in out["0"]["error"]


def _jsonl(tmp_path, rows):
    p = tmp_path / "in.jsonl"
    _write_jsonl(p, rows)
    return p


def test_classify_labels_are_from_the_list_with_logprobs(llm, tmp_path):
    rows = read_rows([str(_jsonl(tmp_path, _reviews(8)))], id_field="id")
    for temperature in (0.0, 1.0):
        job = BatchJob(prompt=PromptTemplate("Sentiment ({labels}) of: {text}"), classify=LABELS,
                       temperature=temperature, seed=3)
        sink = str(tmp_path / f"cls{temperature}.jsonl")
        run_batch(llm, rows, job, open_sink(sink), progress=False)
        out = read_results(sink)
        assert len(out) == 8
        for r in out:
            assert r["output"] in LABELS and set(r["logprobs"]) == set(LABELS)
            assert all(v < 0 for v in r["logprobs"].values())
            if temperature == 0:  # the label is the most likely whole label (lm-eval's multiple choice)
                assert r["output"] == max(r["logprobs"], key=r["logprobs"].get)


def test_label_logprob_is_the_sum_over_its_tokens(llm):
    # log P(label | prompt) computed independently: the plain model's full forward over prompt + label
    job = BatchJob(prompt=PromptTemplate("Sentiment of: {text}", chat=False), classify=LABELS)
    from lfm.batch.runner import process_rows

    (res,) = list(process_rows(llm, read_rows_from([{"text": "great"}]), job))
    p = llm.tokenizer.encode("Sentiment of: great")
    for lab in LABELS:
        ids = p + llm.tokenizer.encode(lab, add_bos=False)
        with torch.inference_mode():
            lp = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0], -1)
        want = sum(float(lp[i - 1, ids[i]]) for i in range(len(p), len(ids)))
        assert res["logprobs"][lab] == pytest.approx(want, abs=1e-3)


def read_rows_from(dicts):
    from lfm.batch.io import InputRow

    return [InputRow(str(i), d) for i, d in enumerate(dicts)]


# ---- atomic sinks and resume -----------------------------------------------------------------------------------------
def test_jsonl_sink_drops_a_partial_last_line_and_parts_ignore_temp_files(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "outp')
    s = JsonlFile(p)
    assert s.done_ids() == {"a"} and p.read_text().count("\n") == 1
    d = tmp_path / "parts"
    PartsDir(d, "parquet").write([{"id": "a"}])
    (d / ".part-000001.parquet.tmp").write_bytes(b"half")
    s = PartsDir(d, "parquet")
    assert s.done_ids() == {"a"} and not list(d.glob(".*.tmp")) and s.next == 1


def _lines(path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def kill_midway(cmd: list[str], progress, total: int, min_done: int) -> None:
    """Start `cmd`, SIGKILL it once progress() >= min_done rows are written, and check that it was mid-way."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # now: ray.init puts its cluster's auth token in os.environ
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while progress() < min_done and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = progress()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert min_done <= done < total, f"the kill landed at {done}/{total} rows: not mid-way"


def test_sigkill_then_resume_does_every_row_exactly_once(checkpoints, tmp_path):
    n = 120
    _write_jsonl(tmp_path / "in.jsonl", _reviews(n), bad_lines=["{bad"])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "lfm.cli", "batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model",
           str(checkpoints["dense"]), "--schema", str(_schema_file(tmp_path)), "--prompt", "Extract: {text}",
           "--max-tokens", "60", "--chunk-size", "8", "--max-num-seqs", "8", "--threads", "1", "--temperature", "1",
           "--seed", "0", "--dtype", "float32"]
    kill_midway(cmd, lambda: _lines(out), n + 1, 8)
    before = [json.loads(line) for line in out.read_text().splitlines()]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert f"{len(before)} already done" in p.stderr
    rows = read_results(str(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n + 1 and set(ids) == {str(i) for i in range(n + 1)}
    assert rows[:len(before)] == before  # what was written stays as it was
    assert [r["id"] for r in rows if r["error"]] == ["1"]
    for r in rows:
        if not r["error"]:
            jsonschema.validate(r["output"], SCHEMA)


def _schema_file(tmp_path):
    p = tmp_path / "schema.json"
    p.write_text(json.dumps(SCHEMA))
    return p


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "bad.json").write_text("{nope")
    for args, msg in [(["--schema", str(tmp_path / "bad.json")], "is not valid JSON"),
                      (["--schema", str(tmp_path / "missing.json")], "cannot read the schema"),
                      (["--prompt", "{text"], "bad prompt template"),
                      (["--classify", "a,a"], "distinct")]:
        p = subprocess.run([sys.executable, "-m", "lfm.cli", "batch", str(tmp_path / "in.jsonl"), "-o",
                            str(tmp_path / "o.jsonl"), *args], env=ENV, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and msg in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "lfm.cli", "batch", str(tmp_path / "nothing*.jsonl"), "-o",
                        str(tmp_path / "o.jsonl")], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no file matches" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()



def test_concurrent_predictor_calls_share_one_engine_and_give_the_same_rows(checkpoints):
    """lfm.ray.LfmPredictor: Ray runs several batches at once in one actor (threads); they feed one engine loop
    (RowFeed), so it never drains between batches. Each call gets exactly its own rows back, even when two calls use
    the same (batch-local) ids, and the rows equal the plain local loop's (greedy, float32; no schema here: the
    routing is what is tested, the constrained outputs are in the tests above)."""
    import threading

    from lfm.batch.io import InputRow
    from lfm.batch.runner import process_rows
    from lfm.ray import LfmPredictor

    before = torch.get_num_threads()
    try:
        pred = LfmPredictor(checkpoints["dense"], prompt="Extract: {text}", dtype="float32", max_num_seqs=4,
                            threads=1)
        pred.job.max_tokens = 12
        reviews = _reviews(10)
        want = {r["id"]: r for r in process_rows(pred.llm, [InputRow(str(i), t) for i, t in enumerate(reviews)],
                                                 pred.job)}
        assert all(r["error"] is None and r["text"] for r in want.values())
        batches = [reviews[:3], reviews[3:7], reviews[7:], reviews[:2]]  # ids are batch-local positions: repeat
        got: list = [None] * len(batches)

        def call(i: int) -> None:
            got[i] = pred({"text": pa.array([t["text"] for t in batches[i]])}).to_pylist()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        offsets = [0, 3, 7, 0]
        for b, rows, off in zip(batches, got, offsets):
            assert [r["text"] for r in rows] == [t["text"] for t in b]  # the caller's own rows, in order
            for j, r in enumerate(rows):
                ref = want[str(off + j)]
                assert r["generated_text"] == ref["text"] and r["error"] is None
                assert json.loads(r["output"]) == ref["output"]
    finally:
        torch.set_num_threads(before)
