#!/usr/bin/env bash
# GPU acceptance run for the CUDA gather/scatter: build in place, run the tests that need no
# vLLM or server, run the CUDA gather benchmark, collect everything in OUTDIR.
#
# Usage: scripts/gpu_check.sh OUTDIR
# Every step runs under `bash -o pipefail` (pipefail is not inherited by `bash -c`), so a
# failing command is not hidden by its `| tee`.
# Needs (no network): python3 with torch (CUDA), pybind11, numpy, pytest (hypothesis for the
# CPU tests), CMake, nvcc, nvidia-smi; and vllm for the KV-layout tests and benchmark rows (every
# KVCacheLayout, built with vLLM's create_kv_cache_views): without it those skip, saying so. Budget: about 6 minutes; each step has its own timeout.
# Keeps going after a failing step; exits non-zero at the end if any step failed.
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUTDIR}"
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$here"
py="${PYTHON:-python3}"
unset PYTHONPATH
export PYTHONUNBUFFERED=1
# CMake finds nvcc through PATH (or CUDACXX); toolkits often live outside the default PATH.
if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ]; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
fi

names=()
results=()
secs=()
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  names+=("$name"); secs+=($((SECONDS - t0)))
  if [ "$rc" -eq 0 ]; then results+=("ok"); elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then results+=("TIMEOUT"); else results+=("FAIL($rc)"); fi
  echo "=== $name: ${results[-1]} in ${secs[-1]}s ==="
}

# 1. The machine.
step nvidia-smi 30 bash -o pipefail -c "nvidia-smi | tee '$out/nvidia-smi.txt'; nvidia-smi -q > '$out/nvidia-smi-q.txt'"

# 2. Build and install against this machine's torch, without network or build isolation, for
#    this GPU only (keeps the build short). Falls back to sm_90 when the capability is unknown.
cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
arch="${cc:-90}-real"
step build 300 bash -o pipefail -c "MEMBRAIN_CUDA=ON '$py' -m pip install --no-build-isolation --no-deps -v \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES='$arch' -C build-dir=build/gpu . 2>&1 | tee '$out/build.log'"

# 3. What was built and what it sees.
step native-info 60 bash -o pipefail -c "cd '$out' && '$py' -c 'import json, membrain, torch; i = membrain.native_info(); \
i[\"torch\"] = torch.__version__; i[\"torch_cuda\"] = torch.version.cuda; print(json.dumps(i, indent=1)); \
assert i[\"cuda_compiled\"] and i[\"cuda_devices\"] > 0, \"CUDA kernels not compiled or no device visible\"' \
  | tee '$out/native_info.json'"

# 4. Kernel code check: 16-byte loads/stores, no spills (needs cuobjdump; skipped without it).
sass_check() {
  local so; so="$(cd "$out" && "$py" -c 'import membrain._native as n; print(n.__file__)')"
  if ! command -v cuobjdump >/dev/null; then echo "cuobjdump not found: skipped"; return 0; fi
  cuobjdump -res-usage "$so" > "$out/res-usage.txt" 2>&1 || true
  cuobjdump -sass "$so" > "$out/sass.txt" 2>&1 || true
  grep -c "LDG.E.128" "$out/sass.txt" | sed 's/^/LDG.E.128 count: /'
  grep -c "STG.E.*128" "$out/sass.txt" | sed 's/^/STG.E.128 count: /'
  if grep -A1 page_copy "$out/res-usage.txt" | grep -q "LOCAL:[1-9]"; then echo "register spills to local memory"; return 1; fi
  grep -q "LDG.E.128" "$out/sass.txt"
}
export -f sass_check; export out
export py
step sass-check 60 bash -o pipefail -c sass_check

# 5. Tests that need no server (the layout tests build vLLM's views; they skip without vllm).
# test_connector_contract runs the connector's worker path (store blocks, load them into other
# block ids, compare bytes) on CUDA tensors vLLM lays out in every KVCacheLayout.
tests=(tests/test_gather_cuda.py)
for t in tests/test_gather_cpu.py tests/test_host_pool.py tests/test_native_info_and_checksum.py \
  tests/test_connector_contract.py tests/test_ops*.py; do
  [ -f "$t" ] && tests+=("$t")
done
step pytest 200 bash -o pipefail -c "cd '$here/tests' && '$py' -m pytest -c '$here/pyproject.toml' --rootdir '$here' -q -ra -p no:cacheprovider ${tests[*]//tests\//} --junitxml='$out/junit.xml' 2>&1 \
  | tee '$out/pytest.log'"

# 6. The CUDA gather benchmark (quick configs), with its LBNHC, BLNHC and LHBNC layout rows.
step bench 200 bash -o pipefail -c "cd '$out' && '$py' -m membrain.bench.gather_cuda --quick --out '$out/gather_cuda.json' 2>&1 \
  | tee '$out/bench.log'"

# Summary last.
echo
echo "================ gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) ================"
failed=0
for i in "${!names[@]}"; do
  printf '%-12s %-10s %4ss\n' "${names[$i]}" "${results[$i]}" "${secs[$i]}"
  [ "${results[$i]}" = ok ] || failed=1
done
[ -f "$out/pytest.log" ] && echo "pytest: $(tail -1 "$out/pytest.log")"
if [ -f "$out/gather_cuda.json" ]; then
  "$py" - "$out/gather_cuda.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for a in d["acceptance"]:
    print(f"{'PASS' if a['pass'] else 'MISS'}  {a['check']}: {a['value']} (target {a['target']}; {a['at']})")
EOF
fi
echo "outputs in $out"
exit $failed
