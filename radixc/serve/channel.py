"""The server process <-> engine process link: pickled messages, each framed by its 8-byte length, over one
stream socket (a socketpair).

Two ends because the two processes wait differently: the engine's `Channel` blocks (it has nothing else to do
while idle) and polls between steps; the server's `AsyncChannel` lives on the event loop, whose transport buffers
every send, so neither side ever blocks writing while the other is blocked writing too.
"""

from __future__ import annotations

import asyncio
import pickle
import select
import socket
import struct
from typing import Any

_LENGTH = struct.Struct("!Q")


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


class Channel:
    """The engine process's end: blocking sends, receives that wait or only poll. EOFError: the server is gone."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._received = bytearray()

    def send(self, message: Any) -> None:
        self._sock.sendall(_frame(message))

    def receive(self, wait: bool) -> list[Any]:
        """Every whole message that has arrived; with wait, first waits until some bytes come."""
        timeout = None if wait else 0.0
        while select.select([self._sock], [], [], timeout)[0]:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the server process closed the engine channel")
            self._received += chunk
            timeout = 0.0
        messages = []
        start = 0
        while len(self._received) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._received, start)
            end = start + _LENGTH.size + length
            if end > len(self._received):
                break
            messages.append(pickle.loads(self._received[start + _LENGTH.size : end]))
            start = end
        del self._received[:start]
        return messages

    def close(self) -> None:
        self._sock.close()


class AsyncChannel:
    """The server process's end, on its event loop: `send` never blocks, `receive` awaits the next message and
    raises EOFError once the engine process closed its end (it exited or died)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(_frame(message))

    async def receive(self) -> Any:
        try:
            (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            return pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            raise EOFError("the engine process closed its channel") from err

    def close(self) -> None:
        self._writer.close()
