"""Abuse benchmark: 64 concurrent streams, with and without an attacker sending hostile requests beside them.

    python benchmarks/abuse_bench.py                       # the built-in demo model, 64 streams, 3 repeats
    python benchmarks/abuse_bench.py --model ./tiny --streams 64 --max-tokens 64 --repeats 5

The server runs in a child process (`lfm serve`, 127.0.0.1). Each phase starts 64 streamed chat completions at once
(greedy, `ignore_eos`, a fixed `max_tokens`, so every phase does the same work) and measures each stream's total
latency. In the "attack" phase another client meanwhile loops over: a ~1 MB response_format schema, a schema with
2,000 optional properties, a 4 MB prompt, and a request whose sampling would produce NaN (`temperature` 1e-42), one
after the other with --attack-pause seconds between them; each must get its 4xx. A third client polls `/health`
every 50 ms throughout. Phases alternate (baseline, attack, ...) --repeats times; the table shows medians over
repeats. Pass: 0 stream errors, every attack a 4xx, attack p99 <= 2x baseline p99, every /health answer within 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body: dict | bytes, timeout: float = 300) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stream(url: str, model: str, i: int, max_tokens: int) -> tuple[float, bool]:
    """One streamed chat completion: (seconds, ok)."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about module number {i}."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.monotonic()
    try:
        status, raw = post(url + "/v1/chat/completions", body)
    except OSError:
        return time.monotonic() - t0, False
    text = raw.decode(errors="replace")
    ok = status == 200 and '"error"' not in text and text.rstrip().endswith("data: [DONE]")
    return time.monotonic() - t0, ok


def attacker(url: str, model: str, stop: threading.Event, log: list[tuple[str, int]], pause: float) -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    huge = {"type": "object", "description": "d" * 1_000_000}
    msgs = [{"role": "user", "content": "hi"}]
    attacks = [
        ("1MB schema", "/v1/chat/completions", {"model": model, "messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": huge}}}),
        ("2000-property schema", "/v1/chat/completions", {"model": model, "messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": wide}}}),
        ("4MB prompt", "/v1/completions", {"model": model, "prompt": "lorem ipsum " * 333_333, "max_tokens": 4}),
        ("NaN sampling", "/v1/chat/completions", {"model": model, "messages": msgs, "temperature": 1e-42}),
    ]
    # encoded once: the attacker's own JSON encoding (75 ms for 4 MB) would otherwise load this process's GIL,
    # which the 64 measuring clients share; a real attacker runs elsewhere
    attacks = [(name, path, json.dumps(body).encode()) for name, path, body in attacks]
    while not stop.is_set():
        for name, path, body in attacks:
            if stop.is_set():
                return
            try:
                log.append((name, post(url + path, body)[0]))
            except OSError:
                log.append((name, 0))
            stop.wait(pause)


def pinger(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url + "/health", timeout=30) as r:
                r.read()
            out.append(time.monotonic() - t0)
        except OSError:
            out.append(float("inf"))
        time.sleep(0.05)


def phase(url: str, model: str, streams: int, max_tokens: int, attack: bool, pause: float = 0.0) -> dict:
    stop = threading.Event()
    pings: list[float] = []
    attacks: list[tuple[str, int]] = []
    helpers = [threading.Thread(target=pinger, args=(url, stop, pings))]
    if attack:
        helpers.append(threading.Thread(target=attacker, args=(url, model, stop, attacks, pause)))
    for t in helpers:
        t.start()
    time.sleep(0.3)
    results: list[tuple[float, bool]] = [(0.0, False)] * streams

    def run(i: int) -> None:
        results[i] = stream(url, model, i, max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in helpers:
        t.join()
    lat = sorted(s for s, _ in results)
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "errors": sum(not ok for _, ok in results), "health_max": max(pings) if pings else float("nan"),
            "attacks": len(attacks), "attack_4xx": sum(400 <= s < 500 for _, s in attacks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--attack-pause", type=float, default=0.1,
                   help="seconds the attacker waits between its requests (0: a flood; every 4 MB body costs the "
                        "server ~50 ms of JSON parsing under the GIL, which no per-request limit removes)")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = "bench"
    cmd = [sys.executable, "-c", "import sys; from lfm.cli import main; sys.exit(main())", "serve",
           *([a.model] if a.model else []), "--port", str(port), "--served-model-name", model,
           "--threads", str(a.threads), "--max-num-seqs", str(a.streams), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        phase(url, model, 4, 4, attack=False)  # warm-up
        runs: dict[str, list[dict]] = {"baseline": [], "attack": []}
        for r in range(a.repeats):
            for name in runs:
                runs[name].append(phase(url, model, a.streams, a.max_tokens, name == "attack", a.attack_pause))
                print(f"repeat {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"\n{a.streams} streams x {a.max_tokens} tokens, medians of {a.repeats} repeats, attack pause "
          f"{a.attack_pause:g} s "
          f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)")
    print(f"{'phase':<10} {'p50 s':>8} {'p99 s':>8} {'errors':>7} {'/health max s':>14} {'attacks (4xx)':>14}")
    for name, m in med.items():
        print(f"{name:<10} {m['p50']:>8.2f} {m['p99']:>8.2f} {m['errors']:>7.0f} {m['health_max']:>14.3f} "
              f"{m['attacks']:>7.0f} ({m['attack_4xx']:.0f})")
    ratio = med["attack"]["p99"] / med["baseline"]["p99"]
    worst_health = max(x["health_max"] for rs in runs.values() for x in rs)
    errors = sum(x["errors"] for rs in runs.values() for x in rs)
    all_4xx = all(x["attacks"] == x["attack_4xx"] for x in runs["attack"])
    print(f"p99 attack / baseline = {ratio:.2f} (limit 2.0); worst /health {worst_health:.3f} s (limit 1.0); "
          f"stream errors {errors}; every attack answered 4xx: {all_4xx}")
    print("PASS" if ratio <= 2.0 and worst_health <= 1.0 and errors == 0 and all_4xx else "FAIL")


if __name__ == "__main__":
    main()
