"""Membrain: a tiered, distributed KV-cache for vLLM.

Python owns policy (what to store, look up, evict, and where); the native extension
``membrain._native`` owns every byte that moves.
"""

from __future__ import annotations

from typing import Any

from membrain import _native as _native  # explicit re-export: modules import it from here

__version__: str = _native.native_info()["version"]

HostPool = _native.HostPool
Slot = _native.Slot


def native_info() -> dict[str, Any]:
    """Facts about the native build and this machine.

    Keys: ``version``, ``cuda_compiled`` (kernels compiled in), ``cuda_devices`` (usable
    devices now, 0 without a driver), ``cuda_device_names``, ``ucx`` (UCX transport built).
    """
    return dict(_native.native_info())


def checksum64(data: Any, seed: int = 0) -> int:
    """XXH3-64 of a contiguous buffer (bytes, memoryview, numpy array, Slot, ...)."""
    return _native.checksum64(data, seed)


def __getattr__(name: str) -> Any:
    # The client pulls in the transport; import it only when asked for.
    if name == "Client":
        from membrain.client import Client

        return Client
    raise AttributeError(f"module 'membrain' has no attribute {name!r}")


__all__ = ["Client", "HostPool", "Slot", "__version__", "checksum64", "native_info"]
