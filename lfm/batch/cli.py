"""`lfm batch`: argparse wiring only (imports nothing heavy at module import: `lfm --help` stays fast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..console import positive_int

EXAMPLES = """examples:
  lfm batch reviews.jsonl -o out.jsonl --schema review.schema.json --prompt "Extract the product and sentiment from: {text}"
  lfm batch 'data/*.parquet' -o results/ --schema s.json --prompt-file p.txt --model LiquidAI/LFM2.5-350M --quantization int8
  lfm batch reviews.jsonl -o labels.jsonl --classify positive,negative,neutral --prompt "Sentiment of: {text}"
  lfm batch data/ -o results/ --schema s.json --prompt "..." --ray --ray-address auto --replicas 16 --gpus-per-replica 1
A killed job restarted with the same command does only the rows not yet in the output."""


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("batch", help="structured extraction / classification over files of rows (resumable; Ray)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("inputs", nargs="+", help=".jsonl .json .csv .tsv .parquet .txt files, globs, directories, "
                   "hf:NAME[:SPLIT] (a Hugging Face dataset), or with --ray and --id-field URIs (s3://, gs://, "
                   "file://...: .jsonl .csv .tsv .parquet .txt) read by Ray Data on the cluster")
    s.add_argument("-o", "--output", required=True, help="out.jsonl (one file, appended per chunk) or a directory "
                   "(atomic part files; also any path ending in .parquet)")
    s.add_argument("--output-format", choices=["jsonl", "parquet"], help="part-file format of a directory output "
                   "(default parquet)")
    s.add_argument("--model", help="checkpoint directory, .gguf file or Hub id (default: the built-in demo model)")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--schema", help="a JSON schema file: every output row parses and validates against it")
    what.add_argument("--classify", help="comma-separated labels: one per row, with each label's log-probability")
    s.add_argument("--prompt", help="template over the row's fields, e.g. 'Summarize: {text}' ({schema} and {labels} "
                   "name the job's); default: the row's 'messages' or 'prompt'")
    s.add_argument("--prompt-file", help="read the template from this file")
    s.add_argument("--system", help="a system message for every row (chat)")
    s.add_argument("--no-chat", dest="chat", action="store_false",
                   help="send the rendered prompt as raw text, not as a user turn through the chat template")
    s.add_argument("--id-field", help="the row field that identifies it (default: its position in the input)")
    s.add_argument("--max-tokens", type=positive_int, default=256, help="most tokens per row (default 256)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    s.add_argument("--seed", type=int, help="with temperature > 0: each row seeded from (seed, id)")
    s.add_argument("--chunk-size", type=positive_int, default=100, help="rows per atomic write (100)")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's; default)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--quantization", choices=["int8", "int4"], help="weight-only quantization on load (CPU)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="KV cache storage: auto (the model's dtype, default) or int8")
    s.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences decoded together (64)")
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="tokens per engine step (2048)")
    s.add_argument("--threads", type=positive_int, help="torch CPU threads")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    r = s.add_argument_group("Ray (pip install 'lfm[ray]')")
    r.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline: one lfm.LLM per replica")
    r.add_argument("--ray-address", help="cluster to join ('auto': the one `ray start` runs here; default: a new "
                   "local one)")
    r.add_argument("--replicas", type=positive_int, default=1, help="LLM replicas (Ray actors)")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    s.set_defaults(fn=cmd_batch)
    return s


def job_from_args(a: argparse.Namespace):
    from .prompt import PromptTemplate
    from .runner import BatchJob

    schema = labels = None
    if a.schema:
        try:
            schema = json.loads(Path(a.schema).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read the schema {a.schema}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"{a.schema} is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{a.schema} must hold a JSON schema object")
    if a.classify is not None:
        labels = [x.strip() for x in a.classify.split(",")]
    if a.prompt and a.prompt_file:
        raise ValueError("give --prompt or --prompt-file, not both")
    template = a.prompt
    if a.prompt_file:
        try:
            template = Path(a.prompt_file).read_text(encoding="utf-8").rstrip("\n")
        except OSError as e:
            raise ValueError(f"cannot read {a.prompt_file}: {e.strerror}") from None
    prompt = PromptTemplate(template, chat=a.chat, system=a.system, schema=schema, labels=labels)
    return BatchJob(prompt=prompt, schema=schema, classify=labels, max_tokens=a.max_tokens,
                    temperature=a.temperature, seed=a.seed, chunk_size=a.chunk_size)


def llm_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, dtype=a.dtype, device=a.device, quantization=a.quantization,
                kv_cache_dtype=a.kv_cache_dtype, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens)


def cmd_batch(a: argparse.Namespace) -> None:
    from .io import read_rows
    from .sink import open_sink

    from .io import InputError, is_remote

    job = job_from_args(a)
    if any(is_remote(src) for src in a.inputs):  # s3:// and friends: Ray Data's readers, on the cluster
        if not a.ray or not a.id_field:
            raise InputError("URIs (s3://, gs://, file://, ...) are read by Ray Data's readers: run with --ray and "
                             "--id-field (the ids that resuming skips)")
        if not all(is_remote(src) for src in a.inputs):
            raise InputError("give either URIs or local paths, not both")
        from ..ray import run_ray_sources

        sink = open_sink(a.output, a.output_format)
        stats = run_ray_sources(a.inputs, a.id_field, job, sink, llm_kwargs(a), address=a.ray_address,
                                replicas=a.replicas, gpus_per_replica=a.gpus_per_replica,
                                cpus_per_replica=a.cpus_per_replica, threads=a.threads, progress=a.progress)
        print(f"{stats.total} rows: {stats.skipped} already done, {stats.written} written ({stats.errors} with an "
              f"error) in {stats.seconds:.1f} s -> {a.output}", file=sys.stderr)
        return
    rows = read_rows(a.inputs, a.id_field)
    sink = open_sink(a.output, a.output_format)
    if a.ray:
        from ..ray import run_ray

        stats = run_ray(rows, job, sink, llm_kwargs(a), address=a.ray_address, replicas=a.replicas,
                        gpus_per_replica=a.gpus_per_replica, cpus_per_replica=a.cpus_per_replica,
                        threads=a.threads, progress=a.progress)
    else:
        import torch

        from ..engine.llm import LLM
        from .runner import run_batch

        if a.threads:
            torch.set_num_threads(a.threads)
        print(f"loading {a.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
        llm = LLM(**llm_kwargs(a))
        stats = run_batch(llm, rows, job, sink, progress=a.progress)
    print(f"{stats.total} rows: {stats.skipped} already done, {stats.written} written ({stats.errors} with an error) "
          f"in {stats.seconds:.1f} s -> {a.output}", file=sys.stderr)
