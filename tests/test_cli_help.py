"""`lfm --help` and argument errors answer without loading torch, and every flag says what it does and its default.
(How fast is a benchmark line, not a timed test: `python benchmarks/cli_startup.py`.)"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lfm.cli import build_parser

COMMANDS = ["chat", "generate", "list", "pull", "info", "quantize", "bench", "init", "kernels", "export", "serve",
            "train"]


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, parser, action) for every option of every (nested) subcommand."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _flags(sub, (*path, name))
        elif a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield path, parser, a


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) <= set(sub.choices)


def test_every_flag_says_what_it_does_and_its_default():
    missing, no_default = [], []
    for path, parser, a in _flags(build_parser()):
        name = f"lfm {' '.join(path)} {a.option_strings[-1]}"
        if not (a.help or "").strip():
            missing.append(name)
            continue
        shown = parser._get_formatter()._get_help_string(a)  # the text --help prints, before %-expansion
        if a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in shown.lower():
            no_default.append(name)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help hides the default: {no_default}"


def test_sampling_and_bench_flags_are_described():
    """The flags the issue names (--top-p, --top-k, --min-p, --bits, bench's) say what they do."""
    p = build_parser()
    assert p.parse_args(["chat"]).model is None  # no model named: the demo
    helps = {(path, a.dest): a.help for path, _, a in _flags(p)}
    for dest in ("top_p", "top_k", "min_p", "repetition_penalty", "temperature"):
        assert len(helps[(("chat",), dest)]) > 20
    assert "weight bits" in helps[(("quantize",), "bits")]
    for dest in ("prompt_len", "gen_len", "batch", "repeats", "group_size", "dtype", "quantization"):
        assert helps[(("bench",), dest)], dest


def test_export_help_says_what_gguf_is():
    out = subprocess.run([sys.executable, "-m", "lfm.cli", "export", "--help"], capture_output=True, text=True).stdout
    assert "llama.cpp" in out and "gguf" in out and "lfm export gguf" in out  # what it does, with examples


PROBE = """
import sys
from lfm.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print("TORCH_LOADED" if "torch" in sys.modules else "NO_TORCH", code, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["chat", "--help"], ["serve", "--help"], ["train", "--help"],
                                  ["export", "gguf", "--help"], ["kernels", "build", "--help"],
                                  ["chat", "--top-p"], ["bench"], ["quantize", "demo", "--bits", "3", "-o", "x"],
                                  ["nonsense"]])
def test_help_and_argument_errors_do_not_load_torch(argv):
    p = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("NO_TORCH"), p.stderr
    assert last.split()[1] == ("0" if "--help" in argv else "2")
