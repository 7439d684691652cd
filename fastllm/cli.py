"""The ``fastllm`` command: generate, chat, serve, bench, info."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from fastllm import __version__
from fastllm.api import SHIPPED_MODELS_DIR as ASSETS  # noqa: F401 (re-exported)
from fastllm.api import shipped_model_dirs
from fastllm.quant import GROUP_SIZES, QuantizationConfig, quantization_names
from fastllm.tools import PARSERS

# The exit status when stdout's reader goes away early (`fastllm generate ... | head -c 20`):
# 141 = 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE ends (`yes | head`), so
# `set -o pipefail` scripts and $PIPESTATUS see fastllm as any other Unix tool.
EXIT_BROKEN_PIPE = 141


def default_model_path() -> str | None:
    """$FASTLLM_MODEL, else the model shipped in fastllm/assets (if any)."""
    if os.environ.get("FASTLLM_MODEL"):
        return os.environ["FASTLLM_MODEL"]
    shipped = shipped_model_dirs()
    preferred = [p for p in shipped if (p / "DEFAULT").exists()]
    chosen = preferred or shipped
    return str(chosen[0]) if chosen else None


def shipped_draft_path() -> str | None:
    """The shipped draft model (training_info.json preset "draft"), if any."""
    for d in shipped_model_dirs():
        try:
            preset = json.loads((d / "training_info.json").read_text(encoding="utf-8")).get("preset")
        except (OSError, ValueError):
            continue
        if preset == "draft":
            return str(d)
    return None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _quantization(text: str) -> str:
    """argparse type of --quantization: a name QuantizationConfig.parse accepts (checked before loading)."""
    try:
        QuantizationConfig.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown quantization {text!r}; choose one of {', '.join(quantization_names())}") from None
    return text


def _port(text: str) -> int:
    """argparse type of --port: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="Hugging Face model directory or a shipped model's name (default: the shipped target)")
    p.add_argument("--draft-model", default=None,
                   help="draft model (directory, shipped name, or 'shipped') for speculative decoding")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens proposed per round")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--quantization", "-q", type=_quantization, default=None,
                   help=f"{', '.join(quantization_names())} (at load time; int4 = int4-g{GROUP_SIZES[-1]})")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps from CUDA graphs (default: on a GPU, for models that can; "
                        "--no-cuda-graphs decodes eagerly)")


def _bias_pair(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None, help="no EOS / stop id before this many tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2], per use in the output")
    p.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2], once used in the output")
    p.add_argument("--logit-bias", type=_bias_pair, action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS in [-100, 100] to token ID's logit (repeatable)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=None)
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)


SAMPLING_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
)


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    if "logit_bias" in params:
        params["logit_bias"] = dict(params["logit_bias"])
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm", description="Fast LLM inference on NVIDIA GPUs.")
    parser.add_argument("--version", action="version", version=f"fastllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt ('-' or omitted: read stdin)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--no-stream", action="store_true", help="print the completion at the end")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")

    chat = sub.add_parser("chat", help="interactive chat using the model's chat template")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                      help='extra chat template variables, e.g. \'{"enable_thinking": false}\'')

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'fastllm[server]')")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as 'model' (default: --model as given, or the shipped name)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most requests decoded together")
    serve.add_argument("--max-num-batched-tokens", type=int, default=4096, help="token budget of one step")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health, /metrics and /version "
                            "(default: $FASTLLM_API_KEY, else no key)")
    serve.add_argument("--tool-call-parser", default="auto", choices=["auto", *sorted(PARSERS)],
                       help="the model's tool-call format, for tool_choice 'auto' (default: read from the chat "
                            "template)")

    bench = sub.add_parser("bench", help="latency (one batch) or throughput (--engine) on synthetic prompts")
    _add_model_args(bench)
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    bench.add_argument("--output-len", type=int, default=128, help="generated tokens per sequence (EOS ignored)")
    bench.add_argument("--batch-size", type=int, default=None, help="sequences generated together (latency mode; 1)")
    bench.add_argument("--iters", type=int, default=None, help="timed runs (latency mode; 5; the median is reported)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed runs first (latency mode; 1)")
    bench.add_argument("--engine", action="store_true",
                       help="throughput mode: --num-prompts requests through the continuous-batching engine")
    bench.add_argument("--num-prompts", type=int, default=None, help="requests (throughput mode; 64)")
    bench.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size (throughput mode; 64)")
    bench.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="engine step budget (throughput mode; 4096)")
    bench.add_argument("--temperature", type=float, default=None, help="default 0 (greedy)")
    bench.add_argument("--top-k", type=int, default=None)
    bench.add_argument("--top-p", type=float, default=None)
    bench.add_argument("--seed", type=int, default=0, help="seeds the prompts (and the sampling)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")

    info = sub.add_parser("info", help="backend, GPU and built kernels")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _load(args: argparse.Namespace):
    from fastllm import Model

    path = args.model or default_model_path()
    if path is None:
        raise ValueError("no --model given and no shipped model found; pass --model PATH or set FASTLLM_MODEL")
    return Model.from_pretrained(path, device=args.device, dtype=args.dtype, quantization=args.quantization,
                                 cuda_graphs=args.cuda_graphs)


def _model_name(args: argparse.Namespace) -> str:
    """How output names the model: --model as given, else the default model's directory name."""
    return args.model or os.path.basename(str(default_model_path()))


def _draft_params(args: argparse.Namespace, model) -> dict[str, Any]:
    """The draft model (loaded on the model's device and dtype) and its token
    count when --draft-model is given, else nothing."""
    if args.draft_model is None:
        return {}
    from fastllm import Model

    path = shipped_draft_path() if args.draft_model == "shipped" else args.draft_model
    if path is None:
        raise ValueError("--draft-model shipped: no draft model is shipped in this installation")
    draft = Model.from_pretrained(path, device=model.device, dtype=model.dtype, cuda_graphs=model.cuda_graphs)
    return {"draft_model": draft, "num_speculative_tokens": args.num_speculative_tokens}


def _generation_params(args: argparse.Namespace, model) -> dict[str, Any]:
    """Sampling parameters, plus the draft model when --draft-model is given."""
    return {**_sampling_params(args), **_draft_params(args, model)}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise ValueError("no prompt: pass it as an argument or on standard input")
        prompt = sys.stdin.read()
    model = _load(args)
    params = _generation_params(args, model)
    if args.echo:
        sys.stdout.write(prompt)
    if args.no_stream:
        sys.stdout.write(model.generate(prompt, **params).text)
    else:
        for piece in model.stream(prompt, **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    params = _generation_params(args, model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("fastllm chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = []
            if interactive:
                sys.stdout.write("assistant> ")
            for piece in model.chat(history, stream=True, chat_template_kwargs=args.chat_template_kwargs, **params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except ValueError as e:
            history.pop()
            print(f"fastllm: {e} (use /reset to start over)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def check_bindable(host: str, port: int) -> None:
    """Raise OSError when ``host:port`` cannot be listened on now (in use, or not this machine's
    address), so that serve fails before loading the model. The socket is made as uvicorn makes its
    own (SO_REUSEADDR: a port in TIME_WAIT is free) and closed at once; uvicorn binds for real later,
    and still reports a port taken in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"fastllm: error: the server needs {' and '.join(missing)}: pip install 'fastllm[server]'",
              file=sys.stderr)
        return 1
    from fastllm.server.app import serve

    try:
        check_bindable(args.host, args.port)
    except OSError as e:
        print(f"fastllm: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    model = _load(args)
    api_key = args.api_key or os.environ.get("FASTLLM_API_KEY") or None
    return serve(model, args.served_model_name or _model_name(args), host=args.host, port=args.port,
                 log_level=args.log_level, api_key=api_key, tool_call_parser=args.tool_call_parser,
                 max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens, **_draft_params(args, model))


_BENCH_MODES = {False: {"batch_size": 1, "iters": 5, "warmup": 1},
                True: {"num_prompts": 64, "max_num_seqs": 64, "max_num_batched_tokens": 4096}}


def _bench_mode_args(args: argparse.Namespace) -> None:
    """Fill the defaults of the chosen mode's flags; a flag of the other mode is an error, not ignored."""
    for name in _BENCH_MODES[not args.engine]:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to {'latency mode (without --engine)' if args.engine else '--engine'}")
    for name, default in _BENCH_MODES[args.engine].items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def cmd_bench(args: argparse.Namespace) -> int:
    from fastllm import benchmark

    _bench_mode_args(args)
    model = _load(args)
    params = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    params["seed"] = args.seed
    progress = sys.stderr.isatty()
    draft = _draft_params(args, model)
    if args.engine:
        result = benchmark.measure_throughput(
            model, args.num_prompts, args.input_len, args.output_len, args.max_num_seqs,
            args.max_num_batched_tokens, prompt_seed=args.seed, progress=progress, **draft, **params)
    else:
        result = benchmark.measure_latency(
            model, args.batch_size, args.input_len, args.output_len, args.iters, args.warmup, prompt_seed=args.seed,
            progress=progress, **draft, **params)
    result["model"] = _model_name(args)
    result["device"], result["dtype"] = str(model.device), str(model.dtype).replace("torch.", "")
    result["quantization"], result["cuda_graphs"] = args.quantization, model.cuda_graphs
    if args.draft_model is not None:
        result["draft_model"] = args.draft_model
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        setup = (f"batch {args.batch_size}" if not args.engine else
                 f"{args.num_prompts} requests, engine max_num_seqs {args.max_num_seqs}")
        print(f"fastllm bench: {result['model']} on {result['device']} ({result['dtype']}"
              f"{', ' + args.quantization if args.quantization else ''}{', cuda graphs' if model.cuda_graphs else ''}"
              f"), {setup}, {args.input_len} in + {args.output_len} out")
        print(benchmark.format_result(result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from fastllm import backend_info

    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def _stdout_closed() -> int:
    """stdout's reader has gone: point stdout at the null device, so the interpreter's final flush of
    what is still buffered cannot raise again, and exit quietly (the recipe of Python's signal docs,
    "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured, say): nothing to redirect
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "bench": cmd_bench,
               "info": cmd_info}[args.command]
    try:
        status = handler(args)
        sys.stdout.flush()  # a closed pipe raises here, inside the try, not at the interpreter's exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
