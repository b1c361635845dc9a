"""TTFT cold / fresh-instance-warm / local-warm on real vLLM. See membrain/bench/e2e.py."""

import sys

from membrain.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
