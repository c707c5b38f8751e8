"""`lfm serve MODEL`: the OpenAI-compatible HTTP server (argparse wiring; `lfm.cli` calls `add_serve_parser`)."""

from __future__ import annotations

import argparse
import re
import sys

from ..console import positive_int

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'4GiB', '512M', '1e9' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, responses, tools, JSON output)")
    s.add_argument("model", nargs="?", help="checkpoint directory or Hugging Face Hub id (default: the built-in demo "
                   "model, offline)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--quantization", choices=["int8", "int4"], help="weight-only quantization on load (CPU)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="KV cache storage: auto (the model's dtype) or int8 (about twice the sequences per GiB)")
    s.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--max-num-seqs", type=positive_int,
                   help="most sequences decoded together (64 on CPU; on a GPU vLLM's: 256, or 1024 with >= 70 GiB "
                        "but not an A100)")
    s.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    s.add_argument("--kv-cache-memory", type=parse_size,
                   help="memory for the paged KV cache, e.g. 4GiB (default on CPU, where pages are touched only as "
                        "blocks are used; on a GPU: what --gpu-memory-utilization leaves); requests beyond it wait, "
                        "the newest running one yields if it runs out")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="with --device cuda and no --kv-cache-memory: the share of the GPU's memory the server may "
                        "hold, weights and a measured step included; the rest of it becomes KV cache (0.9)")
    s.add_argument("--max-waiting", type=positive_int, default=256,
                   help="requests allowed to wait for a slot; more get HTTP 429 (default 256)")
    s.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="tokens per engine step: prompt chunks of several requests and every running decode share "
                        "one forward (512 on CPU; on a GPU vLLM's: 2048, or 8192 with >= 70 GiB but not an A100; "
                        "larger: faster prefill under load, slower tokens for running requests)")
    s.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV cache block (16)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV and conv state of prompt prefixes seen before (shared system prompts, earlier "
                        "turns of a chat); on by default, --no-enable-prefix-caching turns it off")
    s.add_argument("--max-body-bytes", type=parse_size, default=4 << 20,
                   help="largest request body (4MiB); larger ones get HTTP 413")
    s.add_argument("--max-schema-bytes", type=parse_size, default=64 << 10,
                   help="largest tools / response_format JSON schema compiled for constrained decoding (64KiB); "
                        "larger ones get HTTP 400")
    s.add_argument("--max-schema-nodes", type=positive_int, default=512,
                   help="most schema objects (properties, items, branches) in one request's schemas (512, about a "
                        "second of compiling on one core); more get HTTP 400")
    s.add_argument("--grammar-compile-timeout", type=float, default=60.0,
                   help="seconds a request waits for its grammar to compile before HTTP 400 (60)")
    s.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy or small machine)")
    s.add_argument("--ray", action="store_true", help="serve --replicas copies on Ray Serve behind this one endpoint "
                   "(pip install 'lfm[ray]')")
    s.add_argument("--replicas", type=positive_int, default=1, help="with --ray: replicas (the minimum with --max-replicas)")
    s.add_argument("--max-replicas", type=positive_int, help="with --ray: autoscale up to this many by queue length")
    s.add_argument("--ray-address", help="with --ray: the cluster to join (default: a new local one)")
    s.add_argument("--reasoning-parser", choices=["lfm2", "deepseek_r1"],
                   help="return the text of <think>...</think> as reasoning_content (message and stream deltas), "
                        "not content; lfm2 (LFM2.5 thinking models) and vLLM's deepseek_r1 / qwen3 names all "
                        "mean: text before </think> is reasoning")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log verbosity (uvicorn's levels)")
    s.set_defaults(fn=cmd_serve)
    return s


def cmd_serve(a: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import create_app
        from .state import ServeConfig, ServerState
    except ImportError as e:  # the server's dependencies are optional for the library
        raise ValueError(f"`lfm serve` needs fastapi, uvicorn, prometheus-client, xgrammar and jsonschema "
                         f"({e.name} is missing)") from None
    from ..engine.memory import batch_defaults

    seqs, tokens = batch_defaults(a.device, server=True)
    cfg = ServeConfig(model=a.model, served_model_name=a.served_model_name, host=a.host, port=a.port, dtype=a.dtype,
                      device=a.device, max_num_seqs=a.max_num_seqs or seqs, max_model_len=a.max_model_len,
                      kv_cache_memory=a.kv_cache_memory, gpu_memory_utilization=a.gpu_memory_utilization,
                      max_waiting=a.max_waiting,
                      max_num_batched_tokens=a.max_num_batched_tokens or tokens, block_size=a.block_size,
                      enable_prefix_caching=a.enable_prefix_caching,
                      api_key=a.api_key, max_body_bytes=a.max_body_bytes, threads=a.threads,
                      quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype,
                      max_schema_bytes=a.max_schema_bytes, max_schema_nodes=a.max_schema_nodes,
                      grammar_compile_timeout=a.grammar_compile_timeout, reasoning_parser=a.reasoning_parser)
    if a.ray:
        import dataclasses

        from ..ray import serve_ray

        print(f"serving on Ray Serve at http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
        serve_ray(dataclasses.asdict(cfg), a.replicas, a.max_replicas, a.ray_address)
        return
    print(f"loading {a.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
    state = ServerState(cfg)
    for line in startup_lines(state, a.host, a.port):
        print(line, file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)


def startup_lines(state, host: str, port: int) -> list[str]:
    """What an operator checks first: which model, its dtype, the context and KV budget actually granted (the
    engine may lower max_model_len to fit the cache), the torch threads, and where to point clients."""
    import torch

    eng = state.llm.engine
    bm = eng.block_manager
    cfg = state.cfg
    kv = cfg.kv_cache_dtype if cfg.kv_cache_dtype != "auto" else str(eng.model.dtype).removeprefix("torch.")
    return [f"model     {state.model_name} ({cfg.model or 'built-in demo model'})",
            f"dtype     {str(eng.model.dtype).removeprefix('torch.')}"
            + (f", {cfg.quantization} weights" if cfg.quantization else "") + f", KV cache {kv}",
            f"context   {state.max_model_len} tokens, up to {eng.config.max_num_seqs} sequences",
            f"KV cache  {bm.num_blocks:,} blocks of {bm.block_size} tokens = {bm.num_blocks * bm.block_size:,} tokens "
            f"(budget {eng.config.kv_cache_memory / (1 << 30):.2f} GiB), prefix caching "
            + ("on" if cfg.enable_prefix_caching else "off"),
            f"threads   {torch.get_num_threads()} (torch CPU)",
            f"reasoning {cfg.reasoning_parser or 'off (think text stays in content)'}",
            f"serving   http://{host}:{port}/v1 (OpenAI API), /tokenize, /health, /metrics"]
