"""IFEval-style instruction checks (lfm.eval.checks) and BFCL-style tool-call matching (lfm.eval.tool_match), each on
hand-made passing and failing cases. Semantics follow the peers: IFEval's instruction ids, kwargs and relations
("at least" >=, "less than" <; paragraphs split on `***`; a ```json fence allowed around JSON), and BFCL's AST checker
(required parameters, unknown parameters fail, acceptable-value lists, `""` = optional, string standardisation,
parallel calls in any order, "irrelevance": no call when none is needed)."""

from __future__ import annotations

import pytest

from lfm.eval import checks
from lfm.eval.checks import check_instruction, follow_instructions, instruction_reward
from lfm.eval.tool_match import score_tool_calls, tool_call_reward
from lfm.text import ToolCall

CASES = [  # (instruction id, kwargs, a passing response, a failing response)
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "json dumps an object to text.", "Too short."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 4}, "Use json.dumps.",
     "Use json dumps for this one."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2},
     "It joins paths with os.sep between them.", "It joins paths. It uses os.sep."),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "One. Two! Three?", "One. Two."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
     "First part.\n\nSecond part."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\nB", "A\n***\n\n***\nB"),
    ("keywords:existence", {"keywords": ["json", "string"]}, "JSON turns objects into a string.",
     "JSON turns objects into text."),
    ("keywords:forbidden_words", {"forbidden_words": ["list"]}, "It returns a tuple.", "It returns a List."),
    ("keywords:frequency", {"keyword": "path", "relation": "at least", "frequency": 2},
     "A path joined to a path.", "A path joined to a file."),
    ("change_case:english_lowercase", {}, "os.path.join joins paths.", "os.path.join joins Paths."),
    ("change_case:english_capital", {}, "IT JOINS PATHS.", "IT JOINS paths."),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "Use JSON here.", "Use JSON and CSV."),
    ("detectable_format:json_format", {}, '```json\n{"name": "dumps"}\n```', '{"name": "dumps"'),
    ("detectable_format:json_format", {}, '[1, 2, 3]', 'The answer is [1, 2, 3].'),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Modules:\n* os\n* sys\n- json",
     "Modules:\n* os\n* sys"),
    ("detectable_format:title", {}, "<<On json>>\nIt encodes.", "On json\nIt encodes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*dumps* writes, **loads** reads.",
     "*dumps* writes, loads reads."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "It sorts. Any other questions?",
     "Any other questions? It sorts."),
    ("startend:start_checker", {"start_phrase": "Answer:"}, "Answer: it sorts.", "It sorts. Answer: yes"),
    ("startend:quotation", {}, '"It sorts a list."', "It sorts a list."),
    ("punctuation:no_comma", {}, "It sorts in place.", "It sorts, in place."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "It sorts.\nP.S. see sorted().",
     "It sorts. See sorted()."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Open [path] with [mode].",
     "Open [path] with mode."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_check_passes_and_fails(iid, kwargs, good, bad):
    assert check_instruction(good, iid, kwargs) is True
    assert check_instruction(bad, iid, kwargs) is False


def test_every_instruction_kind_has_cases():
    assert {c[0] for c in CASES} == set(checks.INSTRUCTIONS)


def test_several_instructions_and_reward():
    ins = [{"id": "punctuation:no_comma"}, {"id": "change_case:english_lowercase"},
           {"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": 3}}]
    assert follow_instructions("sorts a list", ins) == [True, True, False]
    assert instruction_reward("sorts a list", ins) == pytest.approx(2 / 3)
    assert instruction_reward("sorts", ins) == 1.0


def test_bad_instruction_data_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown instruction id"):
        check_instruction("x", "keywords:nope")
    with pytest.raises(ValueError, match="bad arguments"):
        check_instruction("x", "length_constraints:number_words", {"words": 3})
    with pytest.raises(ValueError, match="relation"):
        check_instruction("x", "length_constraints:number_words", {"relation": "about", "num_words": 3})


# ---- tool calls ------------------------------------------------------------------------------------------------
def tool(name: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props,
                                                                          "required": required}}}


TOOLS = [tool("lookup_doc", {"name": {"type": "string"}}, ["name"]),
         tool("get_weather", {"city": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}},
              ["city"])]
DOC = [{"name": "lookup_doc", "arguments": {"name": ["json.dumps"]}}]
WEATHER = [{"name": "get_weather", "arguments": {"city": ["Paris"], "unit": ["celsius", ""], "days": [3, ""]}}]
S, E = "<|tool_call_start|>", "<|tool_call_end|>"


def test_right_call_from_text_and_objects():
    s = score_tool_calls(f'{S}[lookup_doc(name="json.dumps")]{E}', DOC, TOOLS)
    assert (s.parsed, s.called, s.name_ok, s.correct) == (True, True, True, True)
    assert score_tool_calls([ToolCall("lookup_doc", {"name": "json.dumps"})], DOC, TOOLS).correct
    # BFCL standardises strings: case, spaces and ,./-_*^ do not count
    assert score_tool_calls([ToolCall("lookup_doc", {"name": "JSON.dumps "})], DOC, TOOLS).correct
    assert tool_call_reward([ToolCall("lookup_doc", {"name": "json.dumps"})], DOC, TOOLS) == 1.0


def test_wrong_name():
    s = score_tool_calls([ToolCall("get_weather", {"city": "json.dumps"})], DOC, TOOLS)
    assert not s.correct and not s.name_ok and "wrong function" in s.reason
    assert tool_call_reward([ToolCall("get_weather", {"city": "x"})], DOC, TOOLS) == 0.0


def test_wrong_argument_value():
    s = score_tool_calls([ToolCall("lookup_doc", {"name": "json.loads"})], DOC, TOOLS)
    assert s.name_ok and not s.correct and "wrong value" in s.reason
    assert tool_call_reward([ToolCall("lookup_doc", {"name": "json.loads"})], DOC, TOOLS) == 0.5
    assert not score_tool_calls([ToolCall("get_weather", {"city": "Paris", "days": "3"})], WEATHER, TOOLS).correct


def test_missing_required_argument():
    s = score_tool_calls([ToolCall("lookup_doc", {})], DOC, TOOLS)
    assert not s.correct and "missing required" in s.reason
    s = score_tool_calls([ToolCall("get_weather", {"unit": "celsius"})], WEATHER, TOOLS)
    assert not s.correct and "missing required argument 'city'" in s.reason


def test_optional_arguments_may_be_left_out_or_given():
    assert score_tool_calls([ToolCall("get_weather", {"city": "Paris"})], WEATHER, TOOLS).correct
    assert score_tool_calls([ToolCall("get_weather", {"city": "paris", "unit": "celsius", "days": 3.0})], WEATHER,
                            TOOLS).correct
    assert not score_tool_calls([ToolCall("get_weather", {"city": "Paris", "unit": "kelvin"})], WEATHER, TOOLS).correct


def test_extra_argument():
    s = score_tool_calls([ToolCall("lookup_doc", {"name": "json.dumps", "verbose": True})], DOC, TOOLS)
    assert not s.correct and "unexpected argument 'verbose'" in s.reason


def test_no_call_needed():
    s = score_tool_calls("Hello! Ask me about the standard library.", [], TOOLS)
    assert s.correct and not s.called
    s = score_tool_calls(f'{S}[lookup_doc(name="hello")]{E}', [], TOOLS)
    assert not s.correct and s.called and "none was needed" in s.reason
    assert not score_tool_calls("It encodes objects as JSON.", DOC, TOOLS).correct  # a call was needed


def test_unparseable_call_and_parallel_calls():
    s = score_tool_calls(f"{S}[lookup_doc(name=]{E}", DOC, TOOLS)
    assert not s.parsed and not s.correct
    s = score_tool_calls(f'{S}[lookup_doc(name="json.dumps")]', DOC, TOOLS)  # cut off before the end sentinel
    assert not s.parsed and not s.correct
    two = DOC + [{"name": "get_weather", "arguments": {"city": ["Paris"]}}]
    swapped = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("lookup_doc", {"name": "json.dumps"})]
    assert score_tool_calls(swapped, two, TOOLS).correct
    assert not score_tool_calls(swapped[:1], two, TOOLS).correct
    assert not score_tool_calls(swapped + swapped[:1], two, TOOLS).correct


# ---- JSON extraction -------------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "member": {"type": "boolean"}}, "required": ["name", "age"]}
WANT = {"name": "Alice Smith", "age": 34, "member": True}


def test_json_scores():
    from lfm.eval.json_match import json_reward, score_json

    s = score_json('{"name": "alice smith ", "age": 34, "member": true}', SCHEMA, WANT)
    assert (s.json_valid, s.schema_valid, s.field_accuracy) == (True, True, 1.0)
    assert json_reward('```json\n{"name": "Alice Smith", "age": 34.0, "member": true}\n```', None, WANT) == 1.0
    s = score_json('Here it is: {"name": "Alice Smith", "age": "34", "member": 1} hope it helps', SCHEMA, WANT)
    assert (s.json_valid, s.schema_valid) == (True, False)  # "34" is not an integer; 1 is not a boolean
    assert s.field_accuracy == pytest.approx(1 / 3)
    s = score_json('{"name": "Bob", "age": 34}', SCHEMA, WANT)
    assert (s.schema_valid, s.field_accuracy) == (True, pytest.approx(1 / 3))
    for bad in ('{"name": "Alice Smith", "age": 34', "[1, 2]", "Alice is 34."):
        s = score_json(bad, SCHEMA, WANT)
        assert (s.json_valid, s.schema_valid, s.field_accuracy) == (False, False, 0.0)
        assert json_reward(bad, SCHEMA, WANT) == 0.0


def test_loose_reading_as_ifeval():
    """IFEval's loose score: the response without its first and/or last line, or without asterisks, may follow."""
    ins = [{"id": "change_case:english_lowercase"}]
    text = "Sure! Here it is:\n**os.path joins paths**"
    assert follow_instructions(text, ins) == [False]
    assert follow_instructions(text, ins, loose=True) == [True]
    assert follow_instructions("Os joins Paths.\nAnd More.", ins, loose=True) == [False]
    ins = [{"id": "startend:quotation"}]
    assert follow_instructions('"It sorts."\nHope this helps!', ins, loose=True) == [True]
    assert follow_instructions('"It sorts."\nHope this helps!', ins) == [False]
