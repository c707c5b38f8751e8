"""Ray for `lfm`: batch inference as a Ray Data pipeline, and `lfm serve`'s app as a Ray Serve deployment.

- `LfmPredictor`: a stateful class for `Dataset.map_batches` that holds one `lfm.LLM` per replica (actor) and runs
  the batch loop of `lfm.batch.runner` on each batch: the same rows as the local `lfm batch`. Use it in your own
  pipelines: `ds.map_batches(LfmPredictor, fn_constructor_kwargs={"model": ..., "prompt": "...{text}",
  "schema": {...}}, concurrency=4, num_gpus=1)`; it adds the result columns to the batch's columns.
- `run_ray`: what `lfm batch --ray` runs. The driver skips the ids already in the output (resume), the replicas
  generate, and the driver writes each finished block through the same atomic sink as the local path, so a killed
  job (driver or workers) restarts with every row exactly once; Ray restarts failed actors and retries their tasks.
- `build_app` / `app`: `serve run lfm.ray:app` (or `lfm serve --ray --replicas N`) puts N replicas of the
  OpenAI-compatible app behind one endpoint; with `max_replicas`, Ray Serve scales the count by ongoing requests per
  replica (the queue length).

`ray` itself is imported inside the functions: importing `lfm.ray` does not start or need a cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .batch.io import InputRow
from .batch.prompt import PromptTemplate
from .batch.runner import BatchJob, BatchStats
from .batch.sink import Sink

__all__ = ["LfmPredictor", "run_ray", "build_app", "serve_ray"]

RESULT_COLUMNS = ("output", "text", "prompt_tokens", "completion_tokens", "finish_reason", "error", "logprobs")
_INTERNAL = "__lfm_fields__"  # run_ray's rows: id, the row's fields as JSON text, the reading error
_ROW_ID = "__lfm_id__"  # the id each result row was processed under (a row without its id field: a fresh one)


class _Call:
    """One `LfmPredictor` call's rows in the shared engine loop: their results, and an event set when all are in."""

    def __init__(self, n: int) -> None:
        import threading

        self.n, self.results, self.done = n, {}, threading.Event()

    def add(self, key: str, res: dict) -> None:
        self.results[key] = res
        if len(self.results) == self.n:
            self.done.set()


class _Feeder:
    """The actor's one engine loop (a thread running `process_rows` over a `RowFeed`), shared by every batch the
    actor is given at once: a batch's rows join the running engine as they arrive, and its call returns when they
    are all done. So the engine stays full across batches (no drain at each batch's end), as the local job's does."""

    def __init__(self, llm: Any, job: BatchJob) -> None:
        import itertools
        import threading

        from .batch.runner import RowFeed

        self.llm, self.job = llm, job
        self.feed = RowFeed()
        self.lock = threading.Lock()
        self.calls: dict[str, _Call] = {}  # a row's private key -> its call
        self.keys = itertools.count()
        self.failed: str | None = None
        threading.Thread(target=self._run, name="lfm-batch", daemon=True).start()

    def _run(self) -> None:
        from .batch.runner import process_rows

        try:
            for res in process_rows(self.llm, self.feed, self.job):
                with self.lock:
                    call = self.calls.pop(res["id"])
                call.add(res["id"], res)
        except BaseException as e:  # noqa: BLE001  every waiting call fails (Ray retries its task)
            with self.lock:
                self.failed = f"{type(e).__name__}: {e}"
                for call in self.calls.values():
                    call.done.set()

    def run(self, rows: list[InputRow]) -> dict[str, dict]:
        """Results of `rows` by their id. Ids may repeat across concurrent calls (a user's batch-local ids), so
        each row travels under a private key."""
        if not rows:
            return {}
        call = _Call(len(rows))
        with self.lock:
            if self.failed:
                raise RuntimeError(f"the replica's engine loop failed: {self.failed}")
            keyed = [(str(next(self.keys)), r) for r in rows]
            for k, _ in keyed:
                self.calls[k] = call
        for k, r in keyed:
            self.feed.put(InputRow(k, r.fields, r.error))
        call.done.wait()
        if len(call.results) < call.n:
            raise RuntimeError(f"the replica's engine loop failed: {self.failed}")
        return {r.id: {**call.results[k], "id": r.id} for k, r in keyed}


class LfmPredictor:
    """One `lfm.LLM` per Ray actor; `__call__(batch)` -> the batch's columns plus `output` (JSON text), the raw
    `generated_text` (Ray Data LLM's name, so a `text` input column stays),
    token counts, `finish_reason`, `error` and `logprobs` (JSON text; --classify only), as an Arrow table.
    Calls may run concurrently (`ActorPoolStrategy(max_concurrent_calls_per_actor=..,
    enable_true_multi_threading=True)`): they share the actor's one engine, which then never drains between
    batches."""

    def __init__(self, model: str | None = None, prompt: str | None = None, schema: dict | None = None,
                 classify: list[str] | None = None, job: BatchJob | None = None, id_column: str = "id",
                 threads: int | None = None, **llm_kwargs: Any) -> None:
        import torch

        from .engine.llm import LLM

        if threads:
            torch.set_num_threads(threads)
        self.job = job or BatchJob(prompt=PromptTemplate(prompt, schema=schema, labels=classify), schema=schema,
                                   classify=classify)
        self.id_column = id_column
        self.llm = LLM(model, **llm_kwargs)
        self.feeder = _Feeder(self.llm, self.job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        if hasattr(batch, "to_pydict"):  # pyarrow.Table
            cols = batch.to_pydict()
        elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
            cols = batch.to_dict("list")
        else:  # dict of numpy arrays
            cols = {k: list(v.tolist() if hasattr(v, "tolist") else v) for k, v in batch.items()}
        n = len(next(iter(cols.values()), []))
        internal = _INTERNAL in cols
        rows = []
        for i in range(n):
            if internal:
                f = cols[_INTERNAL][i]
                err = cols["error"][i]
                rows.append(InputRow(str(cols["id"][i]), None if f is None else json.loads(f),
                                     err if isinstance(err, str) else None))
            else:
                fields = {k: v[i] for k, v in cols.items()}
                if self.id_column in fields and not _absent(fields[self.id_column]):
                    rows.append(InputRow(str(fields[self.id_column]), fields))
                elif self.id_column in cols:  # a row without its id: carried with an error, never dropped
                    rows.append(InputRow(_missing_id(fields), None, f"the row has no '{self.id_column}' value"))
                else:  # a user's pipeline without ids: the batch position
                    rows.append(InputRow(str(i), fields))
        return _table(rows, self.feeder.run(rows), None if internal else cols)


def _absent(v: Any) -> bool:
    """A missing value as Ray's readers give it: None, or NaN (pandas-based readers fill missing cells with NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _missing_id(fields: dict) -> str:
    """The id of a row that lacks its id field: a hash of its present fields, so a resumed job recognizes it."""
    text = json.dumps({k: v for k, v in fields.items() if not _absent(v)}, sort_keys=True, ensure_ascii=False,
                      default=str)
    return "#" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _table(rows: list[InputRow], by_id: dict[str, dict], cols: dict[str, list] | None):
    """An Arrow table with fixed result types (a column of Nones must stay a string column, not become NaN)."""
    import pyarrow as pa

    data = {"id": pa.array([r.id for r in rows], pa.string())} if cols is None else \
        {k: pa.array(v) for k, v in cols.items()}
    for c in RESULT_COLUMNS:
        vals = [by_id[r.id][c] for r in rows]
        if c in ("output", "logprobs"):
            vals = [None if v is None else json.dumps(v, ensure_ascii=False) for v in vals]
        name = "generated_text" if c == "text" and cols is not None else c  # as Ray Data LLM names it; keeps `text`
        data[name] = pa.array(vals, pa.int64() if c.endswith("_tokens") else pa.string())
    if cols is not None:
        data[_ROW_ID] = pa.array([r.id for r in rows], pa.string())
    return pa.table(data)


def _init(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)


def _pool(job: BatchJob, llm_kwargs: dict, replicas: int):
    """Enough batches in flight per replica to keep its engine full (max_num_seqs sequences and the next ones
    queued); they run at once on the replica's one engine (_Feeder). Ray Data restarts failed actors and retries
    their tasks."""
    import ray

    seqs = int(llm_kwargs.get("max_num_seqs") or 64)
    calls = max(2, math.ceil(2 * seqs / job.chunk_size))
    return ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=calls,
                                      max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)


def _drain(ds, sink: Sink, bar) -> tuple[int, int, int]:
    """The driver's side: each finished block written atomically through the sink. Returns (rows, errors, tokens)."""
    written = errors = tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        out = []
        for r in batch.to_pylist():
            rid = r[_ROW_ID] if _ROW_ID in r else r["id"]
            text = r["generated_text"] if "generated_text" in r else r["text"]
            r = {"id": str(rid), **{c: r[c] for c in RESULT_COLUMNS if c != "text"}, "text": text}
            for c in ("output", "logprobs"):
                r[c] = None if r[c] is None else json.loads(r[c])
            out.append({k: r[k] for k in ("id", *RESULT_COLUMNS)})
        sink.write(out)
        e = sum(r["error"] is not None for r in out)
        t = sum(r["completion_tokens"] or 0 for r in out)
        written, errors, tokens = written + len(out), errors + e, tokens + t
        bar.update(len(out), t, e)
    return written, errors, tokens


def run_ray(rows: list[InputRow], job: BatchJob, sink: Sink, llm_kwargs: dict, address: str | None = None,
            replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
            threads: int | None = None, progress: bool = True) -> BatchStats:
    """`lfm batch --ray` on rows the driver read: from_items -> map_batches(LfmPredictor) -> the driver writes."""
    import time

    import ray

    from .batch.progress import Progress

    _connect(address)
    done = sink.done_ids()
    todo = [r for r in rows if r.id not in done]
    bar = Progress(len(rows), len(rows) - len(todo), progress)
    t0 = time.perf_counter()
    written = errors = tokens = 0
    if todo:
        items = [{"id": r.id, _INTERNAL: None if r.fields is None else json.dumps(r.fields, ensure_ascii=False,
                                                                                 default=str),
                  "error": r.error} for r in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / job.chunk_size)))
        ds = ds.map_batches(LfmPredictor, fn_constructor_kwargs={"job": job, "threads": threads, **llm_kwargs},
                            batch_size=job.chunk_size, compute=_pool(job, llm_kwargs, replicas), batch_format="pyarrow",
                            **_resources(cpus_per_replica, gpus_per_replica))
        written, errors, tokens = _drain(ds, sink, bar)
    bar.close()
    return BatchStats(len(rows), len(rows) - len(todo), written, errors, time.perf_counter() - t0, tokens)


def read_sources(sources: list[str]):
    """URIs (s3://, gs://, file://, ...) as one Ray Data dataset, read on the cluster by Ray's own readers, chosen
    by the file suffix: .jsonl / .ndjson (read_json), .csv / .tsv (read_csv), .parquet (read_parquet), .txt
    (read_text: a `text` column)."""
    import pyarrow.csv as pacsv
    import ray

    from .batch.io import SUFFIXES, InputError

    parts = []
    for src in sources:
        kind = SUFFIXES.get("." + src.rsplit(".", 1)[-1].lower()) if "." in src.rsplit("/", 1)[-1] else None
        if kind in ("jsonl",):
            parts.append(ray.data.read_json(src, lines=True))
        elif kind in ("csv", "tsv"):
            parts.append(ray.data.read_csv(src, parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv"
                                                                                  else ",")))
        elif kind == "parquet":
            parts.append(ray.data.read_parquet(src))
        elif kind == "text":
            parts.append(ray.data.read_text(src))
        else:
            raise InputError(f"{src}: Ray Data reads .jsonl / .ndjson, .csv / .tsv, .parquet and .txt URIs")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def run_ray_sources(sources: list[str], id_field: str, job: BatchJob, sink: Sink, llm_kwargs: dict,
                    address: str | None = None, replicas: int = 1, gpus_per_replica: float = 0.0,
                    cpus_per_replica: float = 1.0, threads: int | None = None, progress: bool = True) -> BatchStats:
    """`lfm batch URI... --ray --id-field F`: read (Ray Data's readers, on the cluster) -> filter out the ids already
    written (resume) -> map_batches(LfmPredictor) -> the driver writes each finished block atomically. A row
    without the id field comes back with an error; nothing is dropped."""
    import time

    import ray

    from .batch.progress import Progress

    _connect(address)
    done = sink.done_ids()
    bar = Progress(0, len(done), progress)  # a streamed read: the total is not known up front
    t0 = time.perf_counter()
    try:
        ds = read_sources(sources)
        if id_field not in ds.columns():
            from .batch.io import InputError

            raise InputError(f"the inputs have no '{id_field}' column (columns: {', '.join(ds.columns())})")
        if done:
            ds = ds.filter(lambda r: (_missing_id(r) if _absent(r[id_field]) else str(r[id_field])) not in done)
        ds = ds.map_batches(LfmPredictor, fn_constructor_kwargs={"job": job, "threads": threads,
                                                                "id_column": id_field, **llm_kwargs},
                            batch_size=job.chunk_size, compute=_pool(job, llm_kwargs, replicas),
                            batch_format="pyarrow", **_resources(cpus_per_replica, gpus_per_replica))
        written, errors, tokens = _drain(ds, sink, bar)
    except ray.exceptions.RayError as e:  # e.g. a malformed line: Ray's readers fail the read, not the row
        from .batch.io import InputError

        cause = getattr(e, "cause", None) or e
        last = [ln for ln in str(cause).splitlines() if ln.strip()] or [type(cause).__name__]
        raise InputError(f"the Ray job failed (rows written so far are kept; fix the input and rerun to resume): "
                         f"{type(cause).__name__}: {last[-1].strip()[:300]}") from None
    finally:
        bar.close()
    return BatchStats(written + len(done), len(done), written, errors, time.perf_counter() - t0, tokens)


def _resources(cpus: float, gpus: float) -> dict:
    return {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}


def _connect(address: str | None) -> None:
    import ray

    try:
        _init(address)
    except ConnectionError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {e}") from None
    ray.data.DataContext.get_current().enable_progress_bars = False


# ------------------------------------------------------------------------------------------------ Ray Serve
def build_app(args: dict[str, Any] | None = None):
    """A Ray Serve application of `lfm serve`'s app. args: `model`, `replicas` (a fixed count) or `min_replicas` /
    `max_replicas` (autoscaling on ongoing requests per replica, target `target_ongoing_requests`), `num_cpus`,
    `num_gpus`, and any `lfm.serve.ServeConfig` field (max_num_seqs, api_key, threads, ...). For
    `serve run lfm.ray:build_app model=DIR replicas=2`."""
    from ray import serve

    args = dict(args or {})
    replicas = args.pop("replicas", None)
    lo, hi = args.pop("min_replicas", None), args.pop("max_replicas", None)
    target = float(args.pop("target_ongoing_requests", 16))
    actor = {"num_cpus": float(args.pop("num_cpus", 1))}
    if args.get("num_gpus"):
        actor["num_gpus"] = float(args.pop("num_gpus"))
    args.pop("num_gpus", None)
    cfg = _serve_config(args)
    opts: dict[str, Any] = {"ray_actor_options": actor,
                            "max_ongoing_requests": cfg["max_waiting"] + cfg["max_num_seqs"]}
    if hi is not None:
        opts["autoscaling_config"] = {"min_replicas": int(lo or 1), "max_replicas": int(hi),
                                      "target_ongoing_requests": target}
    else:
        opts["num_replicas"] = int(replicas or 1)
    return serve.deployment(_server_class(), name="lfm", **opts).bind(cfg)


def _serve_config(args: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    from .serve.state import ServeConfig

    names = {f.name: f for f in dataclasses.fields(ServeConfig)}
    unknown = set(args) - set(names)
    if unknown:
        raise ValueError(f"unknown lfm serve setting(s): {', '.join(sorted(unknown))}")
    cfg = dataclasses.asdict(ServeConfig(model=args.pop("model", None)))
    for k, v in args.items():  # `serve run` passes strings
        d = cfg[k]
        cfg[k] = v if d is None or isinstance(v, type(d)) or not isinstance(v, str) else \
            (v.lower() in ("1", "true", "yes") if isinstance(d, bool) else type(d)(v))
    return cfg


def _server_class():
    from ray import serve

    class LfmServer:
        """One replica: a whole `lfm serve` (model, engine thread, FastAPI app); Ray Serve routes to it."""

        def __init__(self, cfg: dict[str, Any]) -> None:
            from .serve.state import ServeConfig, ServerState

            self.state = ServerState(ServeConfig(**cfg))

        def __serve_build_asgi_app__(self):
            from .serve.app import create_app

            return create_app(self.state)  # its lifespan (run by Ray Serve) starts the engine thread

    return serve.ingress()(LfmServer)


def serve_ray(cfg: dict[str, Any], replicas: int = 1, max_replicas: int | None = None,
              address: str | None = None) -> None:
    """`lfm serve --ray`: the app on Ray Serve's HTTP proxy at cfg's host:port, until Ctrl-C."""
    from ray import serve

    _init(address)
    serve.start(http_options={"host": cfg.get("host", "127.0.0.1"), "port": int(cfg.get("port", 8000))})
    args = {**cfg, "replicas": replicas} if max_replicas is None else \
        {**cfg, "min_replicas": replicas, "max_replicas": max_replicas}
    serve.run(build_app(args), name="lfm", route_prefix="/", blocking=True)


def __getattr__(name: str):
    if name == "app":  # `serve run lfm.ray:app`: the demo model, 1 to 4 replicas by load
        return build_app({"min_replicas": 1, "max_replicas": 4})
    raise AttributeError(name)
