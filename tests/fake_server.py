"""A tiny in-process Membrain protocol v1 server, for client unit tests only.

It exists only to exercise client paths a correct server never takes: a GET reply whose value
bytes do not match their checksum, and a server that announces a tiny max_batch. Every other
client test runs against the real `membrain server`. Single-namespace, unbounded and slow.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

from membrain import _native

MAGIC = 0x4E52424D
HDR = struct.Struct("<IBBHQIIQI")  # without the trailing checksum


def _header(op: int, rid: int, count: int, status: int, plen: int) -> bytes:
    body = HDR.pack(MAGIC, 1, op, 0, rid, count, status, plen, 0)
    return body + struct.pack("<I", _native.checksum64(body) & 0xFFFFFFFF)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _keys(payload: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(count):
        (klen,) = struct.unpack_from("<H", payload, pos)
        out.append(payload[pos + 2 : pos + 2 + klen])
        pos += 2 + klen
    return out


class FakeServer:
    """Serves protocol v1 on 127.0.0.1 from a dict. ``corrupt_gets`` flips a byte of every
    value sent in GET replies (the checksum stays that of the stored value); ``corrupt_keys``
    does so for those keys only. ``put_status(key)``, when given, chooses each PUT item's
    status (non-zero: not stored). ``hold_first_put_reply`` answers the first PUT frame of a
    connection only after the next request has arrived, so a client that waits for each PUT
    reply before sending its next frame stalls (proving the frames are pipelined).
    ``wrapping_get_lengths`` answers every GET with two hits whose lengths (2**64 - 16 and 32)
    wrap around to a payload_len that matches the 16 bytes sent, as a hostile server might.
    ``short_key_list_replies`` drops the last byte of every EXISTS, LOOKUP_PREFIX and DELETE
    reply body (the header's payload_len still matches what is sent)."""

    def __init__(
        self,
        corrupt_gets: bool = False,
        max_batch: int = 1024,
        on_request: Callable[[int], None] | None = None,
        corrupt_keys: set[bytes] | None = None,
        put_status: Callable[[bytes], int] | None = None,
        hold_first_put_reply: bool = False,
        wrapping_get_lengths: bool = False,
        short_key_list_replies: bool = False,
    ):
        self.store: dict[bytes, tuple[bytes, int]] = {}
        self.corrupt_gets = corrupt_gets
        self.corrupt_keys = corrupt_keys or set()
        self.put_status = put_status
        self.hold_first_put_reply = hold_first_put_reply
        self.wrapping_get_lengths = wrapping_get_lengths
        self.short_key_list_replies = short_key_list_replies
        self.max_batch = max_batch
        self.on_request = on_request
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        self._stop = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        held: bytes | None = None
        hold = self.hold_first_put_reply
        try:
            while True:
                raw = _recv_exact(sock, 40)
                magic, _v, op, _f, rid, count, _s, plen, _r = HDR.unpack(raw[:36])
                assert magic == MAGIC
                payload = _recv_exact(sock, plen) if plen else b""
                if self.on_request:
                    self.on_request(op)
                reply = self._handle(op, rid, count, payload)
                if hold and op == 2:
                    held, hold = reply, False
                    continue
                if held is not None:
                    reply, held = held + reply, None
                sock.sendall(reply)
        except (ConnectionError, OSError, AssertionError):
            sock.close()

    def _handle(self, op: int, rid: int, count: int, payload: bytes) -> bytes:
        rop = op | 0x80
        if op == 1:  # HELLO
            body = struct.pack("<IIIIQQ", 1, self.max_batch, 128, 0, 256 << 20, 1 << 30)
        elif op == 2:  # PUT
            table = [struct.unpack_from("<HHIQQ", payload, 24 * i) for i in range(count)]
            pos = 24 * count
            keys = []
            for klen, *_ in table:
                keys.append(payload[pos : pos + klen])
                pos += klen
            st = bytearray()
            for key, (_k, _a, _b, vlen, cks) in zip(keys, table):
                val = payload[pos : pos + vlen]
                pos += vlen
                if _native.checksum64(val) != cks:
                    st.append(6)
                elif self.put_status and self.put_status(key):
                    st.append(self.put_status(key))
                else:
                    self.store[key] = (val, cks)
                    st.append(0)
            body = bytes(st)
        elif op == 3 and self.wrapping_get_lengths:
            rows = struct.pack("<B7xQQ", 0, (1 << 64) - 16, 0) + struct.pack("<B7xQQ", 0, 32, 0)
            rows += bytes(24 * (count - 2)) if count > 2 else b""
            body = rows + bytes(16)
        elif op == 3:  # GET
            rows, vals = bytearray(), bytearray()
            for key in _keys(payload, count):
                hit = self.store.get(key)
                if hit is None:
                    rows += struct.pack("<B7xQQ", 1, 0, 0)
                else:
                    val, cks = hit
                    if (self.corrupt_gets or key in self.corrupt_keys) and val:
                        val = bytes([val[0] ^ 0xFF]) + val[1:]
                    rows += struct.pack("<B7xQQ", 0, len(val), cks)
                    vals += val
            body = bytes(rows + vals)
        elif op == 4:
            body = bytes(0 if k in self.store else 1 for k in _keys(payload, count))
        elif op == 5:
            n = 0
            for k in _keys(payload, count):
                if k not in self.store:
                    break
                n += 1
            body = struct.pack("<I", n)
        elif op == 6:
            n = sum(1 for k in _keys(payload, count) if self.store.pop(k, None) is not None)
            body = struct.pack("<I", n)
        elif op == 7:
            import json

            used = sum(len(v) for v, _ in self.store.values())
            body = json.dumps(
                {
                    "used_bytes": used,
                    "capacity_bytes": 1 << 30,
                    "items": len(self.store),
                    "hits": 0,
                    "misses": 0,
                    "evictions": 0,
                }
            ).encode()
        elif op == 8:
            body = payload
        else:
            return _header(rop, rid, 0, 2, 0)
        if self.short_key_list_replies and op in (4, 5, 6):
            body = body[:-1]
        return _header(rop, rid, count, 0, len(body)) + body
