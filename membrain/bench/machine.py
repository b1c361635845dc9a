"""Facts about the machine a benchmark ran on, stored beside every result."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        import membrain

        info["membrain"] = membrain.native_info()
    except Exception as exc:  # a benchmark still records where it ran
        info["membrain"] = {"error": str(exc)}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_tag(info: dict[str, Any]) -> str:
    """Short file-name-safe tag: GPU name when there is one, else cores and CPU family."""
    import re

    name = info.get("gpu_name") or f"{info.get('cpu_cores')}core-{info.get('cpu_model', 'cpu')}"
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.I)  # "Intel(R) Xeon(R)" -> "Intel Xeon"
    return re.sub(r"-+", "-", "".join(c if c.isalnum() else "-" for c in name)).strip("-").lower()[:60]
