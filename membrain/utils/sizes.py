"""Human-readable byte sizes: ``parse_size("64GiB") == 64 << 30``, ``format_size(1536) == "1.5KiB"``.

This is the one size parser of the package: ``membrain server --capacity``, the in-process
``Server``, ``VLLM_MEMBRAIN_CPU_CACHE_SIZE`` and ``kv_connector_extra_config`` all use it, so a
string means the same bytes everywhere. Every unit is binary, as in the rest of the docs:
``K``/``KB``/``KiB`` = 2**10, ``M``/``MB``/``MiB`` = 2**20, ``G``/``GB``/``GiB`` = 2**30,
``T``/``TB``/``TiB`` = 2**40 (case-insensitive, optional whitespace): ``256MiB``, ``1.5 GiB``,
``4096``, ``2g``. Anything else raises ``ValueError`` naming the offending text.
"""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    # Binary like every other unit here: "2GB" is 2 GiB (one rule, see the module docstring).
    "kb": 1 << 10,
    "mb": 1 << 20,
    "gb": 1 << 30,
    "tb": 1 << 40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parses a size such as ``256MiB`` into bytes. Raises ValueError on bad input."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}: expected a string like '256MiB'")
    m = _PATTERN.match(text)
    if not m:
        raise ValueError(
            f"invalid size {text!r}: expected a number and an optional unit, e.g. '256MiB' or '64GiB'"
        )
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        known = "B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (all binary)"
        raise ValueError(f"invalid size {text!r}: unknown unit {m.group(2)!r} (known: {known})")
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Formats bytes with the largest binary unit that keeps the number >= 1 (``64GiB``, ``1.5KiB``)."""
    if n < 0:
        raise ValueError(f"invalid size {n!r}: must not be negative")
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


__all__ = ["format_size", "parse_size"]
