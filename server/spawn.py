"""Starting and stopping `codellm-serve` as a child process of this Python, for the LSP clients that
measure it (keystroke evaluation, server bench, cold start)."""
from __future__ import annotations

import asyncio
import sys

from lsprotocol import types

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


async def start_server(client, server_args: list[str], options: dict | None = None, timeout: float = 120) -> None:
    """Starts codellm-serve under `client` (a pygls LanguageClient) and initializes it as an editor with
    inline completion would, `options` as its initializationOptions. Raises RuntimeError holding the
    server's own last words (its stderr) when it exits or gives no answer within `timeout` seconds; the
    server is then stopped."""
    await client.start_io(*serve_command(server_args))
    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    try:
        await asyncio.wait_for(client.initialize_async(types.InitializeParams(
            capabilities=caps, initialization_options=options)), timeout)
    except Exception as exc:
        said = await server_stderr(client._server)
        await stop_server(client)
        raise RuntimeError(f"codellm-serve did not start ({type(exc).__name__}: {exc})"
                           + (f"; it said:\n{said}" if said else "")) from None
    client.initialized(types.InitializedParams())


async def stop_server(client) -> None:
    """shutdown and exit, as an editor closes; the process is killed where it does not answer."""
    try:
        await asyncio.wait_for(client.shutdown_async(None), 10)
        client.exit(None)
        await asyncio.wait_for(client.stop(), 10)
    except Exception:  # noqa: BLE001 - whatever went wrong, the process must not outlive the client
        if client._server and client._server.returncode is None:
            client._server.kill()
