"""Data for the demo model that ships as the offline default: corpus, tokenizer and chat data, all from local files.

`lfm chat` / `generate` / `serve` need a model that works without a download, so a few-million-parameter LFM2 is
trained on what every Python install has, its standard library's documentation:

- `corpus.py`    docstrings (via `ast`, C modules via introspection, reference topics) -> corpus.jsonl (+ held-out)
- `vocab.py`     a 4,096-token byte-level BPE with LFM2's control tokens and "lfm2" chat template -> tokenizer/
- `chat_data.py` Q&A and tool-calling conversations templated from the corpus -> chat.jsonl (+ held-out)

`prepare_demo_data` runs the three stages into one directory; each is deterministic, so the shipped model can be
rebuilt byte for byte on the same Python version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lfm.train.demo.chat_data import build_chat_data
from lfm.train.demo.corpus import build_corpus, read_jsonl
from lfm.train.demo.vocab import DEMO_VOCAB_SIZE, train_demo_tokenizer

__all__ = ["build_chat_data", "build_corpus", "prepare_demo_data", "train_demo_tokenizer"]


def _count_tokens(tokenizer_dir: Path, corpus_jsonl: Path) -> tuple[int, int]:
    """(tokens without BOS, chars) of a corpus file under the trained tokenizer."""
    from lfm.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    texts = [row["text"] for row in read_jsonl(corpus_jsonl)]
    encodings = tok.backend.encode_batch(texts, add_special_tokens=False) if texts else []
    return sum(len(e.ids) for e in encodings), sum(len(t) for t in texts)


def prepare_demo_data(out_dir: str | Path, max_chars: int | None = None, vocab_size: int = DEMO_VOCAB_SIZE,
                      n_qa: int = 12000, n_tool: int = 6000, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Build corpus.jsonl, corpus.heldout.jsonl, tokenizer/, chat.jsonl, chat.heldout.jsonl in `out_dir`.

    Returns {"corpus", "tokenizer", "chat", "seconds"} stats; `progress` receives one line per finished stage.
    Every chat conversation is rendered with the new tokenizer and checked (mask, tool-call round trip).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda line: None)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    corpus = build_corpus(out / "corpus.jsonl", max_chars=max_chars)
    seconds["corpus"] = time.perf_counter() - t0
    report(f"corpus: {corpus['documents']} documents, {corpus['chars']:,} chars "
           f"(+{corpus['heldout_documents']} held out) in {seconds['corpus']:.1f}s")

    t0 = time.perf_counter()
    tok_dir = train_demo_tokenizer(out / "corpus.jsonl", out / "tokenizer", vocab_size=vocab_size)
    tokens, chars = _count_tokens(tok_dir, out / "corpus.jsonl")
    held_tokens, held_chars = _count_tokens(tok_dir, out / "corpus.heldout.jsonl")
    seconds["tokenizer"] = time.perf_counter() - t0
    tokenizer = {"path": str(tok_dir), "vocab_size": vocab_size, "corpus_tokens": tokens,
                 "tokens_per_char": tokens / max(chars, 1), "heldout_tokens": held_tokens,
                 "heldout_tokens_per_char": held_tokens / max(held_chars, 1)}
    report(f"tokenizer: vocab {vocab_size}, corpus {tokens:,} tokens "
           f"({tokenizer['tokens_per_char']:.3f} tokens/char) in {seconds['tokenizer']:.1f}s")

    t0 = time.perf_counter()
    chat = build_chat_data(out / "corpus.jsonl", out / "chat.jsonl", n_qa=n_qa, n_tool=n_tool, seed=seed,
                           tokenizer_dir=tok_dir)
    seconds["chat"] = time.perf_counter() - t0
    report(f"chat: {chat['conversations']} conversations (+{chat['heldout_conversations']} held out), "
           f"{chat['tokens']:,} tokens, {chat['assistant_tokens']:,} in assistant turns, in {seconds['chat']:.1f}s")
    return {"corpus": corpus, "tokenizer": tokenizer, "chat": chat, "seconds": seconds}
