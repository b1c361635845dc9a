#!/usr/bin/env python3
"""Gather/scatter bandwidth benchmark; same as `membrain bench gather`. See membrain/bench/gather.py."""

import sys

from membrain.bench.gather import main

if __name__ == "__main__":
    sys.exit(main())
