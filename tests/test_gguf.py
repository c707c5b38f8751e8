"""GGUF export and import without llama.cpp: round trips against transformers, stored types and metadata, the
embedded tokenizer, what the format cannot hold, and one clear error for every kind of bad file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs the `gguf` package (pip install gguf)")

from lfm import LLM, SamplingParams, load_model  # noqa: E402
from lfm.cli import main  # noqa: E402
from lfm.gguf import TYPES, GGUFError, export_gguf, load_gguf  # noqa: E402
from lfm.gguf.cli import TYPE_CHOICES  # noqa: E402
from lfm.gguf.gguf_file import GGUFFile  # noqa: E402
from lfm.gguf.mapping import tensor_specs  # noqa: E402
from lfm.gguf.writer import _add  # noqa: E402
from lfm.model.checkpoint import CheckpointError, save_model, weight_files  # noqa: E402
from lfm.model.safetensors_io import read_header  # noqa: E402
from lfm.text.tokenizer import Tokenizer  # noqa: E402

from .conftest import CONFIGS, random_model  # noqa: E402

torch.set_grad_enabled(False)
IDS = torch.randint(14, 512, (2, 21), generator=torch.Generator().manual_seed(0))
TEXTS = ["Hello world 2024 and 3.14159!", "The weather in Paris:\n\n  sunny  ", "Café naïve 東京 😀",
         "I've been 'told he's there, 12345678", "<|im_start|>user is text here<|im_end|>"]


def _export(src, path: Path, type: str = "f32", **kw) -> Path:
    return export_gguf(src, path, type=type, progress=False, **kw)


@pytest.mark.parametrize("name", ["dense", "dense-kernel2-noadjust", "dense-multiplier-theta", "moe",
                                  "moe-top1-untied-kernel4"])
def test_f32_round_trip_equals_transformers(name, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    model, tok, gen = load_gguf(_export(checkpoints[name], tmp_path / "m.gguf"), dtype="float32")
    assert (model(IDS) - ref(IDS).logits).abs().max().item() <= 1e-5
    ours = load_model(checkpoints[name], dtype="float32").config
    c = model.config
    for k in ("model_type", "hidden_size", "layer_types", "num_key_value_heads", "ff_dim", "conv_L_cache", "rope_theta",
              "norm_eps", "tie_word_embeddings", "moe_intermediate_size", "num_experts", "num_dense_layers"):
        assert getattr(c, k) == pytest.approx(getattr(ours, k)), k
    assert gen == {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}
    assert tok.chat_template == Tokenizer.from_dir(checkpoints[name]).chat_template


def test_every_source_layout_exports_the_same_model(tmp_path, tokenizer_dir):
    """Per-expert and stacked expert tensors (both in the wild), a transformers save, and an in-memory model."""
    from transformers import AutoModelForCausalLM

    ours = random_model(CONFIGS["moe"], seed=5)
    save_model(ours, tmp_path / "stacked", tokenizer_dir=tokenizer_dir, expert_layout="stacked", max_shard_bytes=150_000)
    assert (tmp_path / "stacked" / "model.safetensors.index.json").exists()  # sharded
    names = {n for f in weight_files(tmp_path / "stacked") for n in read_header(f)[0]}
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in names
    AutoModelForCausalLM.from_pretrained(tmp_path / "stacked", dtype=torch.float32).save_pretrained(tmp_path / "hf")
    files = [_export(tmp_path / "stacked", tmp_path / "a.gguf"),
             _export(tmp_path / "hf", tmp_path / "b.gguf", tokenizer=tokenizer_dir),
             _export(ours, tmp_path / "c.gguf", tokenizer=Tokenizer.from_dir(tokenizer_dir))]
    for p in files:
        assert (load_gguf(p, dtype="float32")[0](IDS) - ours(IDS)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("type", ["f16", "bf16", "q8_0", "q5_0", "q4_1"])
def test_stored_types_and_values(type, checkpoints, tmp_path):
    ckpt = checkpoints["moe-top1-untied-kernel4"]
    path = _export(ckpt, tmp_path / "m.gguf", type=type)
    g = GGUFFile(path)
    src = load_model(ckpt, dtype="float32")
    qname = TYPES[type][0]
    assert g.meta["general.file_type"] == TYPES[type][1]
    from lfm.gguf.writer import Source, fetch

    s = Source.from_model(src)
    for spec in tensor_specs(src.config):
        want = fetch(s, spec, src.config, "m").float()
        got = g.tensor(spec.gguf).float()
        kind = g.tensors[spec.gguf].type
        if spec.keep_f32:  # norms, conv kernel, router, expert bias
            assert kind == "F32" and torch.equal(got, want), spec.gguf
        elif type in ("f16", "bf16"):
            dt = torch.float16 if type == "f16" else torch.bfloat16
            assert kind == qname and torch.equal(got, want.to(dt).float()), spec.gguf
        else:
            big = spec.gguf in ("token_embd.weight", "output.weight")
            assert kind == ("Q8_0" if big else qname), spec.gguf
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < (0.01 if kind == "Q8_0" else 0.05 if kind.startswith("Q5") else 0.1), (spec.gguf, rel)


def test_metadata_llama_cpp_reads(checkpoints, tmp_path):
    m = GGUFFile(_export(checkpoints["moe"], tmp_path / "moe.gguf", type="q8_0")).meta
    assert m["general.architecture"] == "lfm2moe"
    a = "lfm2moe."
    assert m[a + "attention.head_count_kv"] == [0, 2, 0, 2]  # 0 marks a conv layer
    assert (m[a + "block_count"], m[a + "embedding_length"], m[a + "attention.head_count"]) == (4, 64, 4)
    assert (m[a + "shortconv.l_cache"], m[a + "vocab_size"], m[a + "context_length"]) == (3, 512, 1024)
    assert (m[a + "expert_count"], m[a + "expert_used_count"], m[a + "expert_feed_forward_length"]) == (8, 2, 32)
    assert (m[a + "leading_dense_block_count"], m[a + "expert_gating_func"], m[a + "feed_forward_length"]) == (1, 2, 96)
    assert m[a + "rope.freq_base"] == 1e6 and m[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert len(m["tokenizer.ggml.tokens"]) == 512 and m["tokenizer.ggml.token_type"][:14] == [3] * 14
    assert len(m["tokenizer.ggml.merges"]) == 242 and m["tokenizer.ggml.add_bos_token"] is True
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.padding_token_id"]) == (1, 7, 0)
    assert "<|im_start|>" in m["tokenizer.chat_template"]
    d = GGUFFile(_export(checkpoints["dense"], tmp_path / "d.gguf")).meta
    assert d["lfm2.feed_forward_length"] == 128 and not any("expert" in k for k in d)  # the width actually used


def _llama3_style(src: Path, dst: Path) -> Path:
    """The test checkpoint with LFM2's real pre-tokenizer (Llama-3 split regex, then byte level)."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HF

    from lfm.gguf.vocab import LLAMA3_REGEX

    shutil.copytree(src, dst)
    tk = HF.from_file(str(dst / "tokenizer.json"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.save(str(dst / "tokenizer.json"))
    return dst


@pytest.mark.parametrize("style", ["gpt-2", "lfm2"])
def test_embedded_tokenizer_encodes_decodes_and_chats_like_the_original(style, checkpoints, tmp_path):
    src = checkpoints["dense"] if style == "gpt-2" else _llama3_style(checkpoints["dense"], tmp_path / "l3")
    path = _export(src, tmp_path / "m.gguf")
    assert GGUFFile(path).meta["tokenizer.ggml.pre"] == style
    orig, back = Tokenizer.from_dir(src), load_gguf(path)[1]
    for t in TEXTS:
        assert back.encode(t) == orig.encode(t) and back.decode(back.encode(t)) == t
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    assert back.apply_chat_template(msgs) == orig.apply_chat_template(msgs)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.stop_token_ids()) == \
        (orig.bos_token_id, orig.eos_token_id, orig.pad_token_id, orig.stop_token_ids())


@pytest.mark.parametrize("name,why", [
    ("dense-conv-bias", "conv_bias"), ("dense-kernel1-headdim32-kv1", "conv kernel of width 2"),
    ("moe-nobias-nonorm-scaled", "norm_topk_prob"), ("moe-topall-scaled", "routed_scaling_factor"),
    ("dense-all-conv", "at least one conv and one attention"), ("dense-all-attn-mha", "only attention")])
def test_export_refuses_what_llama_cpp_cannot_run(name, why, checkpoints, tmp_path):
    with pytest.raises(GGUFError, match=why):
        _export(checkpoints[name], tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_head_dim_other_than_hidden_over_heads_is_refused(tmp_path, tokenizer_dir):
    m = random_model(dict(CONFIGS["dense"], head_dim=32))
    with pytest.raises(GGUFError, match="head_dim=32"):
        _export(m, tmp_path / "x.gguf", tokenizer=tokenizer_dir)


def test_export_input_errors(checkpoints, tmp_path):
    with pytest.raises(GGUFError, match="q3_k.*not supported"):
        _export(checkpoints["dense"], tmp_path / "x.gguf", type="q3_k")
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["dense"], bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(GGUFError, match="no tokenizer.json"):
        _export(bare, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="already a GGUF"):
        _export(tmp_path / "x.gguf", tmp_path / "y.gguf")
    with pytest.raises(GGUFError, match="does not exist"):
        _export(checkpoints["dense"], tmp_path / "nope" / "x.gguf")


def _rewrite(src: Path, dst: Path, arch: str | None = None, drop: str | None = None, **meta) -> Path:
    """Copy a GGUF file, optionally claiming another architecture, leaving one tensor out or changing keys."""
    g = GGUFFile(src)
    w = gguf.GGUFWriter(dst, arch or g.arch)
    for k, v in {**g.meta, **{k.replace("__", "."): v for k, v in meta.items()}}.items():
        if k != "general.architecture":
            _add(w, k.replace(f"{g.arch}.", f"{arch}.") if arch else k, v)
    for name, t in g.tensors.items():
        if name != drop:
            w.add_tensor(name, np.array(g.raw(name)), raw_dtype=gguf.GGMLQuantizationType[t.type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_files_give_one_clear_error_naming_the_file(checkpoints, tmp_path):
    good = _export(checkpoints["dense"], tmp_path / "good.gguf")
    raw = good.read_bytes()
    cases = {
        "missing.gguf": (None, "no such file"),
        "text.gguf": (b"not a model at all", "not a GGUF file"),
        "header.gguf": (raw[:300], "corrupt or truncated"),
        "half.gguf": (raw[: len(raw) // 2], "truncated"),
    }
    for name, (data, msg) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        for load in (load_gguf, load_model, LLM):
            with pytest.raises(CheckpointError, match=msg) as e:
                load(p)
            assert name in str(e.value)
    llama = _rewrite(good, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFError, match="architecture 'llama' is not an LFM2 model"):
        load_model(llama)
    bad = _rewrite(good, tmp_path / "meta.gguf", lfm2__block_count="four")
    with pytest.raises(GGUFError, match=r"meta\.gguf: invalid model metadata"):
        load_model(bad)
    hole = _rewrite(good, tmp_path / "hole.gguf", drop="blk.1.attn_k.weight")
    with pytest.raises(GGUFError, match=r"hole\.gguf: tensor 'blk\.1\.attn_k\.weight' is missing"):
        load_model(hole)


def test_llm_and_cli_run_a_gguf_file(checkpoints, tmp_path, capsys):
    out = tmp_path / "m-q8_0.gguf"
    assert main(["export", "gguf", str(checkpoints["dense"]), "-o", str(out), "--type", "q8_0", "-q"]) == 0
    assert "wrote" in capsys.readouterr().err and out.is_file()
    f32 = _export(checkpoints["dense"], tmp_path / "m-f32.gguf")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = LLM(str(checkpoints["dense"]), dtype="float32").generate("The weather", sp)[0]
    got = LLM(str(f32), dtype="float32").generate("The weather", sp)[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    assert main(["generate", str(out), "Hello", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert main(["export", "gguf", str(checkpoints["dense-conv-bias"]), "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfm: error:") and "conv_bias" in err[0]


def test_cli_choices_are_the_writer_types():
    assert TYPE_CHOICES == tuple(TYPES)


def _model_bytes(model: torch.nn.Module) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


@pytest.mark.parametrize("type", ["q4_0", "q4_1"])
@pytest.mark.parametrize("name", ["dense", "moe-top1-untied-kernel4"])
def test_q4_linears_load_as_int4_layers(name, type, checkpoints, tmp_path):
    """Q4_0 / Q4_1 linears become Int4Linear(group 32) filled from the blocks: same logits as dequantising them."""
    from lfm.gguf import load_gguf_model
    from lfm.model.quant import Int4Linear

    path = _export(checkpoints[name], tmp_path / "m.gguf", type=type)
    g = GGUFFile(path)
    q4 = [s.hf[:-len(".weight")] for s in tensor_specs(load_gguf(path, dtype="float32")[0].config)
          if g.tensors[s.gguf].type == TYPES[type][0] and not s.part and len(s.shape) == 2
          and s.gguf != "token_embd.weight"]
    assert q4  # the file does hold Q4 linears
    kept = load_gguf_model(path, dtype="float32", keep_quantized=True)
    deq = load_gguf_model(path, dtype="float32", keep_quantized=False)
    for n in q4:
        assert isinstance(kept.get_submodule(n), Int4Linear), n
        assert kept.get_submodule(n).group_size == 32
        assert isinstance(deq.get_submodule(n), torch.nn.Linear), n
        torch.testing.assert_close(kept.get_submodule(n).dequantize(), deq.get_submodule(n).weight, rtol=0, atol=1e-6)
    exps = [s for s in tensor_specs(kept.config) if s.hf.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if exps and all(g.tensors[s.gguf].type == TYPES[type][0] for s in exps):  # Q4 experts stay quantized too
        from lfm.model.quant import QuantExperts

        for layer, ref in zip(kept.model.layers, deq.model.layers):
            if hasattr(layer.feed_forward, "experts"):
                qe = layer.feed_forward.experts
                assert isinstance(qe, QuantExperts) and qe.gate_up.bits == 4 and qe.gate_up.group_size == 32
                d = qe.dequantize()
                torch.testing.assert_close(d.gate_up_proj, ref.feed_forward.experts.gate_up_proj, rtol=0, atol=1e-6)
                torch.testing.assert_close(d.down_proj, ref.feed_forward.experts.down_proj, rtol=0, atol=1e-6)
    assert isinstance(kept.model.embed_tokens, torch.nn.Embedding)
    if kept.config.tie_word_embeddings:
        assert kept.lm_head.weight is kept.model.embed_tokens.weight
    a, b = kept(IDS), deq(IDS)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    assert _model_bytes(kept) < _model_bytes(deq)
    # a float file keeps its float layers
    f32 = load_gguf_model(_export(checkpoints[name], tmp_path / "f.gguf"), dtype="float32")
    assert not any(isinstance(m, Int4Linear) for m in f32.modules())
