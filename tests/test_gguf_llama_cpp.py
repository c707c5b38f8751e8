"""Our GGUF files in llama.cpp (through llama-cpp-python), and llama.cpp's files in lfm: logits, greedy text,
tokenisation, K-quants written by llama.cpp's quantizer, and the output of llama.cpp's own converter.

Runs whenever `llama_cpp` is importable. The converter test also needs llama.cpp's `convert_hf_to_gguf.py`
(not part of the llama-cpp-python wheel): point LLAMA_CPP_CONVERT at it, e.g. from the sdist's vendor/llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="GGUF support needs the `gguf` package (pip install gguf)")
if os.environ.get("CI"):  # CI installs it: a missing llama.cpp must fail there, not skip
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from lfm import LLM, SamplingParams, load_model  # noqa: E402
from lfm.gguf import export_gguf, load_gguf  # noqa: E402
from lfm.gguf.gguf_file import GGUFFile  # noqa: E402
from lfm.model.checkpoint import save_model  # noqa: E402
from lfm.text.tokenizer import Tokenizer  # noqa: E402

from .conftest import DENSE, MOE, layers, random_model  # noqa: E402
from .test_gguf import TEXTS, _llama3_style  # noqa: E402

torch.set_grad_enabled(False)
F32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
N = 256  # positions compared
SEQ = torch.randint(14, 512, (N,), generator=torch.Generator().manual_seed(7))


def _plain_cpu_params():
    """llama.cpp's default model params without its extra CPU buffer types (weight repacking, AMX tiles): its AMX
    path dies with SIGILL in this project's VMs (tileloadd, even with the tile permission granted), and the plain
    CPU path is the reference we compare against anyway."""
    p = _default_params()
    p.use_extra_bufts = False
    return p


_default_params = llama_cpp.llama_cpp.llama_model_default_params
llama_cpp.llama_cpp.llama_model_default_params = _plain_cpu_params


def _llama(path: Path, **kw) -> "llama_cpp.Llama":
    # an F32 KV cache: the default F16 one alone moves logits by ~1e-3
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, verbose=False, type_k=F32, type_v=F32,
                           n_threads=1, n_threads_batch=1, **kw)  # tiny models: threads only add sync stalls


def _logits(llm: "llama_cpp.Llama", ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def _export(src, path: Path, type: str = "f32", **kw) -> Path:
    return export_gguf(src, path, type=type, progress=False, **kw)


@pytest.mark.parametrize("name", ["dense", "moe", "dense-mqa-kernel4-untied", "moe-top1-untied-kernel4"])
def test_f32_logits_match_llama_cpp(name, checkpoints, tmp_path):
    ours = load_model(checkpoints[name], dtype="float32")
    theirs = _logits(_llama(_export(checkpoints[name], tmp_path / "m.gguf")), SEQ.tolist())
    assert (theirs - ours(SEQ[None])[0]).abs().max().item() <= 1e-3  # measured ~5e-6


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_f32_greedy_continuation_matches_llama_cpp(name, checkpoints, tmp_path):
    llm = _llama(_export(checkpoints[name], tmp_path / "m.gguf"))
    prompt = SEQ[:8].tolist()
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(24):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(t)
        llm.eval([t])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = LLM(load_model(checkpoints[name], dtype="float32")).generate(prompt, sp)[0].token_ids
    assert ours == theirs


def _probe_model(cfg: dict, ids: torch.Tensor):
    """A random model (untied) whose head rows are its own final hidden states at the positions of `ids`.

    Random weights give near-tied logits (median top-1/top-2 gap ~0.13 against a logit spread of ~0.66), so top-1
    agreement of a random model measures luck rather than fidelity. With this head, position t's top-1 is t whenever
    its hidden state arrives intact through every layer, with a margin of about half the logit scale.
    """
    m = random_model(dict(cfg, tie_word_embeddings=False))
    h = m.hidden_states(ids[None])[0]
    m.lm_head.weight[: len(ids)] = h / h.norm(dim=-1, keepdim=True)
    return m


DISTINCT = torch.randperm(498, generator=torch.Generator().manual_seed(1))[:N] + 14  # no repeated token


@pytest.fixture(scope="module")
def probes(tmp_path_factory, tokenizer_dir) -> dict[str, tuple[Path, torch.Tensor]]:
    """Dense and MoE probe checkpoints with their float32 logits over DISTINCT, built once."""
    out = {}
    for arch, cfg in (("dense", DENSE), ("moe", MOE)):
        model = _probe_model(cfg, DISTINCT)
        d = tmp_path_factory.mktemp(f"probe-{arch}")
        save_model(model, d, tokenizer_dir=tokenizer_dir)
        out[arch] = (d, model(DISTINCT[None])[0])
    return out


@pytest.mark.parametrize("arch,type", [("dense", "q8_0"), ("dense", "q4_0"), ("dense", "q5_1"), ("dense", "bf16"),
                                       ("moe", "q8_0"), ("moe", "q4_0")])
def test_quantized_files_agree_with_llama_cpp(arch, type, probes, tmp_path):
    ckpt, ref = probes[arch]
    path = _export(ckpt, tmp_path / "m.gguf", type=type)
    theirs = _logits(_llama(path), DISTINCT.tolist())
    assert (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.99  # measured 1.00 for every type
    # the same file in lfm: llama.cpp only adds its 8-bit activation rounding (~2-3% mean relative difference)
    loaded = load_gguf(path, dtype="float32")[0](DISTINCT[None])[0]
    assert ((theirs - loaded).abs().mean() / loaded.abs().mean()).item() <= 0.1


WIDE = dict(DENSE, hidden_size=256, intermediate_size=384, block_multiple_of=256, num_hidden_layers=3,
            layer_types=layers(3, [1]))  # rows of 256: what K-quant super-blocks need


def test_files_quantized_by_llama_cpp_load_in_lfm(tmp_path, tokenizer_dir):
    """llama.cpp's own quantizer (Q4_K_M, Q5_K_M, Q6_K) on our F32 file; lfm dequantises the K-quants."""
    model = _probe_model(WIDE, DISTINCT)
    save_model(model, tmp_path / "ckpt", tokenizer_dir=tokenizer_dir)
    f32 = _export(tmp_path / "ckpt", tmp_path / "f32.gguf")
    for ftype, kinds in ((15, {"Q4_K", "Q6_K"}), (17, {"Q5_K", "Q6_K"}), (18, {"Q6_K"})):
        out = tmp_path / f"q{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
        assert kinds <= {t.type for t in GGUFFile(out).tensors.values()}
        loaded = load_gguf(out, dtype="float32")[0](DISTINCT[None])[0]
        theirs = _logits(_llama(out), DISTINCT.tolist())
        assert (theirs.argmax(-1) == loaded.argmax(-1)).float().mean().item() >= 0.99
        assert ((theirs - loaded).abs().mean() / loaded.abs().mean()).item() <= 0.1  # measured 0.02-0.05


@pytest.mark.parametrize("style", ["gpt-2", "lfm2"])
def test_llama_cpp_tokenizes_like_lfm(style, checkpoints, tmp_path):
    src = checkpoints["dense"] if style == "gpt-2" else _llama3_style(checkpoints["dense"], tmp_path / "l3")
    llm = llama_cpp.Llama(model_path=str(_export(src, tmp_path / "m.gguf")), vocab_only=True, verbose=False)
    tok = Tokenizer.from_dir(src)
    for t in TEXTS:
        assert llm.tokenize(t.encode(), add_bos=True, special=False) == tok.encode(t)
    chat = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def _converter() -> Path:
    env = os.environ.get("LLAMA_CPP_CONVERT")
    if env and Path(env).is_file():
        return Path(env)
    fetched = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
    if fetched.is_file():  # put there by tools/fetch_llama_converter.py (the README's test command runs it)
        return fetched
    (pytest.fail if os.environ.get("CI") else pytest.skip)("set LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py (in the llama-cpp-python sdist under "
                "vendor/llama.cpp/) to test files written by llama.cpp's converter")


# The test tokenizer is not one of the published ones llama.cpp recognises by hash; tell the converter its
# pre-tokenizer (GPT-2 byte level) instead of letting it refuse. Nothing else of the converter is changed.
_WRAPPER = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [str(script)] + sys.argv[2:]
runpy.run_path(str(script), run_name="__main__")
"""


@pytest.mark.parametrize("name", ["dense", "moe"])  # its lfm2moe mapping has no `output` (untied head) tensor
def test_file_from_llama_cpp_converter_loads_with_the_same_logits(name, checkpoints, tmp_path):
    script = _converter()
    wrapper = tmp_path / "convert.py"
    wrapper.write_text(_WRAPPER)
    out = tmp_path / "theirs.gguf"
    p = subprocess.run([sys.executable, str(wrapper), str(script), str(checkpoints[name]), "--outfile", str(out),
                        "--outtype", "f32"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    model, tok, _ = load_gguf(out, dtype="float32")
    ref = load_model(checkpoints[name], dtype="float32")
    ids = SEQ[None, :64]
    assert (model(ids) - ref(ids)).abs().max().item() <= 1e-5
    orig = Tokenizer.from_dir(checkpoints[name])
    assert all(tok.encode(t) == orig.encode(t) for t in TEXTS) and tok.chat_template == orig.chat_template
