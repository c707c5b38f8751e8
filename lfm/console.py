"""Running a parsed command the way every `lfm` entry point does (`lfm ...`, `python -m lfm.train`): errors a user
can fix become one line on stderr and exit status 2, Ctrl-C exits 130 without a traceback."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1 (a clear usage error instead of a later crash)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def run_command(a: argparse.Namespace) -> int:
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    from .text import TokenizerError

    try:
        a.fn(a)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lfm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
