"""`lfm export gguf MODEL -o OUT --type T`: registered on the main parser by `add_export_parser`."""

from __future__ import annotations

import argparse
import sys

# the writer's TYPES, listed here so registering the command imports nothing heavy (a test keeps them equal)
TYPE_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def cmd_export_gguf(a: argparse.Namespace) -> None:
    """Errors surface as GGUFError (a ValueError), which `lfm`'s main prints as one line."""
    from .writer import export_gguf

    out = export_gguf(a.model, a.output, type=a.type, tokenizer=a.tokenizer, progress=not a.quiet)
    print(f"wrote {out} ({a.type}, {out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `export` (with its one format, `gguf`) on the `lfm` subcommand parser."""
    p = subparsers.add_parser(
        "export", help="convert a checkpoint to another format (gguf, for llama.cpp)",
        description="Convert a checkpoint to another format. One format so far: gguf, a single file with the "
        "weights (f32 / f16 / bf16, or llama.cpp's q8_0 / q4_0 / q4_1 / q5_0 / q5_1 blocks), the tokenizer and the "
        "chat template, which llama.cpp (llama-cli, llama-server), Ollama and lfm itself run.",
        epilog="examples:\n  lfm export gguf demo -o demo-f16.gguf\n"
               "  lfm export gguf LiquidAI/LFM2.5-350M -o lfm-350m-q8.gguf --type q8_0\n"
               "  lfm chat lfm-350m-q8.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT",
                           help="gguf: a GGUF file for llama.cpp / Ollama (lfm export gguf --help)")
    s = fmt.add_parser("gguf", help="write a GGUF file that llama.cpp (and lfm) can run",
                       description="Export an lfm2 / lfm2_moe checkpoint (directory or Hub id) to GGUF.")
    s.add_argument("model", help="checkpoint directory, Hugging Face Hub id or demo")
    s.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    s.add_argument("--type", default="f16", type=str.lower, choices=TYPE_CHOICES,
                   help="tensor type: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1; norms, the conv kernel "
                        "and the router stay f32")
    s.add_argument("--tokenizer", help="tokenizer directory, when the checkpoint has no tokenizer.json")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_export_gguf)
    return s
