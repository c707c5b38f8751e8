"""Training rows: documents or chats, tokenized and packed into fixed-length rows that keep document boundaries.

Every row is three int32 vectors of `seq_len`: tokens, labels (-100 = no loss) and positions. Positions restart at 0
where a document starts; the model reads that to keep attention and the short convolution inside each document
(spec section 3), so a packed row trains exactly as its documents would one by one. The order of rows is a pure
function of (seed, rows consumed), which is the whole data position a checkpoint needs.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..text.tokenizer import Tokenizer

IGNORE = -100
_BATCH_DOCS = 256  # documents tokenized per call


class DataError(ValueError):
    """Training data that cannot be read; the message names the file."""


def expand_sources(sources: list[str]) -> list[str]:
    """Globs and directories to a sorted file list (hf: sources pass through)."""
    out: list[str] = []
    for s in sources:
        if s.startswith("hf:"):
            out.append(s)
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json", ".parquet"))
        else:
            found = sorted(glob.glob(s)) if any(ch in s for ch in "*?[") else ([s] if p.exists() else [])
        if not found:
            raise DataError(f"{s}: no such data file")
        out.extend(found)
    return out


def iter_records(sources: list[str], text_key: str = "text") -> Iterator[dict | str]:
    """Raw records: a string per document (.txt = one document, .jsonl/.json/.parquet rows) or a chat dict."""
    for src in expand_sources(sources):
        if src.startswith("hf:"):
            yield from _hf_records(src)
            continue
        path = Path(src)
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield _parse_json(line, f"{path}:{n}")
        elif path.suffix == ".json":
            data = _parse_json(path.read_text(encoding="utf-8"), str(path))
            yield from (data if isinstance(data, list) else [data])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq  # optional: only parquet users need it
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:
            raise DataError(f"{path}: unsupported data file (use .txt, .jsonl, .json, .parquet or hf:NAME)")


def _parse_json(text: str, where: str) -> dict | str:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _hf_records(src: str) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{src}: reading Hugging Face datasets needs `pip install datasets`") from None
    name, _, split = src[3:].partition(":")
    try:
        yield from datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown dataset: say which and why in one line
        raise DataError(f"{src}: cannot load dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _text_of(rec: dict | str, key: str, where: str = "") -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict) and isinstance(rec.get(key), str):
        return rec[key]
    raise DataError(f"record without a string {key!r} field{where}: {str(rec)[:80]!r}")


def document_ids(tok: Tokenizer, records: Iterable[dict | str], text_key: str) -> Iterator[list[int]]:
    """Each document as [bos] + text + [end of text]."""
    end = tok.token_to_id("<|endoftext|>")
    end = end if end is not None else tok.eos_token_id
    buf: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tok.encode_batch(buf, add_bos=True):
            yield ids + ([end] if end is not None else [])
        buf.clear()

    for rec in records:
        buf.append(_text_of(rec, text_key))
        if len(buf) >= _BATCH_DOCS:
            yield from flush()
    yield from flush()


def chat_ids(tok: Tokenizer, records: Iterable[dict | str]) -> Iterator[tuple[list[int], list[int]]]:
    """Each conversation rendered with the checkpoint's template: ids and the assistant ({% generation %}) mask."""
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise DataError(f"chat record {n}: expected {{\"messages\": [...], \"tools\": [...]}}, got {str(rec)[:80]!r}")
        enc = tok.encode_chat(rec["messages"], tools=rec.get("tools"))
        if not any(enc.assistant_mask):
            raise DataError(f"chat record {n}: no assistant tokens to train on (does the template mark them "
                            "with {% generation %}?)")
        yield enc.ids, enc.assistant_mask


@dataclass
class Rows:
    """Packed rows as [R, seq_len] int32 arrays."""

    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def take(self, idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.tokens[idx].astype(np.int64)),
                "labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
                "position_ids": torch.from_numpy(self.positions[idx].astype(np.int64))}


def pack_documents(docs: Iterable[list[int]], seq_len: int) -> Rows:
    """Concatenate documents and cut rows every `seq_len` tokens (each row also reads one token ahead for its
    last label). A document may continue into the next row, with its true positions; no label crosses documents."""
    parts = [np.asarray(d, dtype=np.int32) for d in docs if len(d) > 1]
    if not parts:
        raise DataError("no documents with text in the training data")
    stream = np.concatenate(parts)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum([0] + [len(p) for p in parts[:-1]])] = True
    idx = np.arange(len(stream))
    pos = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
    R = (len(stream) - 1) // seq_len
    if R == 0:
        raise DataError(f"only {len(stream)} tokens of data; seq_len {seq_len} needs at least {seq_len + 1}")
    n = R * seq_len
    labels = stream[1:n + 1].copy()
    labels[pos[1:n + 1] == 0] = IGNORE  # the next document's first token is not predicted from this one
    return Rows(stream[:n].reshape(R, seq_len), labels.reshape(R, seq_len), pos[:n].reshape(R, seq_len))


def pack_chats(chats: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Rows:
    """Whole conversations packed first-come into rows (never split; longer ones truncated), loss on assistant tokens."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for ids, mask in chats:
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        n = len(ids) - 1
        if n < 1:
            continue
        if len(cur[0]) + n > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids[:-1])
        cur[1].extend(t if m else IGNORE for t, m in zip(ids[1:], mask[1:]))
        cur[2].extend(range(n))
    if cur[0]:
        rows.append(cur)
    if not rows:
        raise DataError("no conversations in the training data")
    R = len(rows)
    tokens = np.full((R, seq_len), pad_id, dtype=np.int32)
    labels = np.full((R, seq_len), IGNORE, dtype=np.int32)
    positions = np.zeros((R, seq_len), dtype=np.int32)
    for r, (t, lab, p) in enumerate(rows):
        tokens[r, :len(t)], labels[r, :len(t)], positions[r, :len(t)] = t, lab, p
        positions[r, len(t):] = np.arange(seq_len - len(t))  # the padding is one more (loss-free) document
    return Rows(tokens, labels, positions)


def build_rows(tok: Tokenizer, sources: list[str], task: str, seq_len: int, text_key: str = "text") -> Rows:
    records = iter_records(sources, text_key)
    if task == "sft":
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return pack_chats(chat_ids(tok, records), seq_len, pad)
    return pack_documents(document_ids(tok, records, text_key), seq_len)


class RowOrder:
    """Which row comes next: epoch-wise seeded permutations, indexed by the number of rows consumed so far."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n_rows, seed, shuffle
        self._epoch, self._perm = -1, np.arange(n_rows)

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, k = divmod(start + i, self.n)
            if epoch != self._epoch and self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).numpy()
            self._epoch = epoch
            out[i] = self._perm[k]
        return out


class StreamingRows:
    """Rows made lazily from a large corpus (no shuffle, no full tokenized copy in memory). Resuming skips the
    rows already consumed, which re-reads and re-tokenizes the corpus up to that point."""

    def __init__(self, tok: Tokenizer, sources: list[str], seq_len: int, text_key: str = "text") -> None:
        self.tok, self.sources, self.seq_len, self.text_key = tok, sources, seq_len, text_key
        self._it: Iterator[Rows] | None = None
        self._buf: list[Rows] = []
        self._have = 0
        self._next = 0  # the global index of the first buffered row

    def _chunks(self) -> Iterator[Rows]:
        while True:  # epochs
            docs = document_ids(self.tok, iter_records(self.sources, self.text_key), self.text_key)
            pending: list[list[int]] = []
            size = 0
            for d in docs:
                pending.append(d)
                size += len(d)
                if size >= 64 * self.seq_len:
                    yield pack_documents(pending, self.seq_len)
                    pending, size = [], 0
            if size > self.seq_len:
                yield pack_documents(pending, self.seq_len)

    def take_range(self, start: int, count: int) -> dict[str, torch.Tensor]:
        if self._it is None or start < self._next:
            self._it, self._buf, self._have, self._next = self._chunks(), [], 0, 0
        while self._have < start - self._next + count:
            r = next(self._it)
            self._buf.append(r)
            self._have += len(r)
        cat = Rows(*(np.concatenate([getattr(r, f) for r in self._buf]) for f in ("tokens", "labels", "positions")))
        lo = start - self._next
        out = cat.take(np.arange(lo, lo + count))
        keep = Rows(cat.tokens[lo + count:], cat.labels[lo + count:], cat.positions[lo + count:])
        self._buf, self._have, self._next = [keep], len(keep), start + count
        return out
