"""Where `lfm batch` writes results: atomically per chunk, and readable for resume (which ids are done).

- `out.jsonl`: one JSON line per row. A chunk is appended with a single `write` and fsync'd; on open, a trailing
  partial line (a machine that lost power mid-write) is cut off, so the file only ever holds whole rows.
- a directory (`results/`, or any path ending in `.parquet`): numbered part files `part-000000.parquet` (or
  `.jsonl` with `--output-format jsonl`), each written under a temporary name, fsync'd and renamed into place:
  a part is either all there or absent. pyarrow / pandas / Ray read the directory as one table.

Resume reads the ids already present and the runner skips them, so a killed job restarted with the same command does
only the rest: every row exactly once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

COLUMNS = ("id", "output", "text", "prompt_tokens", "completion_tokens", "finish_reason", "error", "logprobs")
_PART = re.compile(r"part-(\d{6})\.(jsonl|parquet)$")


class Sink:
    def done_ids(self) -> set[str]:
        raise NotImplementedError

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError


def _line(row: dict[str, Any]) -> str:
    return json.dumps({k: row.get(k) for k in COLUMNS}, ensure_ascii=False) + "\n"


class JsonlFile(Sink):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a partial last line: never a row
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def done_ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        ids = set()
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    ids.add(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{self.path} line {n} is not an lfm batch result: write to a new file") from None
        return ids

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(_line(r) for r in rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)


class PartsDir(Sink):
    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob(".part-*.tmp"):  # a chunk a killed job did not finish: never counted
            tmp.unlink()
        nums = [int(m.group(1)) for f in path.iterdir() if (m := _PART.match(f.name))]
        self.next = max(nums, default=-1) + 1

    def parts(self) -> list[Path]:
        return sorted(f for f in self.path.iterdir() if _PART.match(f.name))

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for f in self.parts():
            if f.suffix == ".jsonl":
                ids.update(str(json.loads(line)["id"]) for line in f.read_text(encoding="utf-8").splitlines())
            else:
                import pyarrow.parquet as pq

                ids.update(str(i) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())
        return ids

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        name = f"part-{self.next:06d}.{self.fmt}"
        tmp = self.path / f".{name}.tmp"
        if self.fmt == "jsonl":
            tmp.write_text("".join(_line(r) for r in rows), encoding="utf-8")
        else:
            _write_parquet(tmp, rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        dfd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.next += 1


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """One fixed schema for every part: `output` and `logprobs` as JSON text (rows' objects differ in shape)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def js(v: Any) -> str | None:
        return None if v is None else json.dumps(v, ensure_ascii=False)

    schema = pa.schema([("id", pa.string()), ("output", pa.string()), ("text", pa.string()),
                        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                        ("finish_reason", pa.string()), ("error", pa.string()), ("logprobs", pa.string())])
    cols = {k: [r.get(k) for r in rows] for k in COLUMNS}
    cols["output"] = [js(v) for v in cols["output"]]
    cols["logprobs"] = [js(v) for v in cols["logprobs"]]
    pq.write_table(pa.table(cols, schema=schema), path)


def open_sink(output: str, fmt: str | None = None) -> Sink:
    """`x.jsonl` -> one appendable file; a directory / `x.parquet` / anything else -> numbered part files."""
    p = Path(output)
    if p.suffix.lower() in (".jsonl", ".ndjson") and fmt in (None, "jsonl") and not p.is_dir():
        return JsonlFile(p)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{output} exists and is not a directory: the output is a .jsonl file or a directory of parts")
    return PartsDir(p, fmt or "parquet")


def read_results(output: str) -> list[dict[str, Any]]:
    """Every result row of an output (jsonl file or parts directory), `output` / `logprobs` decoded: for tests and
    users' scripts."""
    p = Path(output)
    if p.is_file():
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    rows: list[dict[str, Any]] = []
    for f in sorted(f for f in p.iterdir() if _PART.match(f.name)):
        if f.suffix == ".jsonl":
            rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
        else:
            import pyarrow.parquet as pq

            for r in pq.read_table(f).to_pylist():
                for k in ("output", "logprobs"):
                    r[k] = None if r[k] is None else json.loads(r[k])
                rows.append(r)
    return rows
