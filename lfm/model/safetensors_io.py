"""Streaming safetensors reads and writes, one tensor at a time.

The `safetensors` library maps the whole file (its pages then count in our RSS until the file is closed) and
`save_file` serialises every tensor into one buffer first; both double peak memory for a large checkpoint. The format
is a length-prefixed JSON header followed by raw little-endian bytes, so we read each tensor straight into the
parameter that will hold it and write each tensor straight to disk. Tests check both directions against the library.
Never unpickles anything: only raw numbers are read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a complete safetensors file; the message names the file (and tensor)."""


@dataclass(slots=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class _Constant:
    """NaN / Infinity / -Infinity, which Python's json accepts and JSON (and safetensors) does not: kept as a marker
    so that the entry holding it is refused by name below."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _count(v: object) -> int:
    """A non-negative JSON integer (not a bool, not a float), else ValueError."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Tensor entries and the free-form metadata, checked before any tensor is read: the header is strict JSON,
    every entry has a known dtype, integer shape and offsets whose span is the shape's size, and the tensors tile
    the data section exactly (in offset order, no overlap, no gap, nothing after) — the rules of the `safetensors`
    library (its `InvalidOffset` / "file not fully covered" errors), so a truncated, padded or overlapping file fails
    here with one line naming the file and the tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
            raw = f.read(n)
        header = json.loads(raw, parse_constant=_Constant)
    except SafetensorsError:
        raise
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SafetensorsError(f"{path}: is a directory, not a safetensors file") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise SafetensorsError(f"{path}: header is not valid JSON ({e}): not a safetensors file") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise SafetensorsError(f"{path}: __metadata__ is not a JSON object")
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            if not isinstance(info, dict):
                raise TypeError
            dtype = DTYPES[info["dtype"]]
            shape = tuple(_count(s) for s in info["shape"])
            offsets = info["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError
            a, b = (_count(o) for o in offsets)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has an unreadable or unsupported header entry "
                                   f"{str(info)[:200]}") from None
        numel = 1
        for s in shape:
            numel *= s
        if b - a != numel * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} header says {b - a} bytes for shape {list(shape)} {info['dtype']}")
        if base + b > size:
            raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {base + b} but the file has {size} bytes")
        entries[name] = Entry(name, dtype, shape, base + a, b - a)
    end = base
    for e in sorted(entries.values(), key=lambda e: (e.start, e.nbytes)):
        if e.start != end:
            what = "overlaps the tensor before it" if e.start < end else "leaves a gap after the tensor before it"
            raise SafetensorsError(f"{path}: tensor {e.name!r} data_offsets {[e.start - base, e.start - base + e.nbytes]} "
                                   f"{what} (invalid offsets)")
        end = e.start + e.nbytes
    if end != size:
        raise SafetensorsError(f"{path}: {size - end} bytes after the last tensor: the file is not a safetensors "
                               "file of this header (damaged?)")
    return entries, meta


def read_into(f, entry: Entry, out: torch.Tensor) -> None:
    """Read one tensor into `out` (any dtype/device); reads straight into `out` when it is a matching CPU tensor."""
    if tuple(out.shape) != entry.shape:
        raise SafetensorsError(f"tensor {entry.name!r}: shape {list(entry.shape)} does not fit {list(out.shape)}")
    direct = out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
    buf = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        f.seek(entry.start)
        view = buf.reshape(-1).view(torch.uint8).numpy()
        if f.readinto(view) != entry.nbytes:
            raise SafetensorsError(f"tensor {entry.name!r}: file ended early")
    if not direct:
        out.copy_(buf)


def read_tensor(f, entry: Entry) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    read_into(f, entry, out)
    return out


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Whole-file convenience read (small files and tests)."""
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, e) for name, e in entries.items()}


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time; the file appears under its name only once complete (no half-written checkpoint)."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the library does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def iter_entries(files: list[Path]) -> Iterator[tuple[Path, Entry]]:
    for p in files:
        entries, _ = read_header(p)
        for e in entries.values():
            yield p, e
