"""`codellm-train`: corpus, tokenizer, language (stage 1), code (stage 2), all, eval, bench."""
from __future__ import annotations

import argparse
import errno
import re
import signal
import sys
import threading
from pathlib import Path

from codellm.config import LIMITS, PRESETS

from .loop import (COMPILE_AUTO_MIN_SECONDS, TrainConfig, TrainingStopped, close_distributed, distributed,
                   max_steps_on_resume, progress_of)
from .pairs import MAX_PAIR_SHARE
from .data import MAX_USER_SHARE


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", type=out_path, required=True, help="where the trained bundle is written")
    g.add_argument("--model-size", choices=list(PRESETS), default=None, help="preset for a new model: test, nano, mini, tiny, small, medium")
    g.add_argument("--batch-size", type=above(int), default=16, help="sequences per step, over all processes")
    g.add_argument("--grad-accum", type=above(int), default=1)
    g.add_argument("--learning-rate", type=above(float), default=None,
                   help="default 2e-3 for a new model, 5e-4 when starting from a bundle")
    g.add_argument("--num-epochs", type=above(float), default=None)
    g.add_argument("--max-steps", type=above(int), default=None)
    g.add_argument("--time-budget", type=above(float), default=None, help="seconds (for `all`: both stages together)")
    g.add_argument("--warmup-steps", type=above(int, -1), default=50,
                   help="steps of linear learning-rate warmup (default 50; at most a tenth of --max-steps)")
    g.add_argument("--context-length", type=above(int, 0, LIMITS["context_length"][1]), default=None)
    g.add_argument("--layers", type=int, default=None,
                   help="with --from: grow the bundle's model to this many layers first (block expansion: new "
                        "layers that start out adding nothing, train/grow.py); default: the bundle's")
    g.add_argument("--storage", choices=["float16", "bfloat16", "float32", "int8"], default=None,
                   help="how the bundle written stores its weights (int8: each matrix as int8 with a scale per "
                        "row, half float16's size); default: the --from bundle's, else float16")
    g.add_argument("--fim-rate", type=share(1.0), default=0.5)
    g.add_argument("--pair-share", type=share(MAX_PAIR_SHARE), default=None,
                   help="code stage: share of the training characters that are comment-to-command scripts "
                        "(pairs.py), drawn again in new orders when the pairs are fewer (default 0.2; 0: off; at most 0.9)")
    g.add_argument("--user-share", type=share(MAX_USER_SHARE), default=None,
                   help="code stage: share of the shell characters from user-style sources (npm and PyPI "
                        "packages' scripts, your --code-data), those files drawn again when fewer "
                        "(default 0: the corpus as it comes; at most 0.9)")
    g.add_argument("--context-rate", type=share(1.0), default=None,
                   help="code stage: shell files that source a file of their package also train with its "
                        "definitions placed before them, as the server shows context from other files; this "
                        "share of the others does so with definitions from their folder (default 0.2; 0: no context examples at all)")
    g.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="write the bundle into --out even if that folder holds a bundle or other files (only the "
                        "bundle's own files in it are replaced; without this, such a folder is refused)")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--threads", type=above(int), default=None)
    g.add_argument("--seed", type=above(int, -1, 2**32 - 1), default=1337)
    g.add_argument("--checkpoint-every", type=above(int), default=100)
    g.add_argument("--eval-every", type=above(int), default=200)
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model: about 30 s of compiling, then faster steps; auto: on for a "
                        f"--time-budget of {COMPILE_AUTO_MIN_SECONDS // 60} minutes or more (off if compiling fails)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with bf16 hardware (AMX, AVX-512 BF16)")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def add_corpus_flags(p: argparse.ArgumentParser, corpus_default: str | None) -> None:
    p.add_argument("--recipe", choices=["default"], default=None, help="the default data recipe")
    p.add_argument("--code-data", type=Path, action="append", default=[],
                   help='a folder of scripts or a JSON file {"scripts": [...]} (repeatable)')
    p.add_argument("--heldout-data", type=Path, action="append", default=[],
                   help="scripts (as for --code-data) kept out of training, for `codellm-train eval` (repeatable)")
    p.add_argument("--language-data", type=Path, action="append", default=[],
                   help="a text file, folder, or TinyStories-format file (repeatable)")
    p.add_argument("--packages", type=Path, default=None, help="package list for the default recipe")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default: <corpus>/cache)")
    p.add_argument("--english-mb", type=share(100_000), default=40.0, help="cap on English text from the recipe")
    p.add_argument("--retry-failed", action="store_true",
                   help="ask again for packages whose download failed in an earlier build")
    p.add_argument("--cached-only", action="store_true",
                   help="of the recipe's training packages, use only those already in the download cache "
                        "(held-out packages are always fetched): a quick build after downloads stopped part-way")
    p.add_argument("--download-budget", type=share(7 * 24 * 3600), default=None, metavar="SECONDS",
                   help="start no download of a training package after this many seconds; build from those "
                        "fetched by then (held-out packages come first and are always fetched)")
    p.add_argument("--corpus", type=Path, default=Path(corpus_default) if corpus_default else None,
                   help="corpus folder (built here when data flags are given)")


def train_config(args) -> TrainConfig:
    from_bundle = getattr(args, "from_bundle", None)
    learning_rate = args.learning_rate or (5e-4 if from_bundle else 2e-3)
    num_epochs = args.num_epochs
    if not (args.max_steps or args.num_epochs or args.time_budget):
        num_epochs = 1.0
        print("codellm-train: no --max-steps, --num-epochs or --time-budget given: training one epoch",
              file=sys.stderr)
    return TrainConfig(learning_rate=learning_rate, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_steps=args.max_steps, num_epochs=num_epochs, time_budget=args.time_budget,
                       warmup_steps=args.warmup_steps, seed=args.seed, checkpoint_every=args.checkpoint_every,
                       eval_every=args.eval_every, compile=args.compile, precision=args.precision, stop_after=args.stop_after)


def above(kind: type, bound: float = 0, most: float = float("inf")):
    """An argparse type: a finite int or float greater than `bound` and at most `most`, refused before
    any work starts."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = float("nan")
        if not (bound < value <= most and value < float("inf")):  # also refuses nan
            wanted = f"an integer of at least {bound + 1}" if kind is int else f"a number above {bound:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}"
                                             + (f" and at most {most:g}" if most < float("inf") else ""))
        return value
    return parse


def out_path(text: str) -> Path:
    """--out as the folder it names: `~` expanded, a link followed (the bundle goes where the link
    points, its run folder beside it), `.` and `..` resolved."""
    return Path(text).expanduser().resolve()


def share(upper: float):
    """An argparse type: a number from 0 to `upper`, refused (with the range) before any work starts."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 <= value <= upper:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to {upper}")
        return value
    return parse


def mix_options(args) -> dict:
    """run_stage's context_rate, pair_share and user_share where --context-rate, --pair-share and
    --user-share were given (else its defaults)."""
    given = {"context_rate": args.context_rate, "pair_share": args.pair_share, "user_share": args.user_share}
    return {k: v for k, v in given.items() if v is not None}


def first_process_then_all(work):
    """Under torchrun, files are made once: process 0 runs `work`, the others wait for it."""
    rank, world = distributed()
    result = work() if rank == 0 else None
    if world > 1:
        import torch.distributed
        torch.distributed.barrier()
    return result


def bundle_arg(value: str) -> Path:
    from codellm.defaults import bundle_arg
    return bundle_arg(value)


def check_from(args) -> None:
    """Refuse, before the corpus is built, a --from the run could not continue (stages.parent_bundle)."""
    if args.from_bundle is not None and args.model_size:
        raise ValueError("--model-size sizes a new model; --from continues a bundle at its own size "
                         "(grow its depth with --layers)")
    if args.from_bundle is None:
        if getattr(args, "layers", None) is not None:
            raise ValueError("--layers grows the model of a bundle: give --from BUNDLE (a new model's size "
                             "is --model-size)")
        return
    from codellm.tokenizer import Tokenizer
    from .stages import parent_bundle
    parent_bundle(args.from_bundle, Tokenizer.load(args.tokenizer) if args.tokenizer else None, args.context_length,
                  getattr(args, "layers", None))


def check_out(args, runs: list[tuple[Path, Path]] = ()) -> None:
    """Refuse, before any work, an --out that is a file or a folder of someone's files, the --from bundle
    itself, and (without --overwrite) a bundle already there or, without --resume, a new run where an
    earlier one was cut short: `runs` are (run folder, bundle folder) pairs, and a checkpoint newer than its
    stage's bundle would be replaced by the new run."""
    from codellm.bundle import check_bundle_target, is_bundle_dir
    from .checkpoint import CHECKPOINT_FILE
    check_bundle_target(args.out, args.overwrite)
    parent = getattr(args, "from_bundle", None)
    if parent is not None and args.out.exists() and args.out.resolve() == Path(parent).resolve():
        raise SystemExit(f"{args.out}: is the --from bundle this run starts from; write the new model to another --out")
    if args.overwrite:
        return
    checkpoints = [run_dir / CHECKPOINT_FILE for run_dir, _ in runs]
    if not args.resume:
        for checkpoint, (run_dir, bundle) in zip(checkpoints, runs):
            if checkpoint.exists() and newer_than_bundle(checkpoint, bundle):
                raise SystemExit(f"{run_dir} holds the checkpoint of an unfinished run: give --resume to continue "
                                 "it, --overwrite to start over (the checkpoint is replaced), or another --out")
    if is_bundle_dir(args.out) and not (args.resume and any(c.exists() for c in checkpoints)):
        raise SystemExit(f"{args.out}: a bundle is there already; give --overwrite to replace it, or another --out")


def finished_already(args, run_dir: Path, bundle: Path, can_go_on: bool = False) -> bool:
    """With --resume: whether the run in `run_dir` finished (its bundle written after its last checkpoint).
    Said so; nothing is trained and the bundle is left as it is (its children's --from digest holds).
    With `can_go_on`, a finished run given a --time-budget or --max-steps beyond where it ended is not
    finished: it goes on from its last checkpoint (optimizer state and data order included), so that
    sittings on different days add up to one long run."""
    from codellm.bundle import is_bundle_dir
    from .checkpoint import CHECKPOINT_FILE
    checkpoint = run_dir / CHECKPOINT_FILE
    if not (args.resume and is_bundle_dir(bundle) and checkpoint.exists()
            and not newer_than_bundle(checkpoint, bundle)):
        return False
    ended = readable_state(run_dir) if can_go_on else None
    if ended is not None and goes_further(args, ended):
        print(f"codellm-train: the run in {run_dir} ended at step {ended['step']} ({ended['elapsed']:.0f} s "
              f"trained); it goes on to the budget given, and its bundle {bundle} is replaced at the end")
        return False
    how = ("; a larger --time-budget (seconds in all, those trained included) or --max-steps carries it on"
           if ended is not None else "")
    print(f"codellm-train: the run in {run_dir} finished already; its bundle is {bundle} (nothing to resume{how})")
    return True


def readable_state(run_dir: Path) -> dict | None:
    """The state in a run's checkpoint, or None (said so) when the file cannot be read: the run's bundle
    stands, but the run cannot go on."""
    from .checkpoint import read_checkpoint_state
    try:
        return read_checkpoint_state(run_dir)
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        print(f"codellm-train: {run_dir}: its checkpoint cannot be read ({exc}), so the run cannot go on")
        return None


def goes_further(args, ended: dict) -> bool:
    """Whether --time-budget (seconds in all) or --max-steps reach past where a run's checkpoint `ended`:
    the resumed run would have steps left (train.loop's own rules). --num-epochs carries no run on."""
    if args.num_epochs:
        return False
    state = dict(ended, max_steps=max_steps_on_resume(ended.get("max_steps"), args.max_steps, args.time_budget))
    limited = bool(state["max_steps"] or args.time_budget)
    return limited and progress_of(state, argparse.Namespace(time_budget=args.time_budget)) < 1.0


def newer_than_bundle(checkpoint: Path, bundle: Path) -> bool:
    """Whether `checkpoint` was written after the bundle of its stage (or the stage wrote none)."""
    from codellm.bundle import WEIGHTS_FILE
    weights = bundle / WEIGHTS_FILE
    return not weights.exists() or checkpoint.stat().st_mtime > weights.stat().st_mtime


def ensure_corpus(args, default_dir: Path) -> Path:
    from .recipe import build_corpus, SHELL_FILE, SUMMARY_FILE

    corpus = args.corpus or default_dir
    if corpus.is_file():  # a one-file pack (`codellm-train pack`): unpacked beside the run
        from .packed import unpack_corpus
        return first_process_then_all(lambda: unpack_corpus(corpus, default_dir)) or default_dir
    if args.recipe or args.code_data or args.language_data or args.heldout_data:
        # the summary is written last: a corpus without it was cut short by a kill and is built again
        if not (args.resume and (corpus / SUMMARY_FILE).exists()):
            first_process_then_all(lambda: build_corpus(corpus, args.recipe, args.code_data, args.language_data,
                                                        args.packages, args.cache, args.english_mb,
                                                        heldout_data=args.heldout_data,
                                                        cached_only=args.cached_only, download_budget=args.download_budget))
    elif not (corpus / SHELL_FILE).exists():
        raise ValueError(f"{corpus}: no corpus here; give --recipe default, --code-data, --heldout-data or "
                         "--language-data")
    return corpus


def trained_tokenizer(corpus: Path, path: Path, resume: bool = False):
    """Train the tokenizer once (process 0) and load it in every process; on --resume, a tokenizer
    that a finished earlier run wrote is used again (one cut short by a kill is trained again)."""
    from codellm.tokenizer import Tokenizer
    from .stages import train_tokenizer
    if resume and path.exists():
        try:
            return Tokenizer.load(path)
        except Exception:  # noqa: BLE001 - the tokenizers library raises plain exceptions
            pass
    first_process_then_all(lambda: train_tokenizer(corpus, path))
    return Tokenizer.load(path)


def cmd_corpus(args):
    from .recipe import build_corpus
    build_corpus(args.corpus, args.recipe, args.code_data, args.language_data, args.packages, args.cache,
                 args.english_mb, retry_failed=args.retry_failed, heldout_data=args.heldout_data,
                 cached_only=args.cached_only, download_budget=args.download_budget)


def cmd_pack(args):
    from .packed import pack_corpus
    pack_corpus(args.corpus, args.out, args.max_mb)


def cmd_tokenizer(args):
    from .stages import train_tokenizer
    train_tokenizer(args.corpus, args.out, args.vocab_size)


def cmd_stage(args):
    """`codellm-train language` or `code` (args.stage)."""
    from codellm.tokenizer import Tokenizer
    from .stages import run_folder, run_stage
    check_out(args, [(run_folder(args.out, args.stage), args.out)])  # first: it reads no bundle
    check_from(args)
    if finished_already(args, run_folder(args.out, args.stage), args.out, can_go_on=True):
        return
    work = args.out.with_name(args.out.name + ".work")
    corpus = ensure_corpus(args, work / "corpus")
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    if tok is None and not args.from_bundle:
        tok = trained_tokenizer(corpus, work / "tokenizer.json", args.resume)
    run_stage(args.stage, corpus, args.out, train_config(args), tok, args.from_bundle, args.model_size,
              args.context_length, args.fim_rate, args.device, args.resume, threads=args.threads,
              overwrite=args.overwrite, n_layer=args.layers, storage=args.storage, **mix_options(args))


def cmd_all(args):
    from .stages import run_folder, run_stage
    if args.layers is not None:
        raise ValueError("--layers grows the model of a bundle (`codellm-train code --from BUNDLE --layers N`); "
                         "`all` trains a new model, sized by --model-size")
    if args.max_steps == 1 and args.language_share > 0:
        raise ValueError("--max-steps 1 leaves no step for the shell stage after the English one "
                         "(--language-share): give 2 or more")
    work = args.out.with_name(args.out.name + ".work")
    check_out(args, [(run_folder(work / "stage1", "language"), work / "stage1"), (run_folder(args.out, "code"), args.out)])
    if finished_already(args, run_folder(args.out, "code"), args.out):
        return
    corpus = ensure_corpus(args, work / "corpus")
    tok_path = work / "tokenizer.json"
    tok = trained_tokenizer(corpus, tok_path, args.resume)
    cfg = train_config(args)
    if args.language_share > 0:
        from_bundle = english_stage(args, corpus, tok, work / "stage1")
        cfg.time_budget = args.time_budget and args.time_budget * (1 - args.language_share)
        cfg.max_steps = args.max_steps and args.max_steps - max(1, int(args.max_steps * args.language_share))
        model_size, context_length = None, None
    else:  # shell from the start (the English share of the code stage still mixes prose in)
        from_bundle, model_size, context_length = None, args.model_size, args.context_length
    run_stage("code", corpus, args.out, cfg, tok, from_bundle, model_size, context_length, args.fim_rate,
              args.device, args.resume, threads=args.threads, overwrite=args.overwrite, storage=args.storage,
              **mix_options(args))


def english_stage(args, corpus: Path, tok, stage1: Path) -> Path:
    """Stage 1 of `all` with --language-share > 0: English prose for that share of the budget; returns
    the bundle the code stage starts from."""
    from codellm.bundle import BUNDLE_FILES
    from .stages import run_stage
    cfg = train_config(args)
    cfg.time_budget = args.time_budget and args.time_budget * args.language_share
    cfg.max_steps = args.max_steps and max(1, int(args.max_steps * args.language_share))
    if not (args.resume and all((stage1 / f).exists() for f in BUNDLE_FILES)):
        run_stage("language", corpus, stage1, cfg, tok, None, args.model_size, args.context_length, 0.0,
                  args.device, args.resume, threads=args.threads)
    _, world = distributed()
    if world > 1:
        import torch.distributed
        torch.distributed.barrier()  # rank 0 writes the stage 1 bundle that every rank starts from
    if not all((stage1 / f).exists() for f in BUNDLE_FILES):
        raise SystemExit("stage 1 stopped before writing its bundle")
    return stage1


def cmd_average(args):
    from .average import average_bundles, parse_weights
    average_bundles(args.bundle, args.out, parse_weights(args.weights, len(args.bundle)), args.overwrite)


def cmd_eval(args):
    from .evaluate import main as evaluate
    evaluate(args)


def cmd_bench(args):
    from .bench import main as bench
    bench(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `codellm-train`: one subcommand per step, each naming its function in `func`."""
    parser = argparse.ArgumentParser(prog="codellm-train", description="Build corpora and train codellm models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="build the English and shell corpora")
    add_corpus_flags(p, "data/corpus")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("pack", help="pack a corpus folder into one file (to train elsewhere, e.g. on a GPU)")
    p.add_argument("--corpus", type=Path, required=True, help="a corpus folder built by `codellm-train corpus`")
    p.add_argument("--out", type=Path, required=True, help="the pack file to write")
    p.add_argument("--max-mb", type=above(float), default=60.0, help="refuse to write a pack larger than this")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("tokenizer", help="train the BPE tokenizer on a corpus")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=above(int, 511, LIMITS["vocab_size"][1]), default=8192,
                   help="tokens in the vocabulary (default 8192)")
    p.set_defaults(func=cmd_tokenizer)

    for stage, help_text in (("language", "stage 1: English text"), ("code", "stage 2: shell scripts with FIM")):
        p = sub.add_parser(stage, help=help_text)
        add_corpus_flags(p, None)
        add_training_flags(p)
        p.add_argument("--tokenizer", type=Path, default=None)
        p.add_argument("--from", dest="from_bundle", type=bundle_arg, default=None,
                       help="start from this bundle (`default`: the model shipped with codellm)")
        p.set_defaults(func=cmd_stage, stage=stage)

    p = sub.add_parser("all", help="corpus -> tokenizer -> (English stage) -> shell stage")
    add_corpus_flags(p, None)
    add_training_flags(p)
    p.add_argument("--language-share", type=share(0.9), default=0.0,
                   help="share of the budget for an English stage before the shell stage (default 0: at equal "
                        "compute, shell from the start had the lower held-out loss; docs/how-it-works.md)")
    p.set_defaults(func=cmd_all)

    p = sub.add_parser("average", help="one bundle whose weights are the mean of several (stages of one relay)")
    p.add_argument("bundle", type=bundle_arg, nargs="+",
                   help="two or more bundles of one model shape and tokenizer (`default`: the shipped model)")
    p.add_argument("--out", type=out_path, required=True,
                   help="where the averaged bundle is written, stored as the bundles are (float32 where their "
                        "storage types differ)")
    p.add_argument("--weights", default=None, help="comma-separated weights, one per bundle (default: equal)")
    p.add_argument("--overwrite", action="store_true", help="replace the bundle already at --out")
    p.set_defaults(func=cmd_average)

    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, line completion, comment to command, block completion, "
                                     "cross-file context, keystrokes, whole-script syntax")
    p.add_argument("bundle", type=bundle_arg, nargs="+",
                   help="one or more bundles, measured side by side (`default`: the model shipped with codellm)")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"),
                   help="a corpus folder built by `codellm-train corpus`, with held-out splits (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: <first bundle>/../<name>-eval.json)")
    p.add_argument("--samples", type=above(int, -1), default=400, help="line-completion cut points per split (default: %(default)s)")
    p.add_argument("--scripts", type=above(int, -1), default=20, help="generated whole scripts (default: %(default)s)")
    p.add_argument("--pairs", type=above(int, -1), default=300, help="held-out comment-to-command pairs per split (default: %(default)s)")
    p.add_argument("--blocks", type=above(int, -1), default=100,
                   help="held-out block openers per split completed in block mode (body present, bash -n; default: %(default)s)")
    p.add_argument("--cross-file", type=above(int, -1), default=200, metavar="N",
                   help="cut points at calls of functions from a sourced file of the same package (and as many "
                        "ordinary ones in those scripts), completed with and without that file as context "
                        "(0: skip; default: %(default)s)")
    p.add_argument("--keystrokes", type=above(int, -1), default=300,
                   help="characters of held-out regions per split typed into a real server, keystroke by "
                        "keystroke (0: skip the keystroke evaluation; default: %(default)s)")
    p.add_argument("--keystroke-curve", type=Path, default=None, metavar="PNG",
                   help="also sweep the confidence thresholds and draw taken-of-shown against keystrokes saved")
    p.add_argument("--no-card", action="store_true", help="do not write the results into the bundle's data card")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training tokens/s per preset, beside HF transformers")
    p.add_argument("--presets", default="nano", help="comma-separated presets")
    p.add_argument("--batch-size", type=above(int), default=16)
    p.add_argument("--context-length", type=above(int), default=256)
    p.add_argument("--steps", type=above(int), default=6)
    p.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    p.set_defaults(func=cmd_bench)


TRAINING_EXTRAS = ("datasketch", "tqdm", "matplotlib")  # pyproject.toml's [train]: corpus building, progress, plots


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training steps (which stop after the step under way): the command ends as on
    Ctrl-C, with the same line, rather than at once and without a word."""

    signum = signal.SIGTERM


def raise_terminated(_signum, _frame) -> None:
    raise Terminated()


def main(argv=None):
    args = build_parser().parse_args(joined_weights(sys.argv[1:] if argv is None else list(argv)))
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, raise_terminated) if own else None
    try:
        return run_command(args)
    finally:
        close_distributed()
        if own:
            signal.signal(signal.SIGTERM, previous)


def joined_weights(argv: list[str]) -> list[str]:
    """`--weights -0.5,1` as `--weights=-0.5,1`: argparse takes a value led by a minus sign (that is not one
    plain number) for an option and would refuse it."""
    out, i = list(argv), 0
    while i < len(out) - 1:
        arg = out[i]
        if len(arg) > 2 and "--weights".startswith(arg) and re.match(r"-[\d.]", out[i + 1]):  # or --weig
            out[i:i + 2] = [f"{arg}={out[i + 1]}"]
        i += 1
    return out


def run_command(args) -> int:
    """Runs one parsed subcommand; returns the exit status, with errors the user can fix said in a line."""
    try:
        args.func(args)
    except TrainingStopped as exc:
        print(f"codellm-train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except ModuleNotFoundError as exc:
        if exc.name not in TRAINING_EXTRAS:
            raise
        print(f"codellm-train: error: this needs codellm's training extras ({exc.name} is missing): "
              "pip install -e '.[train]' in the codellm folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"codellm-train: interrupted ({signal.Signals(signum).name}); " + (
              "the same command with --resume goes on from what was finished "
              "(a built corpus, a trained tokenizer, a run's last checkpoint)" if hasattr(args, "resume")
              else "run the same command again to finish"), file=sys.stderr)
        return 128 + signum
    except (ValueError, FileNotFoundError) as exc:
        print(f"codellm-train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a full disk, from Python or from the safetensors writer
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
        if full:
            where = getattr(exc, "filename", None)
            print(f"codellm-train: error: no space left on the disk{f' writing {where}' if where else ''}; "
                  "free some space and run the same command again" + (" with --resume" * hasattr(args, "resume")),
                  file=sys.stderr)
            return 1
        if isinstance(exc, OSError):
            print(f"codellm-train: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
