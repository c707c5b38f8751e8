"""OpenAI-compatible HTTP serving over the continuous-batching engine (`lfm serve`).

Imports are lazy so that `lfm --help` and the other subcommands never load FastAPI, uvicorn or xgrammar.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {"ServeConfig": ".state", "ServerState": ".state", "create_app": ".app", "ServerThread": ".thread",
            "add_serve_parser": ".cli"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
