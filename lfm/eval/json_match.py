"""JSON extraction scoring: plain functions of the reply text (no engine import), shared by the `json` task and
RL rewards. A reply is scored on three levels: it holds a JSON object, the object validates against the schema
(jsonschema, Draft 2020-12), and its fields equal the reference (numbers by value, strings ignoring case and outer
spaces, booleans only as booleans)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class JsonScore:
    json_valid: bool  # the reply holds a JSON object
    schema_valid: bool  # ... that validates against the schema
    field_accuracy: float  # fraction of reference fields present with an equal value (0 without an object)


def extract_json(text: str) -> Any:
    """The JSON value a reply gives: the whole reply (a ```json fence allowed), else the first object in it."""
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip(), flags=re.IGNORECASE)
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            return dec.raw_decode(text, m.start())[0]
        except json.JSONDecodeError:
            continue
    return None


def same_value(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, str) and isinstance(got, str):
        return got.strip().casefold() == want.strip().casefold()
    return got == want


def score_json(text: str, schema: dict | None, expected: dict[str, Any]) -> JsonScore:
    """Score one reply; `schema` None skips the schema level (schema_valid = json_valid)."""
    obj = extract_json(text)
    if not isinstance(obj, dict):
        return JsonScore(False, False, 0.0)
    valid = True
    if schema is not None:
        try:
            import jsonschema
        except ImportError:
            raise ValueError("JSON schema checks need jsonschema: pip install 'lfm[eval]'") from None
        valid = jsonschema.Draft202012Validator(schema).is_valid(obj)
    right = sum(k in obj and same_value(obj[k], v) for k, v in expected.items())
    return JsonScore(True, valid, right / len(expected) if expected else 1.0)


def json_reward(text: str, schema: dict | None, expected: dict[str, Any]) -> float:
    """A graded reward in [0, 1] for RL: 0.2 for a JSON object, 0.2 more when schema-valid, 0.6 x field accuracy."""
    s = score_json(text, schema, expected)
    return 0.2 * s.json_valid + 0.2 * s.schema_valid + 0.6 * s.field_accuracy
