"""`codellm-serve`: the Language Server over stdio (default) or TCP on the loopback interface."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys

from codellm.engine import PRECISION_HELP, PRECISIONS


class NoDocumentText(logging.Filter):
    """pygls logs whole messages (buffer contents) when something fails: keep only a short head."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > 300:
            record.msg, record.args = message[:300] + " …(cut)", ()
        return True


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="codellm-serve", description="codellm Language Server (stdio by default).")
    parser.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default)")
    parser.add_argument("--tcp", type=int, metavar="PORT", help="listen on PORT instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address; only loopback addresses are accepted")
    parser.add_argument("--model", default=None, help="model bundle directory (default: the shipped model)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--log-file", default=None, help="write the log here (no document text is logged)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tcp is not None and not is_loopback(args.host):
        print(f"codellm-serve: refusing to listen on {args.host}: only loopback addresses (127.0.0.1, ::1) "
              "are allowed, since the server reads your files", file=sys.stderr)
        return 2
    setup_logging(args.log_file, args.verbose)

    from .lsp import create_server
    ls = create_server()
    ls.holder.precision = args.precision
    ls.settings.update({"model_path": args.model, "device": args.device, "threads": args.threads})
    if args.tcp is not None:
        ls.start_tcp(args.host, args.tcp)
    else:
        ls.start_io()
    return 0


if __name__ == "__main__":
    sys.exit(main())
