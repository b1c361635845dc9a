#!/usr/bin/env bash
# Fast incremental build for development: compiles membrain._native with CMake into
# build/dev-<name> and copies it next to the Python sources, so `PYTHONPATH=. pytest` sees it.
# Usage: scripts/dev_build.sh [build-name] [extra cmake -D flags...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
name="${1:-default}"; shift || true
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
build="$here/build/dev-$name"
pybind_dir="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind_dir" \
  -DPython_EXECUTABLE="$py" -DSKBUILD_PROJECT_VERSION=0.1.0 "$@" >/dev/null
cmake --build "$build" -j "${JOBS:-2}"
# Copy then rename: overwriting the file in place would change the code under any process
# that has it loaded (a running dev server dies with SIGSEGV at its next call into it).
for so in "$build"/_native*.so; do
  cp "$so" "$here/membrain/.$(basename "$so").tmp"
  mv -f "$here/membrain/.$(basename "$so").tmp" "$here/membrain/$(basename "$so")"
done
echo "built $(ls "$here"/membrain/_native*.so)"
