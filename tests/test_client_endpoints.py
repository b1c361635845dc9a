"""Endpoint parsing and rendezvous placement (no server needed)."""

from __future__ import annotations

import collections

import pytest

import membrain
from membrain.client import Endpoint, parse_endpoint, parse_endpoints
from membrain.client.breaker import CircuitBreaker
from membrain.client.placement import Rendezvous


def test_parse_valid() -> None:
    assert parse_endpoint("tcp://127.0.0.1:7400") == Endpoint("127.0.0.1", 7400)
    assert parse_endpoint("http://localhost:80") == Endpoint("localhost", 80)
    assert parse_endpoint("tcp://[::1]:9/") == Endpoint("::1", 9)
    assert str(parse_endpoint("HTTP://h:1")) == "tcp://h:1"
    assert parse_endpoints("tcp://a:1, tcp://b:2") == [Endpoint("a", 1), Endpoint("b", 2)]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "localhost:7400",
        "tcp://host",
        "tcp://:7400",
        "udp://h:1",
        "tcp://h:0",
        "tcp://h:70000",
        "tcp://h:12ab",
        "tcp://h:1/path",
        "tcp://a b:1",
        "tcp//h:1",
    ],
)
def test_parse_invalid(bad: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(bad)


def test_parse_list_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        parse_endpoints([])
    with pytest.raises(ValueError, match="duplicate"):
        parse_endpoints(["tcp://a:1", "http://a:1"])
    with pytest.raises(ValueError):
        membrain.Client("tcp://a:1", replicas=2)
    with pytest.raises(ValueError, match="namespace"):
        membrain.Client("tcp://a:1", namespace="bad ns")


def test_rendezvous_even_and_stable() -> None:
    names = [f"tcp://h{i}:1" for i in range(3)]
    r = Rendezvous(names)
    counts = collections.Counter(r.owners(f"key-{i}".encode(), 1)[0] for i in range(3000))
    assert all(800 < counts[i] < 1200 for i in range(3)), counts
    # Order of the endpoint list does not matter; removing a server only moves its keys.
    r2 = Rendezvous(list(reversed(names)))
    for i in range(200):
        k = f"key-{i}".encode()
        assert names[r.owners(k, 1)[0]] == list(reversed(names))[r2.owners(k, 1)[0]]
        two = r.owners(k, 2)
        assert len(set(two)) == 2
    r3 = Rendezvous(names[:2])
    for i in range(500):
        k = f"key-{i}".encode()
        if r.owners(k, 1)[0] != 2:
            assert r3.owners(k, 1)[0] == r.owners(k, 1)[0]


def test_breaker_backoff() -> None:
    b = CircuitBreaker(base_s=0.05, max_s=0.2)
    assert b.admit() == "closed"
    b.failure()
    assert b.admit() == "open"
    b.failure()  # a second in-flight failure does not escalate
    assert b.retry_in() <= 0.05
    import time

    time.sleep(0.06)
    assert b.admit() == "probe"
    assert b.admit() == "open"  # only one probe at a time
    b.failure(probe=True)  # a failed probe doubles the backoff
    assert 0.05 < b.retry_in() <= 0.1
    time.sleep(0.11)
    assert b.admit() == "probe"
    b.success()
    assert b.admit() == "closed"
