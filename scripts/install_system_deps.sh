#!/usr/bin/env bash
# Installs the Debian packages Membrain's build, tests and benchmarks use, when they are
# missing and we are allowed to: libucx-dev (UCX transport), redis-server/redis-tools and
# iperf3 (transfer benchmark baselines), prometheus (promtool and the server) and strace, which
# tests/test_deploy.py runs against deploy/. Without root or apt it only reports what is
# missing; the build then leaves UCX out and the benchmarks and deploy checks skip those parts.
set -u
need=()
[ -f /usr/include/ucp/api/ucp.h ] || need+=(libucx-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v promtool >/dev/null || need+=(prometheus)
command -v strace >/dev/null || need+=(strace)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  # The prometheus package would start (and enable) a Prometheus daemon; the tests only need
  # its binaries. policy-rc.d exit 101 tells Debian's maintainer scripts not to start services.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || echo "warning: apt-get install ${need[*]} failed; continuing without them"
  [ -n "$policy" ] && rm -f "$policy"
else
  echo "warning: missing ${need[*]} (not root or no apt-get); UCX, benchmark baselines and deploy checks will be skipped"
fi
exit 0
