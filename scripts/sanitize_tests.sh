#!/usr/bin/env bash
# The server and client tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of
# membrain._native (`make test` runs it after the suite; CI with it).
#
# Usage: scripts/sanitize_tests.sh PYTHON [pytest args...]
#
# Builds the extension with -DMEMBRAIN_SANITIZE=address,undefined (no CUDA: the kernels cannot run
# here) into build/sanitize, assembles a package copy (the sources plus that extension) under
# build/sanitize/pkg, and runs the subset below with that copy first on PYTHONPATH (servers the
# tests start as child processes import it too) and the ASan runtime preloaded (Python itself is
# not instrumented). Any sanitizer report aborts the process that hit it, so the test fails.
# Leak checking is off: CPython does not free everything at exit.
#
# The subset: every server test except test_server_memory.py (its RSS bounds cannot hold under
# ASan's shadow memory and quarantine), the client tests (the Redis GET reply reader's among
# them: it parses what a server sends), and the C++ unit tests.
set -euo pipefail
py="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build/sanitize"
pybind_dir="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEMBRAIN_SANITIZE=address,undefined \
  -DMEMBRAIN_CUDA=OFF -Dpybind11_DIR="$pybind_dir" -DPython_EXECUTABLE="$py" \
  -DSKBUILD_PROJECT_VERSION=0.1.0 >/dev/null
cmake --build "$build" -j "${JOBS:-2}" --target _native membrain_cpp_tests
pkg="$build/pkg"
rm -rf "$pkg"
mkdir -p "$pkg"
cp -r "$root/membrain" "$pkg/membrain"
rm -f "$pkg"/membrain/_native*.so
cp "$build"/_native*.so "$pkg/membrain/"

# libstdc++ is preloaded too: Python does not link it, and ASan's __cxa_throw interceptor must
# find the real one when it starts (otherwise the first C++ exception aborts the process).
cxx="${CXX:-g++}"
export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
export MEMBRAIN_CPP_TESTS="$build/membrain_cpp_tests"
export MEMBRAIN_SANITIZED=1
cd "$root/tests"
"$py" -c "import membrain._native as n, sys; assert n.__file__.startswith('$pkg'), n.__file__"
files=(test_server_protocol.py test_server_fuzz.py test_server_security.py test_server_storage.py
  test_server_concurrency.py test_server_cli.py test_client_ops.py test_client_faults.py
  test_client_endpoints.py test_redis_direct.py test_cpp_units.py)
exec "$py" -m pytest -c "$root/pyproject.toml" --rootdir "$root" -p no:cacheprovider -q "$@" "${files[@]}"
