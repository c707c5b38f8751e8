"""The tokenizer inside a GGUF file, both ways: `tokenizers` byte-level BPE <-> llama.cpp's `gpt2` vocabulary keys.

llama.cpp keeps the token strings (byte-level alphabet), their types, the merges, the special ids and a named
pre-tokenizer (`tokenizer.ggml.pre`) instead of a regex. LFM2's tokenizers split with the Llama-3 regex, which
llama.cpp calls `lfm2`; a plain GPT-2 ByteLevel split (our test tokenizer) is `gpt-2`. Import rebuilds exactly
those two, so text encodes the same way in llama.cpp and in lfm.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..text.tokenizer import Tokenizer
from .mapping import GGUFError

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the split regex of LFM2's tokenizer.json (the Llama-3 one); llama.cpp names it "lfm2"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMES = ("lfm2", "llama3", "llama-v3", "llama-bpe")
_GPT2_NAMES = ("gpt-2", "gpt2")


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer (warns and says `lfm2` when it is neither known form)."""
    def is_bytelevel(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if pre and is_bytelevel(pre, True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and is_bytelevel(parts[1], False)
            and r"\p{N}{1,3}" in str(parts[0].get("pattern", {}).get("Regex", ""))):
        return "lfm2"
    print(f"lfm: warning: unrecognised pre-tokenizer {json.dumps(pre)[:120]}; writing 'lfm2' (llama.cpp may split "
          "text differently from this tokenizer)", file=sys.stderr)
    return "lfm2"


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` keys for a GGUF file: values as Python lists / scalars, keyed by their GGUF names."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError("only byte-level BPE tokenizers (the LFM2 kind) can be written to GGUF; this one is "
                        f"{model.get('type')!r} with decoder {(spec.get('decoder') or {}).get('type')!r}")
    if spec.get("normalizer"):
        raise GGUFError(f"the tokenizer has a normalizer ({spec['normalizer'].get('type')}), which GGUF cannot hold")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    types: dict[int, int] = {i: NORMAL for i in vocab.values()}
    for a in spec.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n = max(vocab.values(), default=-1) + 1
    if n > vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never produces, as llama.cpp's converter
    toktypes = [UNUSED] * vocab_size
    for s, i in vocab.items():
        tokens[i], toktypes[i] = s, types[i]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": toktypes,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos_token),
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("padding", tok.pad_token_id)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = tid
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def tokenizer_from_metadata(meta: dict[str, Any], where: str) -> Tokenizer:
    """Rebuild our `Tokenizer` from GGUF `tokenizer.*` keys (`where` names the file in errors)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{where}: tokenizer model {kind!r} is not supported (LFM2 files use 'gpt2' byte-level BPE)")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFError(f"{where}: the file holds no tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    llama3 = pre in _LLAMA3_NAMES
    if not llama3 and pre not in _GPT2_NAMES:
        raise GGUFError(f"{where}: pre-tokenizer {pre!r} is not supported (expected 'lfm2' or 'gpt-2')")
    # control tokens stay in the BPE vocabulary too (as `tokenizers` trains them), so each keeps its id when added
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{where}: merge {m!r} is not two tokens separated by a space")
        merges.append((a, b))
    try:
        tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=llama3))
    except Exception as e:  # the Rust error names the merge that refers to an unknown token
        raise GGUFError(f"{where}: unusable BPE vocabulary/merges ({e})") from None
    if llama3:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    # llama.cpp adds BOS for the lfm2 pre-tokenizer unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", llama3))
    bos = name("bos")
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1",
                                                           special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    config = {"add_bos_token": add_bos, "bos_token": bos, "eos_token": name("eos"), "pad_token": name("padding")}
    return Tokenizer(tk, config, meta.get("tokenizer.chat_template"))
