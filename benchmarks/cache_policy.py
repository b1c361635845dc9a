#!/usr/bin/env python3
"""Cache-policy trace replay; same as `membrain bench policy`. See membrain/bench/policy.py."""

import sys

from membrain.bench.policy import main

if __name__ == "__main__":
    sys.exit(main())
