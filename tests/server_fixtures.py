from __future__ import annotations

import pytest

from membrain.server import Server


@pytest.fixture
def server():
    with Server(port=0, capacity="64MiB", threads=2, idle_timeout=30) as s:
        yield s


@pytest.fixture
def make_server():
    made: list[Server] = []

    def make(**kw) -> Server:
        kw.setdefault("port", 0)
        kw.setdefault("capacity", "64MiB")
        s = Server(**kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(0)
