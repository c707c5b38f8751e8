"""A tiny in-process `lfm serve` for API tests: one torch thread (tiny matrices, shared cores), float32, 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from openai import OpenAI

from lfm.serve import ServeConfig, ServerState, ServerThread

MODEL = "tiny"


@contextmanager
def tiny_server(checkpoint, **config) -> Iterator[ServerThread]:
    """Serve `checkpoint` as model id "tiny"; restores the process's torch thread count afterwards."""
    before = torch.get_num_threads()
    cfg = ServeConfig(model=str(checkpoint), served_model_name=MODEL, dtype="float32", threads=1,
                      **{"max_model_len": 256, **config})
    try:
        with ServerThread(ServerState(cfg)) as s:
            yield s
    finally:
        torch.set_num_threads(before)


def openai_client(server: ServerThread) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
