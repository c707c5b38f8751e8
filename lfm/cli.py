"""`lfm` on the command line: chat, generate, list / pull models, info, quantize, bench, init, kernels; `export`,
`serve` and `train` register themselves from their own packages.

Registering a command imports argparse and nothing else: torch, the engine and the server load inside the command
that runs, so `lfm --help` and a mistyped flag answer at once (`python benchmarks/cli_startup.py` measures it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  lfm chat                                    # the built-in demo model, offline (a 6M-parameter LFM2)
  lfm chat --tools examples/tools.json        # the model may call these tools
  lfm pull LiquidAI/LFM2.5-350M               # download a real model once (Hugging Face cache)
  lfm chat LiquidAI/LFM2.5-350M               # /help lists the chat commands
  lfm list                                    # the demo, the Hub models cached here, the preset shapes
  lfm info LiquidAI/LFM2.5-350M               # layout, parameters, memory (needs only config.json)
  lfm generate "The json module" --max-tokens 64
  lfm kernels build                           # compile the AVX2 kernels now instead of at first use

A model is a local directory (preferred when one exists by that name), `demo`, or a Hub id; none named = the demo.
"""
MODEL_HELP = "checkpoint directory, .gguf file, Hub id (LiquidAI/LFM2.5-350M) or demo (default: demo, offline)"
KV_HELP = "KV cache storage: auto (the model's dtype) or int8 (half of bf16's memory and read time at long context)"
DTYPE_HELP = "float32, bfloat16, float16, or auto: the checkpoint's own"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (unless the text already gives it), as llama.cpp's and vLLM's do.
    Descriptions and epilogs: one-line paragraphs are wrapped, paragraphs of several lines (examples) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n\n".join(para if "\n" in para else textwrap.fill(para, width, initial_indent=indent,
                                                                   subsequent_indent=indent)
                           for para in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS, [])
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommand parsers use HelpFormatter too (add_subparsers builds them as type(self))."""

    def __init__(self, *args, formatter_class: type = HelpFormatter, **kwargs) -> None:
        if formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            formatter_class = HelpFormatter
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


# ---- commands: each imports what it needs when it runs ------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> None:
    from .loading import resolve_config
    from .model.checkpoint import CheckpointError, model_path_exists
    from .model.presets import preset, preset_name

    name = a.model or "demo"
    source = "GGUF metadata" if str(name).endswith(".gguf") else "config.json"
    try:
        cfg = resolve_config(name)
    except CheckpointError as e:
        if preset_name(name) is None or model_path_exists(name):  # a directory named like a preset is that directory
            raise
        cfg, source = preset(name), "built-in preset (config.json unavailable: " + str(e).split(" (")[0] + ")"
    pc = cfg.param_counts()
    attn = cfg.attn_layers
    print(f"{name}  [{cfg.model_type}; {source}]")
    print(f"  layers        {cfg.num_hidden_layers}: {len(cfg.conv_layers)} conv + {len(attn)} attention (at {', '.join(map(str, attn)) or '-'})")
    print(f"  hidden        {cfg.hidden_size}; heads {cfg.num_attention_heads} (kv {cfg.num_key_value_heads}, head_dim {cfg.head_size})")
    ffn = f"dense {cfg.ff_dim}"
    if cfg.is_moe:
        ffn += (f" (layers 0-{cfg.num_dense_layers - 1})" if cfg.num_dense_layers else "") + \
            f"; {cfg.num_experts} experts x {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}"
    print(f"  feed-forward  {ffn}")
    print(f"  conv kernel   {cfg.conv_L_cache}; vocab {cfg.vocab_size}; context {cfg.max_position_embeddings}; "
          f"rope theta {cfg.rope_theta:g}; tied head {cfg.tie_word_embeddings}")
    print(f"  parameters    total {pc['total']:,}   active/token {pc['active']:,}   (embedding {pc['embedding']:,})")
    mem = "   ".join(f"{n} {_fmt_bytes(pc['total'] * b)}" for n, b in (("float32", 4), ("bfloat16", 2), ("int8", 1), ("int4", 0.5)))
    print(f"  weights       {mem}")
    kv = cfg.kv_bytes_per_token(2)
    print(f"  KV cache      {_fmt_bytes(kv)}/token (bf16, attention layers only); {_fmt_bytes(kv * 32768)} at 32K tokens")
    print(f"  conv state    {_fmt_bytes(cfg.conv_state_bytes(2))} per sequence (bf16), whatever the context length")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _sampling(a: argparse.Namespace, llm):
    """The checkpoint's generation_config defaults, overridden by the flags given (as vLLM's generation_config=auto)."""
    from .engine.sampling import SamplingParams

    base = llm.default_sampling_params()
    kw = {k: getattr(a, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
          if getattr(a, k) is not None}
    fields = {k: getattr(base, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    return SamplingParams(**{**fields, **kw, "max_tokens": a.max_tokens, "stop": a.stop or []})


def _load(a: argparse.Namespace):
    from .engine.llm import LLM

    print(f"loading {a.model or 'demo (the built-in model)'} ...", file=sys.stderr, flush=True)
    return LLM(a.model, dtype=a.dtype, device=a.device, quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype)


def cmd_generate(a: argparse.Namespace) -> None:
    llm = _load(a)
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    sp = _sampling(a, llm)
    sys.stdout.write(prompt)
    for delta in llm.stream(prompt, sp):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def banner(name: str, llm, sp) -> str:
    """What `lfm chat` runs, in one line (Ollama and llama.cpp both name the model, its size and its context)."""
    cfg = llm.config
    n = cfg.param_counts()["total"]
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    dtype = str(llm.model.dtype).removeprefix("torch.")
    quant = cfg.extra.get("quantization_config") if hasattr(cfg, "extra") else None
    if quant:
        dtype += f", int{quant['bits']} weights"
    samp = ("greedy" if sp.greedy else f"temperature {sp.temperature:g}") + \
        "".join(f", {k} {v:g}" for k, v, off in (("top_p", sp.top_p, 1.0), ("top_k", sp.top_k, 0),
                                                 ("min_p", sp.min_p, 0.0), ("repetition_penalty", sp.repetition_penalty, 1.0))
                if v != off)
    return (f"{name}: {cfg.model_type}, {size} parameters, {dtype}, context {llm.max_model_len:,} tokens; "
            f"sampling: {samp}\n/help for commands, /bye or Ctrl-D to leave, Ctrl-C stops a reply")


def cmd_chat(a: argparse.Namespace) -> None:
    import json

    from .chat_loop import ChatSession, enable_line_editing, sampling_for_tools

    tools = None
    if a.tools:
        try:
            tools = json.loads(Path(a.tools).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--tools {a.tools}: expected a JSON list of OpenAI tool definitions ({e})") from None
        if not isinstance(tools, list):
            raise ValueError(f"--tools {a.tools}: expected a JSON list of OpenAI tool definitions")
    llm = _load(a)
    sp = _sampling(a, llm)
    if tools:
        sp = sampling_for_tools(sp)
    print(banner(a.model or "demo", llm, sp) + (f"\ntools: {', '.join(_tool_names(tools))} (answer a call with "
          "/tool RESULT)" if tools else ""), file=sys.stderr)
    enable_line_editing(None if a.no_history else Path("~/.lfm/chat_history").expanduser())
    ChatSession(llm, sp, system=a.system, tools=tools, show_speed=not a.no_speed).run()


def _tool_names(tools: list) -> list[str]:
    return [str((t.get("function") or {}).get("name", "?")) if isinstance(t, dict) else "?" for t in tools]


def cmd_quantize(a: argparse.Namespace) -> None:
    from .loading import load_model
    from .model.checkpoint import resolve, save_model
    from .model.quant import quantize_model

    src = resolve(a.model)
    model = load_model(src, dtype=a.dtype)
    print(f"quantizing {a.model} to int{a.bits}" + (f" (group size {a.group_size})" if a.bits == 4 else ""), file=sys.stderr)
    quantize_model(model, a.bits, a.group_size, progress=True)
    save_model(model, a.output, tokenizer_dir=src)
    size = sum(p.stat().st_size for p in Path(a.output).glob("*.safetensors"))
    print(f"wrote {a.output} ({size / 2**20:.1f} MiB of weights)")


def cmd_bench(a: argparse.Namespace) -> None:
    import torch

    from .engine.bench import format_table, run_bench
    from .engine.llm import LLM, check_device
    from .model.checkpoint import empty_model, model_path_exists, resolve_dtype
    from .model.presets import preset, preset_name

    check_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if preset_name(a.model) is not None and not model_path_exists(a.model):  # a shape: random weights, in memory
        cfg = preset(a.model)
        model = empty_model(cfg, resolve_dtype(a.dtype, cfg), a.device)
        model.init_weights(0.02, generator=torch.Generator(a.device).manual_seed(0))
        if a.device == "cuda":
            model.fuse_projections()  # what LLM does to a checkpoint it loads onto a GPU
        llm = LLM(model, quantization=a.quantization, group_size=a.group_size, kv_cache_dtype=a.kv_cache_dtype,
                  enable_prefix_caching=False, enforce_eager=a.enforce_eager)  # the same prompt again and again
    else:
        llm = LLM(a.model, dtype=a.dtype, device=a.device, quantization=a.quantization, group_size=a.group_size,
                  kv_cache_dtype=a.kv_cache_dtype, enable_prefix_caching=False, enforce_eager=a.enforce_eager)
    r = run_bench(llm, a.prompt_len, a.gen_len, a.batch, a.repeats)
    label = f"{a.model} {llm.model.dtype}".replace("torch.", "") + (f" {a.quantization}" if a.quantization else "") \
        + (" int8 KV" if a.kv_cache_dtype == "int8" else "")
    print(format_table(label, r, a.batch))
    where = (f"{torch.cuda.get_device_name()}, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
             f"CUDA graphs {'off' if llm.engine.runner.graphs is None else 'on'}" if a.device == "cuda"
             else f"threads {torch.get_num_threads()}")
    print(f"{where}, prompt {a.prompt_len} tokens, {a.gen_len} generated, torch {torch.__version__}")


def cmd_init(a: argparse.Namespace) -> None:
    import torch

    from .model.checkpoint import empty_model, resolve_dtype, save_model
    from .model.presets import preset
    from .text.tiny_tokenizer import build_tiny_tokenizer

    cfg = preset(a.preset)
    model = empty_model(cfg, resolve_dtype(a.dtype, cfg))
    model.init_weights(a.std, generator=torch.Generator().manual_seed(a.seed))
    out = Path(a.output)
    tok = build_tiny_tokenizer(out)
    save_model(model, out, tokenizer_dir=tok)
    print(f"wrote a random-weight {a.preset} checkpoint ({cfg.param_counts()['total']:,} parameters) to {out}")


def cmd_list(a: argparse.Namespace) -> None:
    from .hub import list_text

    print(list_text())


def cmd_pull(a: argparse.Namespace) -> None:
    from .hub import dir_size, fmt_size, pull

    path = pull(a.model, revision=a.revision)
    print(f"{a.model}: {fmt_size(dir_size(path))} in {path}\nrun it: lfm chat {a.model}")


def cmd_kernels_build(a: argparse.Namespace) -> None:
    """Build (or find) the AVX2 extension; a machine that cannot use it is told why in one line (exit status 2)."""
    import time

    from .kernels import build

    if build.disabled_by_env():
        raise ValueError("the kernels are disabled by LFM_KERNELS=0 in this environment; unset it to build them")
    ok, why = build.cpu_supported()
    if not ok:
        raise ValueError(f"the AVX2 kernels do not run here ({why}); lfm uses PyTorch's kernels instead")
    so = build.built_library()
    cached, t0 = so.exists(), time.monotonic()
    try:
        build.compile_and_load(verbose=a.verbose)
    except Exception as e:  # noqa: BLE001 - no compiler, a compile error: one line; lfm still runs without them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"could not build the AVX2 kernels ({first}); lfm uses PyTorch's kernels instead") from None
    print(f"AVX2 kernels ready: {so}" + (" (already built)" if cached else f" (built in {time.monotonic() - t0:.0f} s)"))


# ---- the parser ---------------------------------------------------------------------------------------------
def _model_args(s: argparse.ArgumentParser) -> None:
    """Loading and sampling flags shared by generate and chat."""
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    g = s.add_argument_group("sampling (unset: the checkpoint's generation_config.json, else vLLM's defaults)")
    g.add_argument("--temperature", type=float, help="randomness; 0 = greedy (default: the checkpoint's, else 1)")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probabilities reach P "
                   "(default: the checkpoint's, else 1 = off)")
    g.add_argument("--top-k", type=int, help="sample from the K most likely tokens (default: the checkpoint's, "
                   "else 0 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than P times the most likely one "
                   "(default: the checkpoint's, else 0 = off)")
    g.add_argument("--repetition-penalty", type=float, help="above 1 discourages tokens already in the prompt or "
                   "the reply, as transformers (default: the checkpoint's, else 1 = off)")
    g.add_argument("--seed", type=int, help="same seed, same output (default: random)")
    g.add_argument("--stop", action="append", help="end the reply before this text (repeatable; default: none)")
    s.add_argument("--quantization", choices=["int8", "int4"],
                   help="quantize the weights on load, weight-only, CPU (default: none)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help=KV_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lfm", description="Run Liquid AI's LFM2 / LFM2.5 models.", epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"lfm {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("chat", help="interactive multi-turn chat (/help inside lists the commands)")
    _model_args(s)
    s.add_argument("--system", help="system prompt (default: none; /system changes it)")
    s.add_argument("--tools", metavar="FILE", help="JSON list of OpenAI-style tool definitions the model may call "
                   "(default: none)")
    s.add_argument("--no-speed", action="store_true", help="no tokens/s line under each reply (/stats still works)")
    s.add_argument("--no-history", action="store_true", help="do not read or write ~/.lfm/chat_history (the "
                   "arrow-key history of past sessions)")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("generate", help="complete a prompt, streaming the text")
    _model_args(s)
    s.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("list", help="the models you can name: demo, Hub models cached here (with sizes), presets")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("pull", help="download a Hub model into the Hugging Face cache, with progress bars",
                       description="Download a checkpoint (config, tokenizer, safetensors) from the Hugging Face Hub "
                       "into its cache (HF_HUB_CACHE), where lfm chat / serve / info and transformers find it.")
    s.add_argument("model", metavar="HUB_ID", help="e.g. LiquidAI/LFM2.5-350M")
    s.add_argument("--revision", help="branch, tag or commit (default: main)")
    s.set_defaults(fn=cmd_pull)

    s = sub.add_parser("info", help="describe a model from its config.json (no weights needed)")
    s.add_argument("model", nargs="?", help="checkpoint directory, config.json, .gguf, Hub id, preset name "
                   "(LFM2.5-350M) or demo (default: demo)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("quantize", help="write a weight-only int8 / int4 copy of a checkpoint (loads with lfm directly)")
    s.add_argument("model", help="checkpoint directory, Hub id or demo")
    s.add_argument("--bits", type=int, choices=[4, 8], default=4, help="weight bits: 4 (groups of --group-size "
                   "weights share a scale and zero) or 8 (one scale per output row)")
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="int4 group size")
    s.add_argument("--dtype", default="auto", help="activation dtype the quantized model computes in; auto: the "
                   "checkpoint's")
    s.add_argument("-o", "--output", required=True, help="directory to write")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("bench", help="prefill / decode speed, time to first token and peak RSS on this machine")
    s.add_argument("model", help="checkpoint directory, Hub id, demo, or a preset shape (random weights, e.g. "
                   "LFM2.5-350M; a directory of that name wins)")
    s.add_argument("--quantization", choices=["int8", "int4"], help="quantize the weights on load (default: none)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help=KV_HELP)
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="int4 group size")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence")
    s.add_argument("--gen-len", type=int, default=128, help="tokens generated per sequence")
    s.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    s.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    s.add_argument("--repeats", type=int, default=3, help="timed runs; the table shows their median")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (cuda: bfloat16 by "
                   "default, CUDA graphs for decode steps; serving throughput: benchmarks/gpu_throughput.py)")
    s.add_argument("--enforce-eager", action="store_true", help="cuda: no CUDA graphs (to compare)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("init", help="write a random-weight checkpoint of a preset shape (for trials without a download)")
    s.add_argument("preset", help="tiny, tiny-moe, LFM2.5-350M, LFM2.5-1.2B, LFM2-2.6B, LFM2-8B-A1B, LFM2.5-8B-A1B")
    s.add_argument("-o", "--output", required=True, help="directory to write")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16; auto: the preset's")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    s.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("kernels", help="build the AVX2 CPU kernels now instead of at first use",
                       description="lfm's AVX2 kernels (int8 / int4 GEMV, bfloat16 GEMM, paged decode attention) are "
                       "a C++ extension compiled once per torch and Python version into $LFM_KERNELS_CACHE (default "
                       "~/.cache/lfm-kernels).")
    ks = s.add_subparsers(dest="kernels_cmd", required=True, metavar="ACTION", help="build")
    b = ks.add_parser("build", help="compile the kernels (about a minute), or say where they already are",
                      description="Compile the AVX2 kernels ahead of time, so the first chat or benchmark does not "
                      "wait for them. If another process is compiling them, waits for it and says so.")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    b.set_defaults(fn=cmd_kernels_build)

    # commands that live with their package; each add_*_parser imports argparse only (tests/test_cli_startup.py)
    from .gguf.cli import add_export_parser
    from .serve.cli import add_serve_parser
    from .train.cli import add_train_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    add_train_parser(sub)
    from .eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    from .batch.cli import add_parser as add_batch_parser

    add_batch_parser(sub)
    _describe_subcommands(p)
    return p


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """A subcommand's --help opens with its one-line help where it has no longer description."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sp in action.choices.items():
                if sp.description is None and helps.get(name):
                    sp.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe_subcommands(sp)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from .console import run_command

    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
