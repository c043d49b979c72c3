"""`codellm`: generate, complete, info, bench."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .threads import prefer_passive_waits

prefer_passive_waits()  # before torch loads (it loads the OpenMP runtime): see codellm.threads

from .bundle_files import BundleError  # noqa: E402
from .config import PRECISION_HELP, PRECISIONS  # noqa: E402
from .loadgen import background_count  # noqa: E402


def parse_location(spec: str) -> tuple[str, int, int]:
    """FILE:LINE:COL (1-based line and column); FILE may be '-' for stdin."""
    try:
        file, line, col = spec.rsplit(":", 2)
        return file, int(line), int(col)
    except ValueError:
        raise ValueError(f"expected FILE:LINE:COL, got {spec!r}") from None


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """Prefix and suffix around a 1-based (line, column) position; the column counts characters, and the
    carriage return of a CRLF line ending is not one of them."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise ValueError(f"line {line} is outside the file (1-{len(lines)})")
    last = len(lines[line - 1].removesuffix("\r")) + 1
    if not 1 <= col <= last:
        raise ValueError(f"column {col} is outside line {line} (1-{last})")
    offset = sum(len(l) + 1 for l in lines[: line - 1]) + col - 1
    return text[:offset], text[offset:]


def read_text(file: str) -> str:
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    return decode(data, file)


def decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc})") from None


def model_arg(value: str) -> str:
    from .defaults import bundle_arg
    return str(bundle_arg(value))


def cmd_generate(args):
    from . import load
    engine = load(args.model, args.device, precision=args.precision)
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    text = engine.generate(prompt, args.max_length, args.temperature, args.top_k, args.top_p, args.seed)
    sys.stdout.write(prompt + text + ("\n" if not text.endswith("\n") else ""))


def open_engine(model: str | None, device: str | None, precision: str):
    """The engine for one completion: the one without torch (codellm.kernel_engine, which writes the
    bundle's start file first if there is none) where the settings are its own (CPU, precision auto) and
    the C step runs here, as the server's first answers are; else the torch engine."""
    from .defaults import default_bundle_path

    path = Path(model) if model else default_bundle_path()
    if device in (None, "cpu") and precision == "auto":
        from .kernel_engine import KernelEngine

        engine = KernelEngine.open(path)
        if engine is not None:
            return engine
    from . import load

    return load(str(path), device, precision=precision)


def number(kind: type, least: float, most: float = float("inf")):
    """An argparse type: a finite int or float from `least` to `most`, refused before any work starts."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = float("nan")
        if not (least <= value <= most and value < float("inf")):  # also refuses nan
            wanted = (f"an integer of at least {least}" if kind is int else f"a number of at least {least:g}")
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}"
                                             + (f" and at most {most:g}" if most < float("inf") else ""))
        return value
    return parse


def probability(value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability from 0 to 1, not {value!r}")
    return p


def cmd_complete(args):
    file, line, col = parse_location(args.location)
    prefix, suffix = split_at(read_text(file), line, col)
    context = None
    if args.context:
        from .crossfile import choose_context, read_context_file
        doc_path = str(Path(file).resolve()) if file != "-" else str(Path.cwd() / "stdin")
        given: dict[str, str] = {}  # resolved path -> as given (errors name it so); a file named twice counts once
        for f in args.context:
            given.setdefault(str(Path(f).resolve()), f)
        context = choose_context(prefix, suffix, [(p, read_context_file(f)) for p, f in given.items()], [], doc_path)
    engine = open_engine(args.model, args.device, args.precision)
    result = engine.complete_detailed(prefix, suffix, args.mode, context=context, cut=args.cut_confidence)
    confidence = result.confidence_of(len(result.text))
    hidden = bool(result.text) and confidence < args.min_confidence  # as the editor would: nothing shown
    sys.stdout.write(("" if hidden else result.text) + "\n")
    if not args.verbose and (hidden or (not result.text and result.stop_reason == "unsure")):
        why = (f"its confidence {confidence:.2f} is below --min-confidence {args.min_confidence}" if hidden else
               f"the model is not sure of its first token (--cut-confidence {args.cut_confidence})")
        print(f"codellm: nothing shown: {why}", file=sys.stderr)
    if args.verbose:
        print(f"[{result.mode} mode, stop: {result.stop_reason}, {result.prompt_tokens} prompt tokens, "
              f"{result.new_tokens} new, {result.seconds * 1000:.0f} ms, confidence {confidence:.3f}"
              f"{', hidden as unsure' if hidden else ''}]", file=sys.stderr)
        for chunk in context or []:
            print(f"[context {chunk.path}:{chunk.line + 1}: {chunk.text.splitlines()[0][:60]}]", file=sys.stderr)
        print(f"[decode steps: {engine.step_name}]", file=sys.stderr)
    sys.stdout.flush()


def cmd_info(args):
    from . import kernel
    from .bundle import load_bundle
    from .config import PRESETS, ModelConfig
    from .defaults import default_bundle_path
    print("presets (their default shapes; a bundle may change the context):")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        print(f"  {name:7s} {cfg.num_params() / 1e6:7.2f}M parameters  (d_model {cfg.d_model}, {cfg.n_layer} layers, "
              f"{cfg.n_head} heads, context {cfg.context_length})")
    try:
        path = args.model or default_bundle_path()
        bundle = load_bundle(path)
    except BundleError as exc:
        if args.model:  # the model asked for: its fault is the command's error
            raise
        print(f"model: {exc}")
        return
    cfg = bundle.config
    print(f"model: {bundle.path}")
    print(f"  preset {cfg.preset}, {bundle.model.num_params() / 1e6:.2f}M parameters ({cfg.n_layer} layers, "
          f"d_model {cfg.d_model}), vocab {cfg.vocab_size}, context {cfg.context_length}, stored as "
          f"{bundle.storage_dtype}, prompt format {bundle.prompt_format}")
    stages = bundle.card.get("stages")
    for stage, info in (stages.items() if isinstance(stages, dict) else ()):
        print(f"  stage {stage}: {stage_line(info)}")
    print(f"decode steps on CPU: {kernel.cpu_decoding()}")


def stage_line(info) -> str:
    """One training stage of a data card in words; what the card lacks or holds in another form is '?'."""
    if not isinstance(info, dict):
        return "?"
    if isinstance(info.get("average_of"), list):  # codellm-train average
        return "weights averaged over " + ", ".join(map(average_part, info["average_of"]))

    def number(key: str, scale: float = 1.0, fmt: str = ".3f") -> str:
        value = info.get(key)
        return format(value / scale, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"

    return (f"{number('tokens', 1e6, '.1f')}M tokens, {number('steps', 1, '.0f')} steps, "
            f"train loss {number('train_loss')}, val loss {number('val_loss')}")


def average_part(part) -> str:
    """One part of an averaged model in words: its bundle and weight ('?' for what the card lacks)."""
    if not isinstance(part, dict):
        return "?"
    name, weight = str(part.get("bundle", "?")), part.get("weight")
    return f"{name} x {weight:.2f}" if isinstance(weight, float) else name


def cmd_bench(args):
    from . import bench
    bench.main(args)


def cmd_tokenize(args):
    from .bundle import load_bundle
    from .defaults import default_bundle_path
    from .tokenizer import clean_text, token_pieces
    path = Path(args.text)
    text = read_text(args.text) if args.text == "-" or (len(args.text) < 4096 and path.is_file()) else args.text
    text = clean_text(text)  # bytes of an argument that are not UTF-8 come as lone surrogates
    tok = load_bundle(args.model or default_bundle_path()).tokenizer
    pieces = token_pieces(tok, text)
    colour = sys.stdout.isatty() and not args.plain
    if colour:
        backgrounds = ("\x1b[48;5;24m", "\x1b[48;5;94m", "\x1b[48;5;28m", "\x1b[48;5;90m")
        shown = "".join(f"{backgrounds[n % 4]}{p}\x1b[0m" for n, (_, p) in enumerate(pieces))
        print(shown)
    else:
        for i, piece in pieces:
            print(f"{i:6d}  {piece!r}")
    n_bytes = len(text.encode())
    print(f"{len(pieces)} tokens, {len(text)} characters, {n_bytes} bytes, "
          f"{n_bytes / max(1, len(pieces)):.2f} bytes per token", file=sys.stderr if colour else sys.stdout)


def cmd_attention(args):
    from .bundle import load_bundle
    from .defaults import default_bundle_path
    from .attention import attention_maps, plot_attention
    from .tokenizer import token_pieces
    bundle = load_bundle(args.model or default_bundle_path())
    prompt = args.prompt.replace("\\n", "\n")
    pieces = token_pieces(bundle.tokenizer, prompt)[: bundle.config.context_length]
    maps = attention_maps(bundle.model, [i for i, _ in pieces])
    for name, value, limit in (("layer", args.layer, maps.shape[0]), ("head", args.head, maps.shape[1])):
        if value is not None and not 0 <= value < limit:
            raise ValueError(f"--{name} must be in 0..{limit - 1}")
    rows, cols = plot_attention(maps, [p for _, p in pieces], args.out, args.layer, args.head)
    print(f"wrote {args.out}: {rows}x{cols} attention maps over {len(pieces)} tokens")


def add_complete_parser(sub) -> None:
    p = sub.add_parser("complete", help="print what would be inserted at FILE:LINE:COL")
    p.add_argument("location", help="FILE:LINE:COL, 1-based; FILE '-' reads stdin")
    p.add_argument("--mode", choices=["line", "block", "auto"], default="auto")
    p.add_argument("--context", nargs="+", metavar="FILE", default=[],
                   help="other files (a library the script sources): their functions and assignments most "
                        "related to the lines around the cursor go before the prompt, as the server does; "
                        "regular files of at most 256 KB. Give it after FILE:LINE:COL (or end the list with --)")
    p.add_argument("--cut-confidence", type=probability, default=0.0, metavar="P",
                   help="end the completion before the first token below this probability (the editor's "
                        "cutConfidence, default there 0.5; here 0: all the model writes)")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="print nothing when the completion's confidence is below this (the editor's "
                        "minConfidence, default there 0.2; here 0)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_complete)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `codellm`: one subcommand per tool, each naming its function in `func`."""
    parser = argparse.ArgumentParser(prog="codellm", description="Offline AI completion for shell scripts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("--prompt", required=True, help=r"text to continue; \n means newline")
    p.add_argument("--max-length", type=number(int, 1), default=200, help="new tokens at most (default 200)")
    p.add_argument("--temperature", type=number(float, 0), default=0.8, help="sampling temperature; 0: greedy (default 0.8)")
    p.add_argument("--top-k", type=number(int, 0), default=50,
                   help="sample among the k likeliest tokens (default 50; 0: all)")
    p.add_argument("--top-p", type=probability, default=0.95,
                   help="sample among the likeliest tokens holding this much probability (default 0.95)")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None,
                   help="the same seed gives the same text (default: random)")
    p.set_defaults(func=cmd_generate)

    add_complete_parser(sub)

    p = sub.add_parser("info", help="presets and the model bundle")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="engine speed: prefill, decode, cache reuse, beside HF transformers "
                                     "and llama.cpp")
    p.add_argument("--preset", default="nano", help="with no --model: a random model of this size (default nano)")
    p.add_argument("--repeats", type=number(int, 1), default=15, help="timings per figure, of which the median is shown (default 15)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--background", type=background_count, default=0, metavar="N",
                   help="instead, prefill, decode and completion times with the engine idle and with N busy "
                        "processes running (started and ended by the bench), side by side, for 1 and 2 threads")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tokenize", help="show how text splits into tokens")
    p.add_argument("text", help="text, a file name, or - for stdin")
    p.add_argument("--plain", action="store_true", help="one token per line even in a terminal")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("attention", help="attention maps of the model for a prompt, as a PNG grid")
    p.add_argument("--prompt", required=True, help=r"the text; \n means newline")
    p.add_argument("--layer", type=int, default=None, help="one layer (default: the last layer's heads)")
    p.add_argument("--head", type=int, default=None, help="one head (with no --layer: this head in every layer)")
    p.add_argument("--out", default="attn.png")
    p.set_defaults(func=cmd_attention)

    for p in sub.choices.values():
        p.add_argument("--model", default=None, type=model_arg,
                       help="model bundle directory (default, or `default`: the shipped one)")
        p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    for name in ("generate", "complete"):
        sub.choices[name].add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    return parser


def report_warnings() -> None:
    """What the library warns of (a start file that cannot be written, ...) on stderr, as `codellm: ...`."""
    logger = logging.getLogger("codellm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("codellm: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def main(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    stdin_locations = [a for a in argv if re.fullmatch(r"-:\d+:\d+", a)]
    if stdin_locations:  # "-:LINE:COL" looks like an option to argparse: pass it after "--"
        argv = [a for a in argv if a not in stdin_locations] + ["--", *stdin_locations]
    args = parser.parse_args(argv)
    report_warnings()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("codellm: interrupted", file=sys.stderr)
        return 130
    except (BundleError, ValueError, OSError) as exc:  # OSError: a FILE that is missing, a directory, ...
        message = f"{exc.filename}: {exc.strerror.lower()}" if isinstance(exc, OSError) and exc.filename \
            and exc.strerror else str(exc)
        print(f"codellm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
