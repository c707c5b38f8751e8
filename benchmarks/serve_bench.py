"""Serving benchmark: the same streaming requests sent one at a time, then by N concurrent clients, over loopback;
and a multi-turn chat workload with a shared system prompt, with prefix caching on and off.

    python benchmarks/serve_bench.py                              # LFM2.5-350M shape, random weights, 16 clients
    python benchmarks/serve_bench.py --concurrency 16,64 --dtype bfloat16
    python benchmarks/serve_bench.py --multi-turn                 # turn-2 TTFT with / without prefix caching
    python benchmarks/serve_bench.py --model ./rand-350m          # a checkpoint directory (e.g. from `lfm init`)

The server runs in a child process (so client threads never share its GIL) on 127.0.0.1; every request is a
streamed `/v1/completions` call with a fixed-length token-id prompt, greedy, `ignore_eos` and a fixed `max_tokens`, so
both phases do exactly the same work. `logprobs=0` makes every generated token arrive as its own chunk even when the
test tokenizer cannot spell it (random weights pick ids beyond its 512 tokens), which is what TTFT and ITL need.
Reports requests/s, output tokens/s, TTFT and inter-token latency p50/p99 and errors per phase, and the speedup of
output tokens/s over the one-at-a-time phase (each concurrent phase sends max(--requests, clients) requests of the
same size, so the rates compare). The phases run in --repeats rounds (default 3) and each row is its mode's median
round: this box is shared, and one slow spell in a 3-second phase otherwise decides the ratio. Bounded: a fixed number
of requests per phase and a wall-clock limit per phase. The load generator is light by default (--client http, see
make_client): on 2 cores it shares the CPU with the server it measures.

--multi-turn: C conversations at once (--conversations), each a --system-tokens system prompt shared by all, then a
user turn; turn 2 re-sends turn 1 (prompt + a fixed stand-in for the reply, as a client re-sends the history) and a
new user turn. Run twice, on a server with prefix caching and one without: TTFT p50 / p99 of each turn, and the
server's prefix-cache hit rate (from /metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ server side
def serve(a: argparse.Namespace) -> None:
    """Child process: build or load the model, then serve until killed."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    import torch
    import uvicorn

    from lfm import LLM
    from lfm.model.checkpoint import empty_model, resolve_dtype
    from lfm.model.presets import preset
    from lfm.serve import ServeConfig, ServerState, create_app
    from lfm.text import Tokenizer, build_tiny_tokenizer

    torch.set_num_threads(a.threads)
    engine = dict(max_num_seqs=max(max(a.concurrency), a.conversations, 1), kv_cache_memory=2 << 30,
                  max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=not a.no_prefix_caching)
    if a.model:
        llm = LLM(a.model, dtype=a.dtype, quantization=a.quantization, **engine)
    else:
        cfg = preset(a.preset)
        model = empty_model(cfg, resolve_dtype(a.dtype, cfg))
        model.init_weights(0.02, generator=torch.Generator().manual_seed(0))
        tok = Tokenizer.from_dir(build_tiny_tokenizer(tempfile.mkdtemp(prefix="lfm-bench-tok-")))
        llm = LLM(model.eval(), tokenizer=tok, quantization=a.quantization, **engine)
    state = ServerState(ServeConfig(model=a.model or a.preset, served_model_name="bench"), llm=llm)
    uvicorn.run(create_app(state), host="127.0.0.1", port=a.port, log_level="warning")


# ------------------------------------------------------------------------------------------------ client side
@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)


def make_client(url: str, timeout: float, kind: str = "http"):
    """One client for a whole phase, shared by its threads, made before the clock starts.

    "http" (default): the standard library's http.client and json, a few tens of microseconds of CPU per streamed
    chunk, as vLLM's own serving benchmark keeps its load generator light (it parses the SSE lines itself). On this
    2-core box every millisecond the load generator spends is taken from the server it measures. "openai": the
    official SDK (what users run; ~0.5 ms of CPU per chunk here, and ~30 ms to build a client, which is why one is
    shared). Both send the same requests and read the same stream."""
    if kind == "openai":
        from openai import OpenAI

        return OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=timeout)
    return HttpClient(url, timeout)


class HttpClient:
    """Streamed `/v1/completions` over http.client: yields each SSE chunk's JSON (dicts, as the wire has them)."""

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout

    def stream(self, body: dict):
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json", "Authorization": "Bearer bench"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            while line := resp.readline():
                if line.startswith(b"data: "):
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        return
                    yield json.loads(data)
        finally:
            conn.close()

    def close(self) -> None:
        pass


def one_request(client, prompt: list[int], max_tokens: int, deadline: float) -> Result:
    r = Result()
    t0 = time.perf_counter()
    last = None
    body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0, stream=True,
                stream_options={"include_usage": True})
    try:
        if isinstance(client, HttpClient):
            stream = client.stream({**body, "ignore_eos": True})
            chunks = (((c.get("usage") or {}).get("completion_tokens"),
                       [len((ch.get("logprobs") or {}).get("tokens") or []) for ch in c.get("choices", [])])
                      for c in stream)
        else:
            stream = client.completions.create(**body, extra_body={"ignore_eos": True})
            chunks = ((c.usage.completion_tokens if c.usage is not None else None,
                       [len(ch.logprobs.tokens) if ch.logprobs and ch.logprobs.tokens else 0 for ch in c.choices])
                      for c in stream)
        for usage, counts in chunks:
            now = time.perf_counter()
            if usage is not None:
                r.tokens = usage
            for n in counts:
                if n:
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.gaps += [(now - last) / n] * n
                    last = now
            if time.time() > deadline:
                stream.close()
                r.error = "phase time limit"
                return r
        r.ok = r.tokens == max_tokens
        if not r.ok:
            r.error = f"{r.tokens} tokens instead of {max_tokens}"
    except Exception as e:  # count it, keep going
        r.error = f"{type(e).__name__}: {e}"
    return r


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_phase(url: str, prompts: list[list[int]], max_tokens: int, clients: int, limit: float,
              kind: str = "http") -> dict:
    client = make_client(url, limit, kind)
    with ThreadPoolExecutor(clients) as pool:
        ready = threading.Barrier(clients)  # every thread started before the clock, too
        list(pool.map(lambda _: ready.wait(), range(clients)))
        deadline = time.time() + limit
        t0 = time.perf_counter()
        results = list(pool.map(lambda p: one_request(client, p, max_tokens, deadline), prompts))
        wall = time.perf_counter() - t0
    client.close()
    ok = [r for r in results if r.ok]
    gaps = [g for r in results for g in r.gaps]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    return {"clients": clients, "requests": len(prompts), "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "out_tok_per_s": sum(r.tokens for r in results) / wall,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "first_error": next((r.error for r in results if r.error), None)}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not become ready in time")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def start_server(a: argparse.Namespace, prefix_caching: bool = True) -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--_serve", "--port", str(port), "--preset", a.preset, "--dtype", a.dtype,
           "--threads", str(a.threads), "--concurrency", ",".join(map(str, a.concurrency)),
           "--conversations", str(a.conversations), "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    cmd += (["--model", a.model] if a.model else []) + (["--quantization", a.quantization] if a.quantization else [])
    cmd += [] if prefix_caching else ["--no-prefix-caching"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=600)
    except BaseException:
        proc.terminate()
        raise
    return url, proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def throughput(a: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    url, proc = start_server(a, prefix_caching=not a.no_prefix_caching)
    try:
        rng = random.Random(0)
        n = max([a.requests, *a.concurrency])
        prompts = [[1] + [rng.randrange(14, 512) for _ in range(a.prompt_tokens - 1)] for _ in range(n)]
        # warm-up, untimed: one short request, then a burst of 2-token requests at each concurrency (the first
        # batch of a new size sizes the engine's buffers and faults their pages in)
        one_request(make_client(url, 300, a.client), prompts[0][:4], 2, time.time() + 300)
        for c in a.concurrency:
            run_phase(url, [q[:4] for q in prompts[:c]], 2, c, 300, a.client)
        # --repeats rounds, each running every phase once (so a slow spell of the shared box hits all modes of a
        # round alike); each mode's row is its median round by output tokens/s
        modes = [("one at a time", 1, a.requests)] + [(f"{c} concurrent", c, max(a.requests, c)) for c in a.concurrency]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in modes}
        for _ in range(a.repeats):
            for name, c, n in modes:
                runs[name].append(run_phase(url, prompts[:n], a.max_tokens, c, a.phase_limit, a.client))
        rows = [(name, sorted(rs, key=lambda r: r["out_tok_per_s"])[len(rs) // 2]) for name, rs in runs.items()]
    finally:
        stop_server(proc)
    src = a.model or f"{a.preset} (random weights)"
    print(f"\n{src}, {a.dtype}{' ' + a.quantization if a.quantization else ''}, {a.threads} torch thread(s), "
          f"max_num_batched_tokens {a.max_num_batched_tokens}; {a.prompt_tokens} prompt tokens -> {a.max_tokens} "
          f"output tokens per request, streamed over loopback ({a.client} client); load average before: "
          f"{load:.2f}, after: {os.getloadavg()[0]:.2f}\n")
    print("| mode | clients | requests | req/s | output tok/s | vs one at a time | TTFT p50 / p99 (s) | "
          "ITL p50 / p99 (ms) | errors | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = max(rows[0][1]["out_tok_per_s"], 1e-9)
    for name, r in rows:
        print(f"| {name} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['out_tok_per_s'] / base:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | {r['errors']} | {r['wall_s']:.1f} |")
    if a.repeats > 1:
        print(f"\nmedian of {a.repeats} rounds; output tok/s of each round:")
        for name, rs in runs.items():
            print(f"- {name}: " + ", ".join(f"{r['out_tok_per_s']:.1f}" for r in rs))
        for name, rs in list(runs.items())[1:]:
            ratios = [r["out_tok_per_s"] / max(b["out_tok_per_s"], 1e-9) for r, b in zip(rs, runs["one at a time"])]
            print(f"- {name} / one at a time, round by round: " + ", ".join(f"{x:.2f}x" for x in ratios))
    for name, r in rows:
        if r["first_error"]:
            print(f"{name}: first error: {r['first_error']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": dict(rows), "speedups": {
            name: r["out_tok_per_s"] / base for name, r in rows[1:]}, "rounds": runs}, indent=2))


def multi_turn(a: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    rng = random.Random(1)
    system = [1] + [rng.randrange(14, 512) for _ in range(a.system_tokens - 1)]
    user1 = [[rng.randrange(14, 512) for _ in range(24)] for _ in range(a.conversations)]
    reply = [[rng.randrange(14, 512) for _ in range(a.max_tokens)] for _ in range(a.conversations)]
    user2 = [[rng.randrange(14, 512) for _ in range(24)] for _ in range(a.conversations)]
    turn1 = [system + u for u in user1]
    turn2 = [t + r + u for t, r, u in zip(turn1, reply, user2)]
    out = {}
    for caching in (True, False):
        url, proc = start_server(a, prefix_caching=caching)
        try:
            # warm-up (shares nothing with the prompts)
            one_request(make_client(url, 300, a.client), [1, 20, 21, 22], 2, time.time() + 300)
            r1 = run_phase(url, turn1, a.max_tokens, a.conversations, a.phase_limit, a.client)
            r2 = run_phase(url, turn2, a.max_tokens, a.conversations, a.phase_limit, a.client)
            out[caching] = (r1, r2, metric(url, "lfm_prefix_cache_hit_rate"))
        finally:
            stop_server(proc)
    src = a.model or f"{a.preset} (random weights)"
    print(f"\n{src}, {a.dtype}{' ' + a.quantization if a.quantization else ''}, {a.threads} torch thread(s); "
          f"{a.conversations} conversations at once, {a.system_tokens}-token shared system prompt, turn 1 = "
          f"{len(turn1[0])} tokens, turn 2 = {len(turn2[0])} tokens, {a.max_tokens} output tokens per turn; load "
          f"average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}\n")
    print("| prefix caching | turn 1 TTFT p50 / p99 (s) | turn 2 TTFT p50 / p99 (s) | turn 2 output tok/s | "
          "hit rate | errors |")
    print("|---|---|---|---|---|---|")
    for caching, (r1, r2, hit) in out.items():
        print(f"| {'on' if caching else 'off'} | {r1['ttft_p50']:.2f} / {r1['ttft_p99']:.2f} | "
              f"{r2['ttft_p50']:.2f} / {r2['ttft_p99']:.2f} | {r2['out_tok_per_s']:.1f} | "
              f"{hit * 100:.0f}% | {r1['errors'] + r2['errors']} |")
    gain = out[False][1]["ttft_p50"] / max(out[True][1]["ttft_p50"], 1e-9)
    print(f"\nturn-2 TTFT p50, without / with prefix caching: {gain:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"caching_on": out[True], "caching_off": out[False],
                                            "turn2_ttft_gain": gain}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: random weights of --preset, built in-process)")
    p.add_argument("--preset", default="LFM2.5-350M")
    p.add_argument("--dtype", default="float32", help="float32 (default: fastest batched matmuls on most CPUs) or "
                                                      "bfloat16")
    p.add_argument("--quantization", choices=["int8", "int4"], help="weight-only quantization on load")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    p.add_argument("--requests", type=int, default=16, help="requests in the one-at-a-time phase (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the throughput phases; each row is its mode's "
                                                          "median round (default 3)")
    p.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[16],
                   help="clients in each concurrent phase, comma-separated (default 16; e.g. 16,64)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length (default 8: a short chat turn)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="the server's tokens per step (512)")
    p.add_argument("--no-prefix-caching", action="store_true", help="throughput phases without prefix caching")
    p.add_argument("--multi-turn", action="store_true", help="run the multi-turn prefix-caching workload instead")
    p.add_argument("--conversations", type=int, default=8, help="multi-turn: conversations at once (default 8)")
    p.add_argument("--system-tokens", type=int, default=1000, help="multi-turn: shared system prompt (default 1000)")
    p.add_argument("--phase-limit", type=float, default=900, help="seconds allowed per phase (default 900)")
    p.add_argument("--client", choices=["http", "openai"], default="http",
                   help="load generator: http (stdlib, light; default) or openai (the official SDK)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a._serve:
        return serve(a)
    if a.multi_turn:
        return multi_turn(a)
    return throughput(a)


if __name__ == "__main__":
    main()
