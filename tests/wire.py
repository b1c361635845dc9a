"""Pure-Python framing for the Membrain protocol, written from docs/protocol.md (not from the
C++ codec), so the server tests check the server against the spec. Checksums use
membrain.checksum64 (XXH3-64, seed 0)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from membrain import checksum64

MAGIC = 0x4E52424D
VERSION = 1
HEADER = struct.Struct("<IBBHQIIQI")  # without the trailing checksum: 36 bytes
HEADER_BYTES = 40
REPLY = 0x80

HELLO, PUT, GET, EXISTS, LOOKUP_PREFIX, DELETE, STATS, PING = range(1, 9)
(
    OK,
    NOT_FOUND,
    BAD_REQUEST,
    UNAUTHORIZED,
    TOO_LARGE,
    NO_SPACE,
    CHECKSUM_MISMATCH,
    INTERNAL,
    UNSUPPORTED_VERSION,
) = range(9)


def header(
    op: int,
    request_id: int = 0,
    count: int = 0,
    payload_len: int = 0,
    status: int = 0,
    version: int = VERSION,
    flags: int = 0,
    reserved: int = 0,
    magic: int = MAGIC,
) -> bytes:
    body = HEADER.pack(magic, version, op, flags, request_id, count, status, payload_len, reserved)
    return body + struct.pack("<I", checksum64(body) & 0xFFFFFFFF)


@dataclass
class Frame:
    op: int
    request_id: int
    count: int
    status: int
    payload: bytes


def decode_header(b: bytes) -> tuple[int, int, int, int, int]:
    magic, version, op, flags, rid, count, status, plen, reserved = HEADER.unpack(b[:36])
    (ck,) = struct.unpack("<I", b[36:40])
    assert magic == MAGIC and version == VERSION and flags == 0 and reserved == 0, b[:40].hex()
    assert ck == checksum64(b[:36]) & 0xFFFFFFFF, "bad header checksum in reply"
    return op, rid, count, status, plen


def key_list(keys: list[bytes]) -> bytes:
    return b"".join(struct.pack("<H", len(k)) + k for k in keys)


def hello_frame(ns: bytes = b"default", token: bytes = b"", rid: int = 0) -> bytes:
    p = struct.pack("<HH", len(ns), len(token)) + ns + token
    return header(HELLO, rid, 0, len(p)) + p


def put_frame(items: list[tuple[bytes, bytes]], rid: int = 0, checksums: list[int] | None = None) -> bytes:
    table = b"".join(
        struct.pack("<HHIQQ", len(k), 0, 0, len(v), checksums[i] if checksums else checksum64(v))
        for i, (k, v) in enumerate(items)
    )
    p = table + b"".join(k for k, _ in items) + b"".join(v for _, v in items)
    return header(PUT, rid, len(items), len(p)) + p


def keys_frame(op: int, keys: list[bytes], rid: int = 0) -> bytes:
    p = key_list(keys)
    return header(op, rid, len(keys), len(p)) + p


def parse_get(payload: bytes, count: int) -> list[bytes | None]:
    out: list[bytes | None] = []
    pos = 24 * count
    for i in range(count):
        st, vlen, ck = struct.unpack_from("<B7xQQ", payload, 24 * i)
        if st != OK:
            assert st == NOT_FOUND and vlen == 0 and ck == 0
            out.append(None)
            continue
        v = payload[pos : pos + vlen]
        pos += vlen
        assert checksum64(v) == ck, "GET value does not match its checksum"
        out.append(v)
    assert pos == len(payload)
    return out


class WireClient:
    """A blocking test client: one socket, frames in, frames out."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rid = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_id(self) -> int:
        self._rid += 1
        return self._rid

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv_frame(self) -> Frame:
        op, rid, count, status, plen = decode_header(self.recv_exact(HEADER_BYTES))
        return Frame(op, rid, count, status, self.recv_exact(plen))

    def call(self, frame_bytes: bytes) -> Frame:
        self.send(frame_bytes)
        return self.recv_frame()

    # convenience wrappers -------------------------------------------------
    def hello(self, ns: bytes = b"default", token: bytes = b"") -> Frame:
        return self.call(hello_frame(ns, token, self.next_id()))

    def put(self, items: list[tuple[bytes, bytes]]) -> list[int]:
        rid = self.next_id()
        f = self.call(put_frame(items, rid))
        assert f.op == PUT | REPLY and f.request_id == rid and f.status == OK, f
        return list(f.payload)

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        rid = self.next_id()
        f = self.call(keys_frame(GET, keys, rid))
        assert f.op == GET | REPLY and f.request_id == rid and f.status == OK and f.count == len(keys), f
        return parse_get(f.payload, len(keys))

    def exists(self, keys: list[bytes]) -> list[int]:
        f = self.call(keys_frame(EXISTS, keys, self.next_id()))
        assert f.status == OK, f
        return list(f.payload)

    def lookup_prefix(self, keys: list[bytes]) -> int:
        f = self.call(keys_frame(LOOKUP_PREFIX, keys, self.next_id()))
        assert f.status == OK, f
        return struct.unpack("<I", f.payload)[0]

    def delete(self, keys: list[bytes]) -> int:
        f = self.call(keys_frame(DELETE, keys, self.next_id()))
        assert f.status == OK, f
        return struct.unpack("<I", f.payload)[0]

    def stats(self) -> dict:
        import json

        f = self.call(header(STATS, self.next_id()))
        assert f.status == OK, f
        return json.loads(f.payload)

    def ping(self, data: bytes = b"") -> bytes:
        f = self.call(header(PING, self.next_id(), 0, len(data)) + data)
        assert f.status == OK, f
        return f.payload

    def expect_closed(self, timeout: float = 5.0) -> None:
        """The server must close: EOF (or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
