#!/usr/bin/env bash
# Runs the whole suite against the installed package. Invoked as `make test` (and so by CI).
# pytest runs from tests/ so that `import membrain` resolves to the installed package, never
# to the source tree (which has no compiled extension on a clean checkout).
set -euo pipefail
py="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/tests"
exec "$py" -m pytest -c "$root/pyproject.toml" --rootdir "$root" "$@" .
