"""Malformed and hostile model files: every one ends in one line naming the file and the field (or tensor), before
anything of the size the file claims is allocated. Peers for the rules: the `safetensors` library (strict JSON header,
offsets that tile the data exactly: its `InvalidOffset` / "file not fully covered" errors) and llama.cpp's gguf.cpp
(`general.alignment` a u32 power of two, at most GGML_MAX_DIMS = 4 dimensions per tensor)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import lfm
import lfm.gguf.reader as gguf_reader
import lfm.model.checkpoint as ckpt_mod
from lfm.cli import main
from lfm.model.checkpoint import CheckpointError
from lfm.model.config import MAX_SIZES, ConfigError, LfmConfig
from lfm.model.presets import PRESETS, preset
from lfm.model.safetensors_io import SafetensorsError, read_header


def _no_allocation(monkeypatch) -> None:
    """Fail loudly if a loader gets as far as allocating the model."""
    def boom(*a, **k):
        raise AssertionError("the model was allocated before the file was refused")
    monkeypatch.setattr(ckpt_mod, "_materialize", boom)
    monkeypatch.setattr(gguf_reader, "empty_model", boom)


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---------------------------------------------------------------- safetensors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _two_same_size(header: dict) -> tuple[str, str]:
    by_size: dict[int, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size in by_size:
            return by_size[size], name
        by_size[size] = name
    raise AssertionError("no two tensors of the same size")


def test_safetensors_damage_is_one_line_naming_file_and_tensor(checkpoints, tmp_path, monkeypatch):
    _no_allocation(monkeypatch)
    header, data = _split(checkpoints["dense"] / "model.safetensors")
    a, b = _two_same_size(header)

    def case(name: str, hdr: dict | bytes, body: bytes = data) -> Path:
        d = _copy(checkpoints["dense"], tmp_path / name)
        _write(d / "model.safetensors", hdr, body)
        return d

    overlap = json.loads(json.dumps(header))
    overlap[b]["data_offsets"] = list(overlap[a]["data_offsets"])  # b reads a's bytes: loaded silently before
    infinity = json.dumps(header).replace(json.dumps(header[a]["shape"]), "[Infinity]", 1).encode()
    nan = json.dumps(header).replace(json.dumps(header[a]["data_offsets"]), "[NaN, 4]", 1).encode()
    floats = json.loads(json.dumps(header))
    floats[a]["shape"] = [float(s) for s in floats[a]["shape"]]
    negative = json.loads(json.dumps(header))
    negative[a]["data_offsets"] = [-4, 0]
    cases = {
        "overlap": (case("overlap", overlap), [b, "overlaps"]),
        "infinity": (case("infinity", infinity), [a, "Infinity"]),
        "nan": (case("nan", nan), [a, "NaN"]),
        "float-shape": (case("float-shape", floats), [a]),
        "negative-offset": (case("negative-offset", negative), [a]),
        "trailing": (case("trailing", header, data + b"\0" * 64), ["64 bytes after the last tensor"]),
        "truncated": (case("truncated", header, data[:-1]), ["truncated"]),
        "huge-header": (case("huge-header", b"{}", b""), ["header length 4611686018427387904 exceeds the file"]),
    }
    (cases["huge-header"][0] / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    for name, (d, needles) in cases.items():
        with pytest.raises(CheckpointError) as e:
            lfm.load_model(d)
        _one_line(e, str(d / "model.safetensors"), *needles)
    # the library refuses the same files (checked where its rule is the one we copy)
    from safetensors.torch import load_file
    for name in ("overlap", "infinity", "trailing"):
        with pytest.raises(Exception):
            load_file(cases[name][0] / "model.safetensors")
    with pytest.raises(SafetensorsError, match="overlaps"):
        read_header(cases["overlap"][0] / "model.safetensors")


def test_config_sizes_out_of_range_refused_before_allocation(checkpoints, tmp_path, monkeypatch):
    _no_allocation(monkeypatch)
    base = json.loads((checkpoints["moe"] / "config.json").read_text())
    bad = {"hidden_size": 10**9, "num_hidden_layers": 10**8, "vocab_size": 10**9, "intermediate_size": 10**9,
           "moe_intermediate_size": 10**9, "num_experts": 10**6, "num_attention_heads": 10**6,
           "num_key_value_heads": 10**6, "conv_L_cache": 10**6, "max_position_embeddings": 10**12}
    for field, value in bad.items():
        d = _copy(checkpoints["moe"], tmp_path / field)
        cfg = {**base, field: value}
        if field == "num_hidden_layers":
            cfg.pop("layer_types", None)
            cfg.pop("full_attn_idxs", None)  # the list would otherwise be built from the count
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError) as e:
            lfm.load_model(d)
        _one_line(e, str(d / "config.json"), field)
    # the CLI shows it as one line with exit status 2
    d = tmp_path / "hidden_size"
    assert main(["info", str(d)]) == 2


def test_config_sizes_that_multiply_to_an_absurd_model(tmp_path):
    # each size inside its bound, the product far beyond any model: refused by the parameter count
    cfg = {"model_type": "lfm2", "vocab_size": MAX_SIZES["vocab_size"], "hidden_size": MAX_SIZES["hidden_size"],
           "num_hidden_layers": MAX_SIZES["num_hidden_layers"], "num_attention_heads": 64, "num_key_value_heads": 8,
           "intermediate_size": 1024, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        LfmConfig.from_file(tmp_path / "config.json")
    _one_line(e, "config.json", "parameters")


def test_published_shapes_sit_far_inside_the_bounds():
    for name in PRESETS:
        c = preset(name)
        for field, hi in MAX_SIZES.items():
            v = getattr(c, field)
            assert v is None or v * 16 <= hi, (name, field, v, hi)


def test_config_that_does_not_match_its_weights_names_tensor_and_file(checkpoints, tmp_path, monkeypatch):
    _no_allocation(monkeypatch)
    d = _copy(checkpoints["dense"], tmp_path / "wider")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        lfm.load_model(d)
    _one_line(e, str(d / "model.safetensors"), "tensor 'model.", "the config implies")


# ---------------------------------------------------------------- GGUF

_TYPES = {int: 4, float: 6, str: 8}  # u32, f32, string


def _value(v) -> bytes:
    if isinstance(v, str):
        b = v.encode()
        return struct.pack("<Q", len(b)) + b
    if isinstance(v, float):
        return struct.pack("<f", v)
    return struct.pack("<I", v)


def gguf_bytes(meta: dict, tensors: list[tuple[str, list[int], int]] = (), align: int = 32) -> bytes:
    """A GGUF v3 file written by hand (so that keys can have any type): F32 tensors, packed in order."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        out += _value(k)
        if isinstance(v, tuple):  # (type code, raw bytes) for arrays and odd types
            out += struct.pack("<I", v[0]) + v[1]
        else:
            out += struct.pack("<I", _TYPES[type(v)]) + _value(v)
    offsets, off = [], 0
    for name, ne, _ in tensors:
        offsets.append(off)
        n = 4
        for x in ne:
            n *= x
        off += -(-n // align) * align
    for (name, ne, pos), o in zip(tensors, offsets):
        out += _value(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", x) for x in ne)
        out += struct.pack("<IQ", 0, o if pos < 0 else pos)
    out += b"\0" * (-len(out) % align)
    return out + b"\0" * off


LFM2_META = {"general.architecture": "lfm2", "lfm2.block_count": 2, "lfm2.embedding_length": 64,
             "lfm2.attention.head_count": 4, "lfm2.attention.head_count_kv": 2, "lfm2.feed_forward_length": 128,
             "lfm2.shortconv.l_cache": 3, "lfm2.attention.layer_norm_rms_epsilon": 1e-5, "lfm2.context_length": 4096,
             "lfm2.vocab_size": 512}


def test_gguf_damage_is_one_line_naming_file_and_field(tmp_path, monkeypatch):
    _no_allocation(monkeypatch)
    huge_array = (9, struct.pack("<IQ", 8, 1 << 60))  # 2^60 strings promised, none there
    cases = {
        "align-zero": ({**LFM2_META, "general.alignment": 0}, [], "general.alignment"),
        "align-string": ({**LFM2_META, "general.alignment": "32"}, [], "general.alignment"),
        "align-odd": ({**LFM2_META, "general.alignment": 48}, [], "general.alignment"),
        "align-float": ({**LFM2_META, "general.alignment": 32.0}, [], "general.alignment"),
        "layers": ({**LFM2_META, "lfm2.block_count": 10**8}, [], "block_count"),
        "hidden": ({**LFM2_META, "lfm2.embedding_length": 10**9}, [], "hidden_size"),
        "vocab": ({**LFM2_META, "lfm2.vocab_size": 4_000_000_000}, [], "vocab_size"),
        "ffn-type": ({**LFM2_META, "lfm2.feed_forward_length": "wide"}, [], "lfm2.feed_forward_length"),
        "eps-type": ({**LFM2_META, "lfm2.attention.layer_norm_rms_epsilon": "x"}, [], "layer_norm_rms_epsilon"),
        "tokens": ({**LFM2_META, "tokenizer.ggml.tokens": huge_array}, [], "truncated"),
        "dims": (LFM2_META, [("token_embd.weight", [2, 2, 2, 2, 2], -1)], "5 dimensions"),
        "overlap": (LFM2_META, [("a", [8], -1), ("b", [8], 0)], "tensor 'b'"),
        # plausible sizes, but the tensors are not in the file: refused from the table, before allocation
        "missing": ({**LFM2_META, "lfm2.embedding_length": 8192, "lfm2.attention.head_count": 64},
                    [], "tensor 'token_embd.weight' is missing"),
    }
    for name, (meta, tensors, field) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(gguf_bytes(meta, tensors))
        with pytest.raises(CheckpointError) as e:
            lfm.load_model(p)
        _one_line(e, str(p), field)
    assert main(["info", str(tmp_path / "align-zero.gguf")]) == 2
