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


class StderrTail:
    """Reads a child's stderr pipe as it comes, keeping its last `limit` bytes: a pipe nobody reads fills
    (64 KiB) and then blocks the child at its next write, warnings included."""

    def __init__(self, stream, limit: int = 16384):
        self.data, self.limit = bytearray(), limit
        self.task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream) -> None:
        while chunk := await stream.read(4096):
            self.data += chunk
            del self.data[:-self.limit]

    async def text(self, wait: float = 1.0, limit: int = 2000) -> str:
        """The last `limit` characters written, once the pipe closes or `wait` seconds have passed."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), wait)
        except (asyncio.TimeoutError, OSError, ValueError):
            pass
        return self.data.decode("utf-8", "replace").strip()[-limit:]


async def start_server(client, server_args: list[str], options: dict | None = None,
                       timeout: float = 120) -> None:
    """Starts codellm-serve under `client` (a pygls LanguageClient) and initializes it as an editor with
    inline completion would, `options` as its initializationOptions; its stderr is drained all along.
    Raises RuntimeError holding the server's own last words (its stderr) when it exits or gives no answer
    within `timeout` seconds; the server is then killed."""
    await client.start_io(*serve_command(server_args))
    stderr = StderrTail(client._server.stderr)
    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    try:
        await asyncio.wait_for(client.initialize_async(types.InitializeParams(
            capabilities=caps, initialization_options=options)), timeout)
    except Exception as exc:  # noqa: BLE001 - pygls raises its own and plain errors for a dead server
        why = f"no answer within {timeout:g} s" if isinstance(exc, asyncio.TimeoutError) else \
            f"{type(exc).__name__}: {exc}"
        await kill_server(client)
        said = await stderr.text()
        raise RuntimeError(f"codellm-serve did not start ({why})" + (f"; it said:\n{said}" if said else "")) from None
    client.initialized(types.InitializedParams())


async def stop_server(client) -> None:
    """shutdown and exit, as an editor closes; the process is killed where it does not answer."""
    try:
        await asyncio.wait_for(client.shutdown_async(None), 10)
        client.exit(None)
        await asyncio.wait_for(client.stop(), 10)
    except Exception:  # noqa: BLE001 - whatever went wrong, the process must not outlive the client
        await kill_server(client)


async def kill_server(client) -> None:
    """Kill the server process if it still runs and let the client's reader end."""
    process = client._server
    if process is not None and process.returncode is None:
        process.kill()
    try:
        await asyncio.wait_for(client.stop(), 10)
    except Exception:  # noqa: BLE001 - the process is gone: what the reader makes of that does not matter
        pass
