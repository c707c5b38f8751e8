"""The demo model's tokenizer: a small byte-level BPE trained on the stdlib corpus, laid out like an LFM2 checkpoint.

A 65,536-token vocabulary would make the embedding most of a few-million-parameter model, so the demo gets its own
4,096-token BPE. Everything else matches LFM2: the 14 control tokens at ids 0..13 (shared with the test tokenizer in
`lfm.text.tiny_tokenizer`), a BOS post-processor, eos `<|im_end|>`, pad `<|pad|>`, and the "lfm2" chat template in
tokenizer_config.json, so `lfm.text.tokenizer.Tokenizer` and `transformers.AutoTokenizer` both load it and the chat
format (roles, tool lists, tool calls) is the one real LFM2 checkpoints use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lfm.text.templates import TEMPLATES
from lfm.text.tiny_tokenizer import MODEL_MAX_LENGTH, SPECIAL_TOKENS, _added_tokens_decoder, train_lfm2_bpe
from lfm.text.tokenizer import Tokenizer
from lfm.train.demo.corpus import read_jsonl

DEMO_VOCAB_SIZE = 4096

# Text the chat template and the chat data add around corpus content, so that role names, tool syntax and the
# usual question words get merges even though docstrings rarely contain them.
_CHAT_HINTS = [
    "system\n", "user\n", "assistant\n", "List of tools: ", '[{"type": "function", "function": {"name": ',
    '"description": ', '"parameters": {"type": "object", "properties": {', '"required": ["name"]}}}',
    'lookup_doc(name="json.dumps")', 'list_functions(module="os.path")', 'get_signature(name="str.split")',
    "What does `json.dumps` do?", "Explain os.path.join.", "What is the signature of math.sqrt?",
    "Which functions does the json module define?", "Hello! I can answer questions about the Python standard library.",
    "You are a helpful assistant.", "Thanks! You're welcome. Who are you? I'm a small demo model.",
    "I couldn't find that in the documentation.", "The signature is", "It takes the following arguments:",
]
_HINT_REPEATS = 20


def corpus_texts(corpus_jsonl: str | Path) -> Iterator[str]:
    """The documents' text, streamed, followed by the chat hints (repeated so their merges clear min_frequency)."""
    for row in read_jsonl(corpus_jsonl):
        yield row["text"]
    for _ in range(_HINT_REPEATS):
        yield from _CHAT_HINTS


def train_bpe(texts: Iterator[str], vocab_size: int = DEMO_VOCAB_SIZE) -> HFTokenizer:
    """Byte-level BPE with LFM2's control tokens first (ids 0..13) and a BOS post-processor."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (control + byte tokens)")
    return train_lfm2_bpe(texts, vocab_size)


def tokenizer_config() -> dict:
    """tokenizer_config.json as LFM2 checkpoints write it, with the "lfm2" template inline."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": "<|im_end|>",
        "pad_token": SPECIAL_TOKENS[0],
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens_decoder(),
    }


def train_demo_tokenizer(corpus_jsonl: str | Path, out_dir: str | Path, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """Train on `corpus_jsonl` and write tokenizer.json, tokenizer_config.json, special_tokens_map.json to `out_dir`.

    Deterministic for a given corpus and size. Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = train_bpe(corpus_texts(corpus_jsonl), vocab_size)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # would override the inline template
    Tokenizer(hf, tokenizer_config(), TEMPLATES["lfm2"], template_in_file=False).save(out)
    return out
