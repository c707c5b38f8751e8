"""Input rows for `lfm batch`: jsonl / json / csv / parquet / text files, globs and directories of them, or a Hugging
Face dataset (`hf:NAME[:SPLIT]`).

Every input row becomes exactly one `InputRow`: its id (the `--id-field` value, else its position in the input
order), its fields, or an error saying why it cannot be used (a line that is not JSON, a CSV line with extra values).
Nothing is dropped: a bad row is carried to the output with its error, so input rows = output rows.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
            ".txt": "text", ".text": "text"}


class InputError(ValueError):
    """An input that cannot be read at all (a missing file, an unknown format): one line for the user."""


@dataclass(slots=True)
class InputRow:
    id: str
    fields: dict[str, Any] | None  # None when `error` says why the row cannot be used
    error: str | None = None


def is_remote(src: str) -> bool:
    """A URI with a scheme (s3://, gs://, abfs://, hdfs://, https://, file://): read by Ray Data (`lfm batch --ray`),
    not by this module."""
    return "://" in src and not src.startswith("hf:")


def expand(sources: list[str]) -> list[str]:
    """Files (sorted within a glob or directory) and `hf:` dataset ids, in the order given."""
    out: list[str] = []
    for src in sources:
        if src.startswith("hf:"):
            out.append(src)
            continue
        if is_remote(src):
            raise InputError(f"{src}: a URI is read by Ray Data: run with --ray and --id-field")
        p = Path(src)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not files:
                raise InputError(f"{src}: no .jsonl / .json / .csv / .parquet / .txt files in this directory")
            out += files
        elif p.exists():
            out.append(src)
        elif glob.has_magic(src):
            files = sorted(f for f in glob.glob(src, recursive=True) if Path(f).is_file())
            if not files:
                raise InputError(f"{src}: no file matches")
            out += files
        else:
            raise InputError(f"{src}: no such file (a Hugging Face dataset is named hf:NAME[:SPLIT])")
    return out


def read_rows(sources: list[str], id_field: str | None = None) -> list[InputRow]:
    """All rows of all sources, in order, with unique ids (a repeated `id_field` value is an input error: resuming
    by id could not tell the rows apart)."""
    rows: list[InputRow] = []
    seen: set[str] = set()
    for src in expand(sources):
        for fields, error in _records(src):
            pos = str(len(rows))
            if id_field is None:
                rid = pos
            elif fields is not None and fields.get(id_field) is not None:
                rid = str(fields[id_field])
            else:
                rid, error, fields = f"#{pos}", error or f"the row has no '{id_field}' field", None
            if rid in seen:
                raise InputError(f"id {rid!r} appears twice in the input ('{id_field}' must be unique)")
            seen.add(rid)
            rows.append(InputRow(rid, fields, error))
    return rows


def _records(src: str) -> Iterator[tuple[dict | None, str | None]]:
    if src.startswith("hf:"):
        yield from _hf(src[3:])
        return
    kind = SUFFIXES.get(Path(src).suffix.lower())
    if kind is None:
        raise InputError(f"{src}: unknown input format (use .jsonl, .json, .csv, .tsv, .parquet or .txt)")
    if kind == "jsonl":
        with open(src, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _object(line, f"{Path(src).name} line {n}")
    elif kind == "json":
        try:
            data = json.loads(Path(src).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{src}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} or a single row
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise InputError(f"{src}: expected a JSON list of rows")
        for item in data:
            yield _as_fields(item, "")
    elif kind in ("csv", "tsv"):
        with open(src, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",", restkey="\0extra")
            for rec in reader:
                if "\0extra" in rec:
                    yield None, f"{Path(src).name} line {reader.line_num}: more values than columns"
                elif any(v is None for v in rec.values()):
                    yield None, f"{Path(src).name} line {reader.line_num}: fewer values than columns"
                else:
                    yield dict(rec), None
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("reading parquet needs pyarrow (pip install pyarrow)") from None
        for batch in pq.ParquetFile(src).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield rec, None
    else:  # text: one row per non-empty line
        with open(src, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}, None


def _object(line: str, where: str) -> tuple[dict | None, str | None]:
    try:
        item = json.loads(line)
    except ValueError as e:
        return None, f"{where}: not valid JSON ({e})"
    return _as_fields(item, where)


def _as_fields(item: Any, where: str) -> tuple[dict | None, str | None]:
    if isinstance(item, dict):
        return item, None
    if isinstance(item, str):
        return {"text": item}, None
    return None, f"{where + ': ' if where else ''}expected a JSON object, got {type(item).__name__}"


def _hf(spec: str) -> Iterator[tuple[dict | None, str | None]]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise InputError("reading a Hugging Face dataset needs `datasets` (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001  offline, unknown name, no such split: one line
        raise InputError(f"hf:{spec}: cannot load the dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for rec in ds:
        yield dict(rec), None
