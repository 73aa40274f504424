"""A TCP proxy on loopback that a test can sever: the network fault a gRPC connection meets in the wild.

It runs its own asyncio loop on a thread. `sever()` aborts every open connection at once (both sides
see a reset); new connections are accepted and forwarded as before. `hold_answers()` stops forwarding
server-to-client bytes (they are dropped) until the next `sever()`: the server has answered, the client
never hears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0  # bound by the proxy's own loop, before __init__ returns
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._holding = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TCP proxy did not start")
        self.address = f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(self._pump(client_reader, server_writer, upstream=True),
                             self._pump(server_reader, client_writer, upstream=False))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if not upstream and self._holding:
                    continue  # the answer is lost on the way
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    def _call(self, function) -> None:  # type: ignore[no-untyped-def]
        done = threading.Event()

        def run() -> None:
            try:
                function()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def hold_answers(self) -> None:
        def hold() -> None:
            self._holding = True

        self._call(hold)

    def sever(self) -> None:
        """Abort every open connection now (RST to both sides); later connections go through again."""
        def cut() -> None:
            self._holding = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(cut)

    def close(self) -> None:
        self.sever()
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()
