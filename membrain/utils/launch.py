"""Launching Membrain's own Python entry points in child processes, independent of the working
directory.

``python -m membrain ...`` puts the working directory first on ``sys.path``: started from a
source checkout it imports the source tree (which has no compiled ``_native`` on a clean clone)
instead of the installed package. Every child Membrain launches goes through
:func:`python_module_command`, which drops that entry before running the module, and
:func:`child_env`, which puts the package this process imported first on ``PYTHONPATH`` so the
child runs the very same code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import membrain

# `python -c` starts with sys.path[0] == "" (the working directory): remove it, then run the
# module as `python -m` would (sys.argv[0] becomes the module's file).
_BOOTSTRAP = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "del sys.argv[0]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def package_root() -> str:
    """The directory that holds the ``membrain`` package this process imported."""
    return os.path.dirname(os.path.dirname(os.path.abspath(membrain.__file__)))


def python_module_command(module: str, *args: str, python: str | None = None) -> list[str]:
    """Argv that runs ``python -m module args`` without importing from the working directory."""
    return [python or sys.executable, "-c", _BOOTSTRAP, module, *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this process's membrain first on PYTHONPATH."""
    out = dict(os.environ if env is None else env)
    parts = [package_root(), *(p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p)]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return out


__all__ = ["child_env", "package_root", "python_module_command"]
