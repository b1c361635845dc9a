"""Test doubles used by several test modules (not a test module itself)."""

from __future__ import annotations

import threading
from concurrent.futures import Future


class FakeClient:
    """Dict-backed stand-in for membrain.Client (unit tests of the tier policy only)."""

    def __init__(self, fail: bool = False) -> None:
        self.data: dict[bytes, bytes] = {}
        self.fail = fail
        self.lookups = 0
        self.timeouts: list[int | None] = []  # timeout_ms of every get_into / put_async
        self.gate: threading.Event | None = None  # when set, lookups and gets wait for it

    def lookup_prefix(self, keys):
        self.lookups += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise ConnectionError("down")
        n = 0
        for k in keys:
            if k not in self.data:
                break
            n += 1
        return n

    def get_into(self, keys, bufs, timeout_ms=None):
        self.timeouts.append(timeout_ms)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise TimeoutError("down")
        out = []
        for k, b in zip(keys, bufs):
            v = self.data.get(k)
            if v is None:
                out.append(False)
                continue
            memoryview(b).cast("B")[: len(v)] = v
            out.append(True)
        return out

    def put_async(self, keys, values, timeout_ms=None):
        self.timeouts.append(timeout_ms)
        f: Future = Future()

        def run():
            if self.fail:
                f.set_exception(ConnectionError("down"))
                return
            for k, v in zip(keys, values):
                self.data[k] = bytes(memoryview(v).cast("B"))
            f.set_result([True] * len(keys))

        threading.Thread(target=run).start()
        return f

    def close(self):
        pass
