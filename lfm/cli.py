"""`lfm` on the command line: info, generate, chat, and init (a random-weight checkpoint for offline trials)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  lfm chat                                       # the built-in demo model, offline (a 6M-parameter LFM2)
  lfm info LiquidAI/LFM2.5-350M                 # layout, parameters, memory (needs only config.json)
  lfm init tiny -o ./tiny-lfm                    # random-weight checkpoint + test tokenizer, no download
  lfm generate ./tiny-lfm "Once upon a time" --max-tokens 64 --temperature 0.7
  lfm chat LiquidAI/LFM2.5-350M                  # /reset, /system TEXT, Ctrl-D to quit
"""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def cmd_info(a: argparse.Namespace) -> None:
    from .loading import resolve_config
    from .model.checkpoint import CheckpointError
    from .model.presets import preset, preset_name

    source = "GGUF metadata" if str(a.model).endswith(".gguf") else "config.json"
    try:
        cfg = resolve_config(a.model)
    except CheckpointError as e:
        if preset_name(a.model) is None:
            raise
        cfg, source = preset(a.model), "built-in preset (config.json unavailable: " + str(e).split(" (")[0] + ")"
    pc = cfg.param_counts()
    attn = cfg.attn_layers
    print(f"{a.model}  [{cfg.model_type}; {source}]")
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


def _sampling(a: argparse.Namespace, llm) -> object:
    from .engine.sampling import SamplingParams

    base = llm.default_sampling_params()
    kw = {k: getattr(a, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
          if getattr(a, k) is not None}
    fields = {k: getattr(base, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    return SamplingParams(**{**fields, **kw, "max_tokens": a.max_tokens, "stop": a.stop or []})


def _load(a: argparse.Namespace):
    from .engine.llm import LLM

    print(f"loading {a.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
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


def cmd_chat(a: argparse.Namespace) -> None:
    import dataclasses
    import json

    from .text import parse_tool_calls

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
    if tools:  # keep the call sentinels in the text so the call can be shown and parsed
        sp = dataclasses.replace(sp, skip_special_tokens=False)
    system = a.system
    history: list[dict] = []
    print("chat: /reset clears the history, /system TEXT sets the system prompt, "
          + ("/tool TEXT answers a tool call, " if tools else "") + "Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)", file=sys.stderr)
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.startswith("/tool "):
            history.append({"role": "tool", "content": line[len("/tool "):]})
        else:
            history.append({"role": "user", "content": line})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        reply = ""
        for delta in llm.stream_chat(msgs, sp, tools=tools):
            reply += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        reply = reply.removesuffix("<|im_end|>")
        calls, content = parse_tool_calls(reply)
        for c in calls:
            print(f"  [tool call] {c.name}({json.dumps(c.arguments)})", file=sys.stderr)
        msg: dict = {"role": "assistant", "content": content if calls else reply}
        if calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]  # a mapping: the template writes it back in the model's syntax
        history.append(msg)


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
    from .engine.llm import LLM
    from .model.checkpoint import empty_model, resolve_dtype
    from .model.presets import preset, preset_name

    if a.threads:
        torch.set_num_threads(a.threads)
    if preset_name(a.model) is not None and not Path(a.model).exists():  # a shape: random weights, built in memory
        cfg = preset(a.model)
        model = empty_model(cfg, resolve_dtype(a.dtype, cfg))
        model.init_weights(0.02, generator=torch.Generator().manual_seed(0))
        llm = LLM(model, quantization=a.quantization, group_size=a.group_size, kv_cache_dtype=a.kv_cache_dtype,
                  enable_prefix_caching=False)  # the same prompt is timed again and again: measure, not hit
    else:
        llm = LLM(a.model, dtype=a.dtype, quantization=a.quantization, group_size=a.group_size,
                  kv_cache_dtype=a.kv_cache_dtype, enable_prefix_caching=False)
    r = run_bench(llm, a.prompt_len, a.gen_len, a.batch, a.repeats)
    label = f"{a.model} {llm.model.dtype}".replace("torch.", "") + (f" {a.quantization}" if a.quantization else "") \
        + (" int8 KV" if a.kv_cache_dtype == "int8" else "")
    print(format_table(label, r, a.batch))
    print(f"threads {torch.get_num_threads()}, prompt {a.prompt_len} tokens, {a.gen_len} generated, torch {torch.__version__}")


KV_HELP = "KV cache storage: auto (the model's dtype, default) or int8 (half of bf16's memory and read time at long context)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfm", description="Run Liquid AI's LFM2 / LFM2.5 models.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe a model from its config.json (no weights needed)")
    s.add_argument("model", help="checkpoint directory, config.json, Hub id (LiquidAI/LFM2.5-350M) or preset name")
    s.set_defaults(fn=cmd_info)

    def model_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("model", nargs="?", help="checkpoint directory or Hugging Face Hub id (default: the built-in "
                       "demo model, offline)")
        s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's; default)")
        s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
        s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
        s.add_argument("--temperature", type=float, help="0 = greedy; default: the checkpoint's generation_config")
        s.add_argument("--top-p", type=float)
        s.add_argument("--top-k", type=int)
        s.add_argument("--min-p", type=float)
        s.add_argument("--repetition-penalty", type=float)
        s.add_argument("--seed", type=int, help="same seed, same output")
        s.add_argument("--stop", action="append", help="stop string (repeatable)")
        s.add_argument("--quantization", choices=["int8", "int4"], help="quantize the weights on load (CPU)")
        s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help=KV_HELP)

    s = sub.add_parser("generate", help="complete a prompt, streaming the text")
    model_args(s)
    s.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat through the checkpoint's chat template")
    model_args(s)
    s.add_argument("--system", help="system prompt")
    s.add_argument("--tools", metavar="FILE", help="JSON list of OpenAI-style tool definitions the model may call")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("quantize", help="write a weight-only int8 / int4 copy of a checkpoint (loads with lfm directly)")
    s.add_argument("model", help="checkpoint directory or Hub id")
    s.add_argument("--bits", type=int, choices=[4, 8], default=4)
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="int4 group size (default 64)")
    s.add_argument("--dtype", default="auto", help="activation dtype the quantized model computes in (default: the checkpoint's)")
    s.add_argument("-o", "--output", required=True, help="directory to write")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("bench", help="prefill / decode speed, time to first token and peak RSS on this machine")
    s.add_argument("model", help="checkpoint directory, Hub id, or a preset shape (random weights, e.g. LFM2.5-350M)")
    s.add_argument("--quantization", choices=["int8", "int4"])
    s.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help=KV_HELP)
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--gen-len", type=int, default=128)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    s.add_argument("--repeats", type=int, default=3)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("init", help="write a random-weight checkpoint of a preset shape (for trials without a download)")
    s.add_argument("preset", help="tiny, tiny-moe, LFM2.5-350M, LFM2.5-1.2B, LFM2-2.6B, LFM2-8B-A1B, LFM2.5-8B-A1B")
    s.add_argument("-o", "--output", required=True, help="directory to write")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    s.set_defaults(fn=cmd_init)
    from .gguf.cli import add_export_parser
    add_export_parser(sub)
    from .serve.cli import add_serve_parser
    add_serve_parser(sub)
    from .train.cli import add_train_parser
    add_train_parser(sub)
    from .batch.cli import add_parser as add_batch_parser
    add_batch_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .console import run_command

    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
