"""A tiny but real LFM2-style tokenizer, trained at runtime, for tests and smoke runs.

Real checkpoints are far too large for unit tests, yet the tokenizer code paths (special ids, chat templates,
byte-level UTF-8 splits) must be exercised against a genuine `tokenizers` byte-level BPE. This module trains one in
well under a second on a built-in corpus, with the control tokens at the exact LFM2 ids 0..13, and writes it in the
Hugging Face layout (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, optional
`chat_template.jinja`) so that both our `Tokenizer` and `transformers.AutoTokenizer` load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lfm.text.templates import TEMPLATES

# The control tokens of the 65,536-token LFM2 vocabulary, in id order (spec section 1).
SPECIAL_TOKENS: list[str] = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
]

TINY_VOCAB_SIZE = 512  # 14 control tokens + 256 byte tokens + 242 learned merges
MODEL_MAX_LENGTH = 32768

_CORPUS = """
The quick brown fox jumps over the lazy dog. What is C. elegans? It's a tiny nematode that lives in soil.
You are a helpful assistant trained by Liquid AI. Please answer the question about the weather in Paris.
The weather today is sunny with a light breeze; tomorrow there will be rain in the morning and clouds later.
Liquid foundation models mix short convolutions with grouped-query attention for fast inference on devices.
Tokenizers split text into pieces, and the model predicts the next piece given the previous ones.
She said: "I would like to book a table for two people at seven o'clock, please." He replied that it was fine.
Numbers like 1, 2, 3, 10, 42, 100, 2024 and 3.14159 appear in text, as do dates such as 2025-01-31.
def get_weather(city: str, days: int = 1) -> dict:
    \"\"\"Return the forecast for a city.\"\"\"
    return {"city": city, "days": days, "forecast": [], "unit": "celsius"}

class Tokenizer:
    def __init__(self, path):
        self.path = path

    def encode(self, text, add_bos=True):
        ids = [self.bos_id] if add_bos else []
        for piece in text.split():
            ids.append(self.lookup(piece))
        return ids

for i in range(10):
    print(f"step {i}: loss={loss:.4f} lr={lr:.2e}")
if x is None or y is not None and not z:
    raise ValueError("bad input")
import json, os, sys
result = json.dumps({"name": "get_time", "arguments": {"tz": "UTC"}}, indent=2)
[get_weather(city="Paris", days=2), get_time(tz='UTC')]
Café, naïve, résumé, façade, über, Straße, niño, jalapeño; 東京 and 北京 are cities; Москва тоже.
Emoji are common in chat: 😀 😃 🎉 👍 ❤️ 🚀 — and so are arrows → ← and bullets •.
"""


def training_corpus() -> list[str]:
    """Repeat the corpus so merges for common words and multi-byte characters are learned."""
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    return lines * 8


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> HFTokenizer:
    """Train the byte-level BPE in memory (deterministic for a given corpus and size)."""
    return train_lfm2_bpe(training_corpus(), vocab_size)


def train_lfm2_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE with LFM2's control tokens at ids 0..13 and a BOS post-processor (deterministic)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A:0",
        pair=f"{bos} $A:0 {bos} $B:1",
        special_tokens=[(bos, 1)],
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"BPE training: {token} got id {tok.token_to_id(token)}, expected {i}")
    return tok


def _added_tokens_decoder() -> dict[str, dict]:
    return {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }


def build_tiny_tokenizer(out_dir: str | Path, template: str = "lfm2") -> Path:
    """Write the tiny tokenizer with the given chat template ("lfm2" or "lfm25") to `out_dir`; return the dir.

    "lfm2" stores the template as `chat_template` in tokenizer_config.json (like LFM2 checkpoints); "lfm25"
    writes `chat_template.jinja` beside it (like LFM2.5 checkpoints).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config: dict = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens_decoder(),
    }
    jinja_path = out / "chat_template.jinja"
    if template == "lfm2":
        config["chat_template"] = TEMPLATES[template]
        jinja_path.unlink(missing_ok=True)
    else:
        jinja_path.write_text(TEMPLATES[template], encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    special_map = {
        "bos_token": config["bos_token"],
        "eos_token": config["eos_token"],
        "pad_token": config["pad_token"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", "utf-8")
    return out
