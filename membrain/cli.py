"""The `membrain` command: `membrain server`, `membrain stats`, `membrain demo`, `membrain bench ...`.

Each subcommand lives in its own module and is imported only when used, so `membrain server`
never pays for importing torch or vLLM.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("membrain.server.cli", "run a Membrain server (the remote tier)"),
    "stats": ("membrain.stats_cli", "usage, hit ratio and traffic of running servers (--watch to follow)"),
    "demo": ("membrain.demo", "two fresh vLLM instances share a long prefix through Membrain"),
    "bench gather": ("membrain.bench.gather", "gather/scatter bandwidth vs. memcpy and torch"),
    "bench transfer": ("membrain.bench.transfer", "PUT/GET bandwidth vs. loopback TCP and Redis"),
    "bench compression": (
        "membrain.bench.compression",
        "zstd wire compression on real KV: ratio, GB/s, break-even",
    ),
    "bench policy": (
        "membrain.bench.policy",
        "replay a request trace against the real eviction policies: prefix hit ratio vs capacity",
    ),
    "bench e2e": ("membrain.bench.e2e", "vLLM time-to-first-token: cold, Membrain-warm, local-warm"),
    "bench stall": ("membrain.bench.stall", "decode inter-token gaps while a long prefix loads"),
}


def _usage() -> str:
    lines = ["usage: membrain COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `membrain COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from membrain import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage())
            return 0 if rest else 2
        name, rest = f"bench {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"membrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
