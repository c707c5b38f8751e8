"""`lfm batch`: structured extraction / classification over files of rows, on one machine or a Ray cluster.

Layers: `lfm.batch` sits on `lfm.engine` (never the other way). `io` reads rows (ids, fields or an error),
`sink` writes results atomically per chunk and tells which ids are done (resume), `prompt` renders a row into a
prompt, `runner` keeps the engine full and turns finished requests into result rows, `cli` is the argparse wiring
(imports nothing heavy). Imports here are lazy so that `lfm --help` stays fast.
"""

from __future__ import annotations

__all__ = ["BatchJob", "run_batch", "read_rows", "open_sink"]


def __getattr__(name: str):
    if name in ("BatchJob", "run_batch", "process_rows"):
        from . import runner

        return getattr(runner, name)
    if name == "read_rows":
        from .io import read_rows

        return read_rows
    if name == "open_sink":
        from .sink import open_sink

        return open_sink
    raise AttributeError(name)
