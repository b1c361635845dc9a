#!/usr/bin/env python3
"""PUT/GET bandwidth of Membrain vs. loopback TCP and Redis; see membrain/bench/transfer.py.
Same as `membrain bench transfer [options]`."""

import sys

from membrain.bench.transfer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
