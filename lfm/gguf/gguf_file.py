"""Read a GGUF file's header (metadata and tensor table) and its tensors, checked against the file size.

Our own parser rather than `gguf.GGUFReader`: the latter builds a memory-map slice per array element, which takes
seconds for a 65,536-token vocabulary and would be paid twice by `LLM` (model, then tokenizer). The format is a
little-endian sequence: magic, version, counts, key/value pairs, tensor infos, then aligned tensor data.
Dequantisation stays with `gguf.quants`. Any damage ends in one `GGUFError` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .mapping import MODEL_TYPE, GGUFError, require_gguf

# GGUF value types -> struct format (8 = string, 9 = array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_DIMS = 4
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential reads over the header bytes; running past the end means the file is cut short."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("Q"))).decode("utf-8")

    def value(self, typ: int) -> Any:
        if typ == 8:
            return self.string()
        if typ == 9:
            sub, n = self.unpack("I"), self.unpack("Q")
            if sub == 8:
                if n * 8 > len(self.buf) - self.pos:  # every string has an 8-byte length: fail now, not after n reads
                    raise _Truncated
                return [self.string() for _ in range(n)]
            if sub not in _NP:
                raise ValueError(f"unknown array element type {sub}")
            arr = np.frombuffer(self.take(n * np.dtype(_NP[sub]).itemsize), dtype=_NP[sub])
            return [bool(v) for v in arr] if sub == 7 else arr.tolist()
        if typ not in _SCALARS:
            raise ValueError(f"unknown value type {typ}")
        return self.unpack(_SCALARS[typ])


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type: str  # GGMLQuantizationType name: F32, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # numpy / torch order (GGUF stores the reverse)
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """A parsed `lfm2` / `lfm2moe` GGUF file: metadata as Python values, tensors memory-mapped until read."""

    def __init__(self, path: str | Path, check_arch: bool = True) -> None:
        self.path = p = Path(path)
        if not p.is_file():
            raise GGUFError(f"{p}: no such file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(f"{p}: not a GGUF file (it does not start with the GGUF magic bytes)")
        # copy-on-write: torch can view float tensors in place (it warns on read-only memory); the file is never written
        self._map = np.memmap(p, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
        try:
            self.meta, self.tensors = self._parse(memoryview(self._map), size)
        except GGUFError:
            raise
        except _Truncated:
            raise GGUFError(f"{p}: corrupt or truncated GGUF file (the header runs past the end of the file)") from None
        except (ValueError, UnicodeDecodeError, OverflowError, struct.error) as e:
            raise GGUFError(f"{p}: corrupt GGUF file ({e})") from None
        self.arch: str = str(self.meta.get("general.architecture"))
        if check_arch and self.arch not in MODEL_TYPE:
            raise GGUFError(f"{p}: architecture {self.arch!r} is not an LFM2 model "
                            "(lfm reads 'lfm2' and 'lfm2moe' GGUF files)")

    def _parse(self, buf: memoryview, size: int) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        gguf = require_gguf()
        GGML_QUANT_SIZES, GGMLQuantizationType = gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType
        c = _Cursor(buf)
        c.take(4)
        version = c.unpack("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (expected 2 or 3, little-endian)")
        n_tensors, n_kv = c.unpack("Q"), c.unpack("Q")
        if n_tensors > size or n_kv > size:
            raise _Truncated
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.unpack("I"))
        # llama.cpp (gguf.cpp) refuses an alignment that is not a u32 power of two; 0 would divide by zero below
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment = {align!r} is invalid (expected a power of two, e.g. 32)")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("I")
            if n_dims > _MAX_DIMS:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {_MAX_DIMS})")
            ne = [c.unpack("Q") for _ in range(n_dims)]
            code, offset = c.unpack("I"), c.unpack("Q")
            try:
                qtype = GGMLQuantizationType(code)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown type {code}") from None
            block, tsize = GGML_QUANT_SIZES[qtype]
            if not ne or ne[0] % block:
                raise ValueError(f"tensor {name!r}: row of {ne[0] if ne else 0} does not fill {qtype.name} blocks")
            numel = 1
            for x in ne:  # Python integers: a hostile shape cannot wrap around to a small size
                numel *= x
            infos.append((name, qtype.name, tuple(reversed(ne)), offset, numel // block * tsize))
        start = -(-c.pos // align) * align
        tensors: dict[str, TensorInfo] = {}
        for name, qname, shape, offset, nbytes in infos:
            t = TensorInfo(name, qname, shape, start + offset, nbytes)
            if t.offset + nbytes > size:
                raise GGUFError(f"{self.path}: truncated: tensor {name!r} ends at byte {t.offset + nbytes}, "
                                f"the file has {size}")
            if offset % align:
                raise GGUFError(f"{self.path}: tensor {name!r} offset {offset} is not a multiple of general.alignment {align}")
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            tensors[name] = t
        end = start
        for t in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            if t.offset < end:  # two tensors sharing bytes: a damaged table (llama.cpp expects them in order)
                raise GGUFError(f"{self.path}: tensor {t.name!r} data (offset {t.offset - start}) overlaps the tensor before it")
            end = t.offset + t.nbytes
        return meta, tensors

    def key(self, name: str, default: Any = ..., arch: bool = True) -> Any:
        """`{arch}.name` (or `name` with arch=False); a missing key without a default is an error naming it."""
        k = f"{self.arch}.{name}" if arch else name
        if k in self.meta:
            return self.meta[k]
        if default is ...:
            raise GGUFError(f"{self.path}: metadata key {k!r} is missing")
        return default

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, shaped [..., bytes per row] (what `gguf.quants` and its writer take)."""
        t = self.tensors[name]
        return self._map[t.offset:t.offset + t.nbytes].reshape(*t.shape[:-1], -1)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in numpy (PyTorch) dimension order: F32/F16/BF16 as a view of the file in that dtype, any other
        type dequantised by `gguf.quants` into a float32 tensor of its own."""
        t = self.tensors[name]
        data = self.raw(name)
        if t.type in _FLOATS:
            return torch.from_numpy(data).view(_FLOATS[t.type]).view(t.shape)
        gguf = require_gguf()
        try:
            out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t.type])
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {t.type}, which lfm cannot dequantise") from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(t.shape))
