"""`codellm-serve`: the Language Server over stdio (default) or TCP on the loopback interface."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import socket
import sys

from codellm.threads import check_threads, prefer_passive_waits, threads_from_env

prefer_passive_waits()  # before torch loads (it loads the OpenMP runtime): see codellm.threads

TOKEN_ENV = "CODELLM_TOKEN"
# what a library's log line may show of its arguments: message ids and LSP method names
# ("workspace/foo", "$/cancelRequest"), which the client chose and no document holds
PROTOCOL_WORD = re.compile(r"\d{1,12}|(?:\$|[A-Za-z][\w-]*)(?:/[A-Za-z][\w-]*)+", re.ASCII)


class NoDocumentText(logging.Filter):
    """Other libraries' log lines carry whole messages (buffer contents) in their arguments and
    tracebacks: keep their wording and their message ids and method names, never other values.
    codellm's own lines never hold document text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "codellm" or record.name.startswith("codellm."):
            return True
        # a message that is not a format string (an exception object, a dict) is a value: name its type
        template = record.msg.split("\n", 1)[0] if isinstance(record.msg, str) else type(record.msg).__name__
        if record.args:
            try:
                args = record.args if isinstance(record.args, tuple) else (record.args,)
                template = template % tuple(shown_argument(a) for a in args)
            except (TypeError, ValueError):
                template = template.split("%", 1)[0] + "…"
        if record.exc_info and record.exc_info[0] is not None:
            template += f" ({record.exc_info[0].__name__})"
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = template, (), None, None, None
        return True


def shown_argument(arg):
    """`arg` where it is a message id or a method name, else an ellipsis."""
    text = str(arg) if isinstance(arg, (str, int)) and not isinstance(arg, bool) else ""
    return arg if PROTOCOL_WORD.fullmatch(text) else "…"


def setup_logging(log_file: str | None, verbose: bool) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(NoDocumentText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("codellm").setLevel(logging.INFO if verbose or log_file else logging.WARNING)
    logging.getLogger("pygls").setLevel(logging.WARNING)  # at INFO it logs every message, buffers included


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The command line `codellm-serve` accepts (editor configs are checked against it in tests)."""
    from codellm.config import PRECISION_HELP, PRECISIONS

    parser = argparse.ArgumentParser(prog="codellm-serve", description="codellm Language Server (stdio by default).")
    parser.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default)")
    parser.add_argument("--tcp", type=int, metavar="PORT", help="listen on PORT instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address; only loopback addresses are accepted")
    parser.add_argument("--model", default=None, help="model bundle directory (default: the shipped model)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--token", default=None,
                        help=f"with --tcp: the token an editor must send as initializationOptions.token "
                             f"(default: ${TOKEN_ENV}, else a new one, printed at start; the variable keeps it out of `ps`)")
    parser.add_argument("--min-confidence", type=float, default=None, metavar="P",
                        help="show no suggestion the model gives lower odds than P of being right, 0-1 "
                             "(the setting minConfidence)")
    parser.add_argument("--cut-confidence", type=float, default=None, metavar="P",
                        help="end a suggestion before the first token the model gives less than P, 0-1 "
                             "(the setting cutConfidence)")
    parser.add_argument("--file-context", action=argparse.BooleanOptionalAction, default=None,
                        help="context from other files: what a script sources, and other open shell files "
                             "(the setting fileContext; on unless --no-file-context or the editor says false)")
    parser.add_argument("--log-file", default=None, help="write the log here (no document text is logged)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tcp is not None and not is_loopback(args.host):
        print(f"codellm-serve: refusing to listen on {args.host}: only loopback addresses (127.0.0.1, ::1) "
              "are allowed, since it serves your documents", file=sys.stderr)
        return 2
    setup_logging(args.log_file, args.verbose)
    try:  # before the model starts loading with them
        if args.threads is not None:
            check_threads(args.threads)
        threads_from_env()
    except ValueError as exc:
        parser.error(str(exc))

    # the model loads (torch included) on the model thread while the LSP library loads here and the
    # editor starts: the first suggestion waits for neither
    from .model_holder import EarlyLoad
    early = EarlyLoad(args.model, args.device, args.threads, args.precision)
    from .lsp import create_server
    ls = create_server(early)
    ls.holder.precision = args.precision
    ls.settings.update({"model_path": args.model, "device": args.device, "threads": args.threads,
                        "min_confidence": args.min_confidence, "cut_confidence": args.cut_confidence,
                        "file_context": args.file_context})
    for problem in ls.settings.problems:
        parser.error(problem)
    ls.settings.keep_launch_values()
    from .transport import serve_stdio, serve_tcp, server_token
    if args.tcp is not None:
        token = args.token or server_token()
        told = "token given" if args.token or os.environ.get(TOKEN_ENV) else f"token {token}"

        def announce(host, port):
            print(f"codellm-serve: listening on {host}:{port}; {told}", file=sys.stderr, flush=True)

        if not 0 <= args.tcp <= 65535:
            parser.error(f"--tcp {args.tcp}: a port is 0-65535")
        try:
            return serve_tcp(ls, args.host, args.tcp, token, announce)
        except OSError as exc:  # the port is taken, or not ours to bind
            print(f"codellm-serve: cannot listen on {args.host}:{args.tcp}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return serve_stdio(ls)


if __name__ == "__main__":
    sys.exit(main())
