"""A pipelined batch of Redis GETs whose values are received straight into the caller's buffers.

Why: redis-py hands every reply over as a ``bytes`` object. hiredis first copies the socket's
bytes into its own read buffer, then into that object, and the backend then copied it a third
time into the host slot, all in Python threads that take turns on the GIL (the vLLM worker's
GIL, inside vLLM). For 1 MiB values those copies, not the network, set the rate: the cluster
backend's GET ran at 0.75x plain redis-py on one server.

What stays with redis-py: the connection (connect, AUTH, pooling, health) and packing the
commands. What moves to native code (``_native.redis_read_gets``,
``csrc/transport/redis_get_reader.cpp``): reading the replies, GIL released. A GET answers a
bulk string, nil, or an error (``-MOVED ...``, ``-CLUSTERDOWN ...``); a value's body is received
by the kernel directly into its destination and checked against its XXH3 trailer there. Any
other reply is a protocol error and the caller drops the connection, so no half-read reply ever
goes back to the pool.

TLS (``rediss://``) sockets cannot be read beneath Python's ``ssl`` layer: the backend reads
those through redis-py (:meth:`RedisBackend.get_into`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from membrain import _native

TRAILER = int(_native.REDIS_TRAILER)  # XXH3-64 of the value, little-endian, after the value


class RespProtocolError(ConnectionError):
    """The server sent something a GET cannot answer; the connection must be dropped."""


def get_batch_into(
    conn: Any, keys: list[bytes], buffers: list[Any], deadline: float
) -> tuple[list[bool], list[bytes]]:
    """``GET keys[i]`` for every key as one pipeline on redis-py connection ``conn`` (plain TCP);
    each value that is exactly ``len(buffers[i])`` plus its trailer is received into
    ``buffers[i]`` and checked against the trailer. Returns (hit per key, the error replies).
    A value of another length leaves its buffer untouched; one that fails its checksum leaves
    it undefined.

    Raises ConnectionError (RespProtocolError included) or TimeoutError when the stream broke
    or the deadline (``time.monotonic()`` seconds) passed: the caller must then
    ``conn.disconnect()``, since replies may be left unread. Buffers are only written before
    this returns or raises."""
    left_ms = math.ceil((deadline - time.monotonic()) * 1000)
    if left_ms <= 0:  # e.g. the connect took it all: send and write nothing
        raise TimeoutError("Redis GET batch ran past its deadline")
    sock = conn._sock  # redis-py connects in ConnectionPool.get_connection
    if sock is None:
        raise ConnectionError("Redis connection is not connected")
    conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]), check_health=False)
    left_ms = max(1, math.ceil((deadline - time.monotonic()) * 1000))
    # The reader gets its own descriptor of the socket: if redis-py closes the connection
    # meanwhile (backend.close()), the socket is shut down (the read ends) but its number
    # cannot be reused for another file under the reader.
    fd = os.dup(sock.fileno())
    try:
        hits, errors, failure, detail = _native.redis_read_gets(fd, buffers, left_ms)
    finally:
        os.close(fd)
    if failure == "timed_out":
        raise TimeoutError(f"Redis GET batch: {detail}")
    if failure == "protocol":
        raise RespProtocolError(f"Redis GET batch: {detail}")
    if failure:
        raise ConnectionError(f"Redis GET batch: {detail}")
    return hits, errors
