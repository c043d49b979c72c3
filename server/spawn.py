"""Starting `codellm-serve` as a child process of this Python, for the LSP clients that measure it
(keystroke evaluation, server bench, cold start)."""
from __future__ import annotations

import asyncio
import sys

# `python -m` puts the current folder first on the import path, where a folder named codellm (a clone of
# the project, a user's own) would hide the installed package: the child drops that entry first.
_RUN_SERVER = ("import runpy, sys; sys.path.pop(0); "
               "runpy.run_module('codellm.server.cli', run_name='__main__', alter_sys=True)")


def serve_command(server_args: list[str]) -> list[str]:
    """argv that runs codellm.server.cli with this interpreter and `server_args`, whatever the current
    folder holds."""
    return [sys.executable, "-c", _RUN_SERVER, *server_args]


async def server_stderr(process, limit: int = 2000) -> str:
    """The last `limit` characters the exited server `process` (asyncio) wrote to its stderr pipe; "" if
    none can be read within a second."""
    if process is None or process.stderr is None:
        return ""
    try:
        data = await asyncio.wait_for(process.stderr.read(), 1)
    except (asyncio.TimeoutError, OSError, ValueError):
        return ""
    return data.decode("utf-8", "replace").strip()[-limit:]
