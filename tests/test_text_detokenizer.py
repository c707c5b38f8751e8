"""Incremental detokenizer: deltas concatenate to the full decode, never with a broken character."""

from __future__ import annotations

import json
import random
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lfm.text import IncrementalDetokenizer, Tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("detok"), "lfm2"))


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.fixture(scope="module")
def byte_ids(tok: Tokenizer) -> dict[int, int]:
    """byte value -> id of the single-byte token (the byte-level alphabet sits at ids 14..269)."""
    to_byte = _gpt2_unicode_to_byte()
    table = {to_byte[tok.id_to_token(i)]: i for i in range(14, 270)}
    assert len(table) == 256
    return table


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the byte-level alphabet."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_emoji_split_into_bytes_is_held_back(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    ids = [byte_ids[b] for b in "a😀b".encode()]
    deltas = stream(tok, ids)
    assert "".join(deltas) == "a😀b"
    assert "\ufffd" not in "".join(deltas)
    assert deltas[:6] == ["a", "", "", "", "😀", "b"]


def test_learned_multibyte_merges(tok: Tokenizer) -> None:
    text = "Emoji 😀 🎉 👍 ❤️ 🚀 café 東京 Москва → done"
    ids = tok.encode(text, add_bos=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_specials_skipped_or_kept(tok: Tokenizer) -> None:
    ids = [1, 6, *tok.encode("hi 😀", add_bos=False), 10, *tok.encode("[f()]", add_bos=False), 11, 7]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "hi 😀<|tool_call_start|>[f()]<|tool_call_end|>"
    assert "".join(stream(tok, ids, skip=False)) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("seed", range(20))
def test_random_sequences_equal_full_decode(tok: Tokenizer, byte_ids: dict[int, int], seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["😀", "🎉", "é", "東", "€", "a", " ", "\n", "ok", "👨‍👩‍👧"]
    ids: list[int] = []
    for _ in range(rng.randint(1, 120)):
        r = rng.random()
        if r < 0.4:  # a character split into its single bytes (the worst case for streaming)
            ids += [byte_ids[b] for b in rng.choice(pieces).encode()]
        elif r < 0.7:  # any token at all, including control tokens and invalid byte sequences
            ids.append(rng.randrange(tok.vocab_size))
        elif r < 0.8:  # a random raw byte (often an invalid or truncated UTF-8 sequence)
            ids.append(byte_ids[rng.randrange(256)])
        else:
            ids += tok.encode(rng.choice(pieces) * rng.randint(1, 3), add_bos=False)
    for skip in (True, False):
        deltas = stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_window_stays_bounded_on_long_streams(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("The quick brown fox 😀 jumps. " * 200, add_bos=False)
    # A long run of lone continuation bytes decodes to U+FFFD forever: it must still be released.
    ids += [byte_ids[0x80]] * 50 + tok.encode(" end", add_bos=False)
    widest = 0
    for i in ids:
        detok.push(i)
        widest = max(widest, len(detok._ids) - detok._prefix_offset)
    assert widest <= 16
    assert detok.text + detok.flush() == tok.decode(ids)


def test_forced_release_never_cuts_inside_a_character(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    """Real vocabularies hold tokens that finish one character and open the next (bytes A9 E2 here)."""
    data = json.loads(tok.backend.to_str())
    to_char = {b: c for c, b in _gpt2_unicode_to_byte().items()}
    data["model"]["vocab"][to_char[0xA9] + to_char[0xE2]] = tok.vocab_size
    wide = Tokenizer(HFTokenizer.from_str(json.dumps(data)), tok.config, tok.chat_template)
    cross = tok.vocab_size
    # 3 invalid bytes, then C3 | A9 E2 | 82 | F0: "é" straddles a cut while everything held ends in U+FFFD.
    ids = [byte_ids[0x80]] * 3 + [byte_ids[0xC3], cross, byte_ids[0x82], byte_ids[0xF0]]
    expected = wide.decode(ids)
    assert "é" in expected
    for tail in ([], tok.encode("ok", add_bos=False)):
        assert "".join(stream(wide, ids + tail)) == wide.decode(ids + tail)
    detok = IncrementalDetokenizer(wide)
    released = "".join(detok.push(i) for i in ids)
    assert released == "\ufffd" * 3  # released early, but only up to the last safe cut
