"""`lfm batch --ray` and `lfm.ray` on a local Ray cluster started here (2 CPUs, nothing downloaded): the Ray Data path
gives the same rows as the local path (greedy), a Ray job killed with SIGKILL resumes with every row exactly once,
`LfmPredictor` works in a user's own pipeline, and a Ray Serve app with 2 replicas answers the `openai` client."""

from __future__ import annotations

import json
import socket
import sys

import jsonschema
import pytest
import torch

ray = pytest.importorskip("ray", reason="pip install 'lfm[ray]'")  # the test extra installs it: CI runs these

import lfm  # noqa: E402
from lfm.batch.io import read_rows  # noqa: E402
from lfm.batch.prompt import PromptTemplate  # noqa: E402
from lfm.batch.runner import BatchJob, run_batch  # noqa: E402
from lfm.batch.sink import open_sink, read_results  # noqa: E402
from lfm.ray import LfmPredictor, build_app, run_ray  # noqa: E402

from .test_batch import SCHEMA, _reviews, _schema_file, _write_jsonl, kill_midway  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (starting one costs seconds on a shared 2-core machine)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["dense"])


def _job(chunk: int = 3) -> BatchJob:
    return BatchJob(prompt=PromptTemplate("Extract product, sentiment and stars: {text}"), schema=SCHEMA,
                    max_tokens=60, chunk_size=chunk)


def test_ray_data_path_gives_the_same_rows_as_the_local_path(cluster, model, tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", _reviews(10), bad_lines=["{oops", '{"no_text": 1}'])
    rows = read_rows([str(tmp_path / "in.jsonl")])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = lfm.LLM(model, dtype="float32", max_num_seqs=8)
        run_batch(llm, rows, _job(), open_sink(str(tmp_path / "local")), progress=False)
    finally:
        torch.set_num_threads(before)
    stats = run_ray(rows, _job(), open_sink(str(tmp_path / "ray")), {"model": model, "dtype": "float32",
                    "max_num_seqs": 8}, replicas=2, cpus_per_replica=1, threads=1, progress=False)
    assert stats.written == len(rows) == 12
    local = {r["id"]: r for r in read_results(str(tmp_path / "local"))}
    remote = {r["id"]: r for r in read_results(str(tmp_path / "ray"))}
    assert local == remote  # greedy decoding: same text, same parsed output, same errors, whatever the replica
    assert sum(r["error"] is not None for r in remote.values()) == 2
    for r in remote.values():
        if r["error"] is None:
            jsonschema.validate(r["output"], SCHEMA)


def test_ray_job_killed_midway_resumes_every_row_exactly_once(cluster, model, tmp_path):
    n = 48
    _write_jsonl(tmp_path / "in.jsonl", _reviews(n))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lfm.cli", "batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model", model,
           "--schema", str(_schema_file(tmp_path)), "--prompt", "Extract: {text}", "--max-tokens", "60",
           "--chunk-size", "4", "--max-num-seqs", "4", "--threads", "1", "--dtype", "float32", "--ray",
           "--ray-address", cluster, "--replicas", "1", "--no-progress"]

    def progress() -> int:
        return len(read_results(str(out))) if out.exists() else 0  # reads only (opening a sink tidies temp files)

    kill_midway(cmd, progress, n, 4)
    first = {r["id"]: r for r in read_results(str(out))}
    stats = run_ray(read_rows([str(tmp_path / "in.jsonl")]), _job(4), open_sink(str(out)),
                    {"model": model, "dtype": "float32", "max_num_seqs": 4}, replicas=2, threads=1, progress=False)
    assert stats.skipped == len(first) and stats.written == n - len(first)
    rows = read_results(str(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n and set(ids) == {str(i) for i in range(n)}
    assert all({r["id"]: r for r in rows}[k] == v for k, v in first.items())
    for r in rows:
        jsonschema.validate(r["output"], SCHEMA)


def test_predictor_in_a_users_own_pipeline(cluster, model):
    ds = ray.data.from_items([{"id": i, "text": t["text"]} for i, t in enumerate(_reviews(4))])
    ds = ds.map_batches(LfmPredictor, fn_constructor_kwargs={"model": model, "prompt": "Label: {text}",
                        "classify": ["good", "bad"], "dtype": "float32", "threads": 1},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=2, batch_format="pyarrow")
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["text"] for r in out] == [t["text"] for t in _reviews(4)]  # the user's columns stay
    for r in out:
        assert r["output"] is not None and json.loads(r["output"]) in ("good", "bad") and r["error"] is None
        assert set(json.loads(r["logprobs"])) == {"good", "bad"} and r["generated_text"] == json.loads(r["output"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_two_replicas_answer_the_openai_client(cluster, model):
    from openai import OpenAI
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": model, "served_model_name": "tiny", "replicas": 2, "num_cpus": 0.5,
                             "threads": 1, "max_num_seqs": 4, "dtype": "float32"}), name="lfm", route_prefix="/")
        st = serve.status().applications["lfm"].deployments["lfm"]
        assert st.replica_states.get("RUNNING") == 2, st
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        for seed in range(4):
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Rate my phone."}],
                                          max_tokens=60, seed=seed, response_format={"type": "json_schema",
                                          "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}})
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        serve.shutdown()


def test_uris_are_read_by_ray_data_and_resume_by_id(cluster, model, tmp_path):
    """`lfm batch file:///... --ray --id-field id`: a URI is read on the cluster by Ray Data's own reader (as an
    s3:// one would be), the rows equal the local path's (greedy, float32), a second run skips the ids already
    written, and a row without its id comes back with an error (rows in = rows out)."""
    from lfm.batch.io import InputError
    from lfm.ray import run_ray_sources

    rows = _reviews(5) + [{"text": "no id on this row"}]
    src = tmp_path / "rows.jsonl"
    _write_jsonl(src, rows)
    job, kw = _job(), {"model": model, "dtype": "float32", "max_num_seqs": 4}
    local = tmp_path / "local.jsonl"
    run_batch(lfm.LLM(**kw), read_rows([str(src)], "id")[:5], job, open_sink(str(local)), progress=False)
    out = tmp_path / "ray.jsonl"
    st = run_ray_sources([src.as_uri()], "id", job, open_sink(str(out)), kw, address=cluster, threads=1,
                         progress=False)
    got = {r["id"]: r for r in read_results(str(out))}
    assert st.written == 6 and len(got) == 6
    bad = [r for r in got.values() if r["id"].startswith("#")]
    assert len(bad) == 1 and "no 'id' value" in bad[0]["error"]
    for r in read_results(str(local)):
        assert got[r["id"]]["text"] == r["text"] and got[r["id"]]["output"] == r["output"]
    st2 = run_ray_sources([src.as_uri()], "id", job, open_sink(str(out)), kw, address=cluster, threads=1,
                          progress=False)
    assert st2.skipped == 6 and st2.written == 0  # every row once: the id-less one is known by its fields' hash
    with pytest.raises(InputError, match="--ray"):
        read_rows([src.as_uri()])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "b1", "text": "fine"}\n{"id": "b2", "text": \n')
    with pytest.raises(InputError, match="the Ray job failed"):  # one line for the user, not Ray's traceback
        run_ray_sources([broken.as_uri()], "id", job, open_sink(str(tmp_path / "b.jsonl")), kw, address=cluster,
                        threads=1, progress=False)
