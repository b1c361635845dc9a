"""A pipelined batch of Redis GETs whose values are received straight into the caller's buffers.

Why: redis-py hands every reply over as a ``bytes`` object. hiredis first copies the socket's
bytes into its own read buffer, then into that object, and the backend then copied it a third
time into the host slot. For 1 MiB values those user-space copies, not the network, set the rate
(0.75x plain redis-py for the cluster backend, whose node threads also fought for the GIL).

What stays with redis-py: the connection (connect, AUTH, TLS, pooling, health) and packing the
commands. What this module does: read the replies of one batch of ``GET``s on that connection.
A GET answers a bulk string, nil, or an error (``-MOVED ...``, ``-CLUSTERDOWN ...``); the backend
speaks RESP2, but RESP3's null (``_``) and blob error (``!``) are understood too. The value's body is received by the kernel directly into its destination (``recv_into``), and only
the header, the 8-byte trailer and the CRLF pass through a small buffer. Any other reply is a
protocol error: the caller drops the connection, so no half-read reply ever reaches the pool.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from membrain import checksum64

TRAILER = 8  # XXH3-64 of the value, little-endian, after the value (see redis_backend.pack)
_CHUNK = 4096  # header reads: small, so little of a value's body detours through the buffer
_MAX_LINE = 64 * 1024  # an error line longer than this is a broken stream, not a reply


class RespProtocolError(ConnectionError):
    """The server sent something a GET cannot answer; the connection must be dropped."""


class _Reader:
    """Buffered reads from ``sock`` that all end by ``deadline`` (time.monotonic seconds)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._buf = bytearray()
        self._scratch = memoryview(bytearray(_CHUNK))

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("Redis GET batch ran past its deadline")
        self._sock.settimeout(left)

    def _recv(self, into: memoryview) -> int:
        self._arm()
        try:
            n = self._sock.recv_into(into)
        except TimeoutError:
            raise TimeoutError("Redis GET batch ran past its deadline") from None
        if n == 0:
            raise ConnectionError("Redis closed the connection mid-reply")
        return n

    def _fill(self) -> None:
        n = self._recv(self._scratch)
        self._buf += self._scratch[:n]

    def line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                out = bytes(self._buf[:end])
                del self._buf[: end + 2]
                return out
            if len(self._buf) > _MAX_LINE:
                raise RespProtocolError(f"no line end within {_MAX_LINE} bytes")
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def into(self, dest: memoryview) -> None:
        """Fills ``dest``: what the buffer already holds, then the kernel writes the rest."""
        have = min(len(self._buf), dest.nbytes)
        dest[:have] = self._buf[:have]
        del self._buf[:have]
        while have < dest.nbytes:
            have += self._recv(dest[have:])

    def skip(self, n: int) -> None:
        have = min(len(self._buf), n)
        del self._buf[:have]
        while have < n:
            have += self._recv(self._scratch[: min(_CHUNK, n - have)])

    @property
    def leftover(self) -> int:
        return len(self._buf)


def _length(field: bytes) -> int:
    try:
        return int(field)
    except ValueError:
        raise RespProtocolError(f"bad length {field[:40]!r}") from None


def get_batch_into(
    conn: Any, keys: list[bytes], views: list[memoryview], deadline: float
) -> tuple[list[bool], list[bytes]]:
    """``GET keys[i]`` for every key as one pipeline on redis-py connection ``conn``; each value
    that is exactly ``views[i].nbytes`` plus its trailer is received into ``views[i]`` and
    checked against the trailer. Returns (hit per key, the error replies). A value of another
    length leaves its view untouched; one that fails its checksum leaves it undefined.

    Raises ConnectionError (RespProtocolError included) or TimeoutError when the stream broke
    or the deadline passed: the caller must then ``conn.disconnect()``, since replies may be
    left unread. Bytes are only written into ``views`` before this returns or raises."""
    if time.monotonic() >= deadline:  # e.g. the connect took it all: write nothing
        raise TimeoutError("Redis GET batch ran past its deadline")
    sock = conn._sock  # redis-py connects in ConnectionPool.get_connection
    if sock is None:
        raise ConnectionError("Redis connection is not connected")
    conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]), check_health=False)
    reader = _Reader(sock, deadline)
    hits = [False] * len(keys)
    errors: list[bytes] = []
    try:
        for i, view in enumerate(views):
            head = reader.line()
            kind, rest = head[:1], head[1:]
            if kind == b"-":
                errors.append(rest)
                continue
            if kind == b"_":
                continue  # RESP3 null
            if kind == b"!":  # RESP3 blob error
                errors.append(reader.exact(_length(rest) + 2)[:-2])
                continue
            if kind != b"$":
                raise RespProtocolError(f"a GET was answered with {head[:40]!r}")
            size = _length(rest)
            if size < 0:
                continue  # nil: not stored
            if size != view.nbytes + TRAILER:
                reader.skip(size + 2)  # another block size or a foreign value: a miss
                continue
            reader.into(view)
            tail = reader.exact(TRAILER + 2)
            if tail[TRAILER:] != b"\r\n":
                raise RespProtocolError("bulk string not terminated by CRLF")
            hits[i] = checksum64(view) == int.from_bytes(tail[:TRAILER], "little")
        if reader.leftover:
            raise RespProtocolError(f"{reader.leftover} bytes after the last reply")
    finally:
        try:
            sock.settimeout(conn.socket_timeout)  # redis-py's own reads expect their timeout
        except OSError:
            pass  # already closed: the caller disconnects
    return hits, errors
