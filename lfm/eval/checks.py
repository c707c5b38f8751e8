"""Verifiable instruction checks, IFEval's kinds (Zhou et al. 2023, lm-eval's `ifeval` task): plain functions of the
response text, so an evaluation and an RL reward (lfm.train's GRPO) score a response the same way.

Each check takes the response and the instruction's keyword arguments (IFEval's names: `relation`, `num_words`,
`num_sentences`, `keywords`, ...) and returns True when the response follows it. Instruction ids are IFEval's
(`length_constraints:number_words`, ...), so a prompt written for IFEval reads the same here. Words are counted as
IFEval does (runs of `\\w`), relations are IFEval's two: "at least" (>=) and "less than" (<). Paragraphs are
separated by a markdown divider `***` as in IFEval; bullets are lines starting with `* ` or `- `.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

RELATIONS = ("at least", "less than")


def _compare(value: int, relation: str, target: int) -> bool:
    if relation == "at least":
        return value >= target
    if relation == "less than":
        return value < target
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def split_sentences(text: str) -> list[str]:
    """Sentences end at `.`, `!` or `?` followed by white space or the end (decimals and `json.dumps` stay whole)."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p for p in parts if re.search(r"\w", p)]


def number_words(text: str, relation: str, num_words: int) -> bool:
    return _compare(count_words(text), relation, num_words)


def number_sentences(text: str, relation: str, num_sentences: int) -> bool:
    return _compare(len(split_sentences(text)), relation, num_sentences)


def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` non-empty paragraphs separated by `***` (IFEval: an empty one fails)."""
    paras = re.split(r"\s?\*\*\*\s?", text)
    paras = paras[1:] if paras and not paras[0].strip() else paras  # a leading or trailing divider is allowed
    paras = paras[:-1] if paras and not paras[-1].strip() else paras
    return len(paras) == num_paragraphs and all(p.strip() for p in paras)


def keyword_existence(text: str, keywords: list[str]) -> bool:
    """Every keyword appears (case-insensitive, as a whole word or phrase)."""
    return all(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE) for k in keywords)


def forbidden_words(text: str, forbidden_words: list[str]) -> bool:  # noqa: A002 - IFEval's kwarg name
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in forbidden_words)


def keyword_frequency(text: str, keyword: str, relation: str, frequency: int) -> bool:
    n = len(re.findall(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE))
    return _compare(n, relation, frequency)


def english_lowercase(text: str) -> bool:
    return text == text.lower() and bool(re.search(r"[a-z]", text))


def english_capital(text: str) -> bool:
    return text == text.upper() and bool(re.search(r"[A-Z]", text))


def capital_word_frequency(text: str, capital_relation: str, capital_frequency: int) -> bool:
    return _compare(len(re.findall(r"\b[A-Z]{2,}\b", text)), capital_relation, capital_frequency)


def json_format(text: str) -> bool:
    """The whole response is JSON (a ```json fence around it is allowed, as IFEval strips one)."""
    body = re.sub(r"^\s*```(?:json|JSON|Json)?\s*|\s*```\s*$", "", text.strip())
    try:
        json.loads(body)
    except json.JSONDecodeError:
        return False
    return True


def number_bullet_lists(text: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines (`* item` or `- item`)."""
    return len(re.findall(r"^\s*[*-][ \t]+\S", text, re.MULTILINE)) == num_bullets


def title(text: str) -> bool:
    """A title wrapped in double angular brackets, <<like this>>."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", text))


def number_highlighted_sections(text: str, num_highlights: int) -> bool:
    """At least `num_highlights` sections highlighted with markdown, *like this* or **like this**."""
    marks = re.findall(r"\*\*[^\n*]+\*\*", text) + re.findall(r"(?<!\*)\*[^\n*]+\*(?!\*)", text)
    return sum(1 for m in marks if m.strip("*").strip()) >= num_highlights


def end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().lower().endswith(end_phrase.strip().lower())


def start_checker(text: str, start_phrase: str) -> bool:
    return text.strip().lower().startswith(start_phrase.strip().lower())


def quotation(text: str) -> bool:
    t = text.strip()
    return len(t) > 1 and t[0] == '"' and t[-1] == '"'


def no_comma(text: str) -> bool:
    return "," not in text


def postscript(text: str, postscript_marker: str = "P.S.") -> bool:
    """A postscript line starting with the marker (P.S. / P.P.S), as IFEval looks for it."""
    marker = re.escape(postscript_marker.strip()).replace(r"\ ", r"\s*")
    return re.search(rf"^\s*{marker}.*$", text, re.IGNORECASE | re.MULTILINE) is not None


def number_placeholders(text: str, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as [address]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", text)) >= num_placeholders


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "keywords:existence": keyword_existence,
    "keywords:forbidden_words": forbidden_words,
    "keywords:frequency": keyword_frequency,
    "change_case:english_lowercase": english_lowercase,
    "change_case:english_capital": english_capital,
    "change_case:capital_word_frequency": capital_word_frequency,
    "detectable_format:json_format": json_format,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:title": title,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "startend:end_checker": end_checker,
    "startend:start_checker": start_checker,
    "startend:quotation": quotation,
    "punctuation:no_comma": no_comma,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
}


def check_instruction(text: str, instruction_id: str, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether `text` follows one instruction; an unknown id or a wrong argument is a ValueError (a data error)."""
    fn = INSTRUCTIONS.get(instruction_id)
    if fn is None:
        raise ValueError(f"unknown instruction id {instruction_id!r}; known: {', '.join(INSTRUCTIONS)}")
    try:
        return bool(fn(text, **(kwargs or {})))
    except TypeError as e:
        raise ValueError(f"instruction {instruction_id}: bad arguments {kwargs} ({e})") from None


def loose_variants(text: str) -> list[str]:
    """IFEval's loose reading of a response: as is, without its first line, its last line, or both, each also
    with markdown asterisks removed (an instruction is followed loosely when any variant follows it)."""
    lines = text.split("\n")
    cuts = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for c in cuts for v in (c, c.replace("*", "")) if v.strip()]


def follow_instructions(text: str, instructions: list[dict[str, Any]], loose: bool = False) -> list[bool]:
    """One bool per instruction (`{"id": ..., "kwargs": {...}}`): IFEval's strict score of one response, or its
    loose score (any of `loose_variants` follows it)."""
    variants = loose_variants(text) if loose else [text]
    return [any(check_instruction(v, i["id"], i.get("kwargs")) for v in variants) for i in instructions]


def instruction_reward(text: str, instructions: list[dict[str, Any]]) -> float:
    """The fraction of instructions followed, in [0, 1]: a dense reward for RL (1.0 = IFEval's prompt-level pass)."""
    ok = follow_instructions(text, instructions)
    return sum(ok) / len(ok) if ok else 1.0
