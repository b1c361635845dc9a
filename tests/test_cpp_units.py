"""Runs the C++ unit tests of the server core (csrc/tests/unit_tests.cpp: slab allocator,
eviction, storage, session). They are built by CMake as `membrain_cpp_tests` into
build/cpp-tests (no Python, no CUDA, no UCX: the core library alone); set MEMBRAIN_CPP_TESTS to
a binary to run that one instead (e.g. a -DMEMBRAIN_SANITIZE=address,undefined build)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _binary() -> Path:
    given = os.environ.get("MEMBRAIN_CPP_TESTS")
    if given:
        return Path(given)
    if shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").exists():
        pytest.skip("cmake or the sources are not available")
    build = ROOT / "build" / "cpp-tests"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DMEMBRAIN_PYTHON=OFF",
        "-DMEMBRAIN_CUDA=OFF", "-DMEMBRAIN_UCX=OFF", "-DSKBUILD_PROJECT_VERSION=0.0.0",
    ]  # fmt: skip
    jobs = os.environ.get("JOBS", "2")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", jobs, "--target", "membrain_cpp_tests"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return build / "membrain_cpp_tests"


def test_cpp_unit_tests():
    r = subprocess.run([str(_binary())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), r.stdout
