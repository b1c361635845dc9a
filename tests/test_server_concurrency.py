"""Many client threads doing mixed operations; every GET is compared byte for byte."""

from __future__ import annotations

import hashlib
import random
import threading

from wire import OK, WireClient


def _value(tid: int, i: int, gen: int) -> bytes:
    size = [0, 1, 100, 4096, 65536, 300000][(tid + i + gen) % 6]
    seed = hashlib.blake2b(b"%d/%d/%d" % (tid, i, gen)).digest()
    return (seed * (size // len(seed) + 1))[:size]


def test_many_threads_mixed_ops(make_server):
    s = make_server(capacity="256MiB", threads=2)
    errors: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        mine: dict[bytes, bytes] = {}
        try:
            with WireClient(s.port) as c:
                c.hello(b"t%d" % (tid % 3))  # some threads share a namespace, with disjoint keys
                for step in range(120):
                    op = rng.random()
                    keys = [b"%d:%d" % (tid, rng.randrange(40)) for _ in range(rng.randrange(1, 9))]
                    keys = list(dict.fromkeys(keys))
                    if op < 0.4:
                        items = [(k, _value(tid, step, j)) for j, k in enumerate(keys)]
                        st = c.put(items)
                        if st != [OK] * len(items):
                            errors.append(f"put {st}")
                        mine.update(items)
                    elif op < 0.8:
                        got = c.get(keys)
                        for k, v in zip(keys, got):
                            if v != mine.get(k):
                                errors.append(
                                    f"thread {tid} key {k!r}: got {None if v is None else len(v)} bytes"
                                )
                    elif op < 0.9:
                        n = c.delete(keys)
                        if n != sum(k in mine for k in keys):
                            errors.append("delete count")
                        for k in keys:
                            mine.pop(k, None)
                    else:
                        ex = c.exists(keys)
                        if ex != [OK if k in mine else 1 for k in keys]:
                            errors.append("exists")
        except Exception as e:
            errors.append(f"thread {tid}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    st = s.stats()
    assert st["evictions"] == 0 and st["protocol_errors"] == 0
