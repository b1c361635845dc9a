"""Client choice for the Redis backend: redis-py (pure-Python parser vs hiredis) vs valkey-glide,
pipelined SET / GET of 16 x 1 MiB values on one local redis-server, single caller thread."""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from membrain.bench.redis_local import RedisNode

N, SIZE, SECS = 16, 1 << 20, float(os.environ.get("SECS", "3"))
vals = [os.urandom(SIZE) for _ in range(N)]
keys = [f"k{i}".encode() for i in range(N)]


def rate(fn):
    fn()
    t = time.monotonic()
    n = 0
    while time.monotonic() - t < SECS:
        fn()
        n += 1
    return n * N * SIZE / (time.monotonic() - t) / 1e9


def redis_py(port, parser):
    import redis
    from redis._parsers import _HiredisParser, _RESP2Parser

    kw = {"parser_class": _HiredisParser if parser == "hiredis" else _RESP2Parser}
    r = redis.Redis(connection_pool=redis.ConnectionPool(port=port, **kw))

    def put():
        p = r.pipeline(transaction=False)
        for k, v in zip(keys, vals):
            p.set(k, v)
        p.execute()

    def get():
        p = r.pipeline(transaction=False)
        for k in keys:
            p.get(k)
        assert all(len(x) == SIZE for x in p.execute())

    return put, get


def glide(port):
    sys.path.insert(0, os.environ.get("GLIDE_PATH", "/tmp/glide"))
    from glide import Batch, GlideClient, GlideClientConfiguration, NodeAddress

    loop = asyncio.new_event_loop()
    cfg = GlideClientConfiguration([NodeAddress("127.0.0.1", port)], request_timeout=10000)
    c = loop.run_until_complete(GlideClient.create(cfg))

    def put():
        b = Batch(is_atomic=False)
        for k, v in zip(keys, vals):
            b.set(k, v)
        loop.run_until_complete(c.exec(b, raise_on_error=True))

    def get():
        b = Batch(is_atomic=False)
        for k in keys:
            b.get(k)
        res = loop.run_until_complete(c.exec(b, raise_on_error=True))
        assert all(len(x) == SIZE for x in res)

    return put, get


node = RedisNode()
try:
    steps = {
        "redis-py python parser": redis_py(node.port, "python"),
        "redis-py hiredis": redis_py(node.port, "hiredis"),
    }
    try:
        steps["valkey-glide"] = glide(node.port)
    except Exception as e:
        print("valkey-glide unavailable:", repr(e))
    res = {n: {"SET": [], "GET": []} for n in steps}
    for rnd in range(int(os.environ.get("ROUNDS", "3"))):
        for name, (put, get) in steps.items():
            res[name]["SET"].append(rate(put))
            res[name]["GET"].append(rate(get))
            print(
                f"round {rnd}: {name:24s} SET {res[name]['SET'][-1]:.2f} GB/s  GET {res[name]['GET'][-1]:.2f} GB/s",
                flush=True,
            )
    import statistics

    for name, v in res.items():
        print(
            f"median {name:24s} SET {statistics.median(v['SET']):.2f} GB/s  GET {statistics.median(v['GET']):.2f} GB/s"
        )
finally:
    node.close()
