#!/usr/bin/env bash
# Installs the Debian packages Membrain's build, tests and benchmarks use, when they are
# missing and we are allowed to: libucx-dev (UCX transport), redis-server/redis-tools and
# iperf3 (transfer benchmark baselines). Without root or apt it only reports what is missing;
# the build then leaves UCX out and the benchmarks skip those baselines.
set -u
need=()
[ -f /usr/include/ucp/api/ucp.h ] || need+=(libucx-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || echo "warning: apt-get install ${need[*]} failed; continuing without them"
else
  echo "warning: missing ${need[*]} (not root or no apt-get); UCX and benchmark baselines will be skipped"
fi
exit 0
