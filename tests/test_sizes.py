"""One size rule everywhere: a size string means the same bytes in every place that takes one."""

from __future__ import annotations

import pytest

from membrain.server import Server
from membrain.server import cli as server_cli
from membrain.utils.sizes import parse_size
from membrain.vllm import config as mcfg

SAMPLES = ["2g", "2G", "2GB", "2GiB", "512MB", "512m", "1.5g", "64KiB", "64kb", "1t", "4096", "0"]


def _everywhere(text: str) -> dict[str, int]:
    """The bytes `text` means to each consumer of a size, through its real entry point."""
    return {
        "utils.sizes": parse_size(text),
        "vllm.config.parse_size": mcfg.parse_size(text),
        "extra_config cpu_cache_size": mcfg.resolve({"cpu_cache_size": text}, env={}).cpu_cache_bytes,
        "VLLM_MEMBRAIN_CPU_CACHE_SIZE": mcfg.resolve(
            {}, env={"VLLM_MEMBRAIN_CPU_CACHE_SIZE": text}
        ).cpu_cache_bytes,
        "membrain server --capacity": server_cli.build_parser().parse_args(["--capacity", text]).capacity,
    }


@pytest.mark.parametrize("text", SAMPLES)
def test_same_string_same_bytes_everywhere(text: str) -> None:
    seen = _everywhere(text)
    assert len(set(seen.values())) == 1, seen


def test_units_are_binary() -> None:
    assert parse_size("2g") == parse_size("2GB") == parse_size("2GiB") == 2 << 30
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("64kb") == 64 << 10


def test_in_process_server_capacity_uses_the_same_rule() -> None:
    with Server(port=0, capacity="3MB", threads=1, prefault=False) as s:
        assert s.stats()["capacity_bytes"] == parse_size("3MiB")


@pytest.mark.parametrize("bad", ["2 parsecs", "-1", "1e9", ""])
def test_bad_size_is_an_error_everywhere(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)
    with pytest.raises(mcfg.ConfigError):
        mcfg.resolve({"cpu_cache_size": bad or "x"}, env={})
    with pytest.raises(SystemExit):
        server_cli.build_parser().parse_args(["--capacity", bad])
