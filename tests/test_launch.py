"""Children that Membrain launches import the installed package, whatever the working directory.

A fresh clone has Membrain's Python sources but no compiled ``_native`` in its tree: a child
started with ``python -m membrain ...`` from the repository root would import that tree and fail
(``make demo`` did). These tests recreate that tree and launch children from it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import membrain
from membrain.bench import common as C
from membrain.server import spawn_server
from membrain.utils.launch import child_env, package_root, python_module_command

INSTALLED = Path(membrain.__file__).resolve().parent


@pytest.fixture
def source_checkout_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory shaped like a clean checkout (membrain/ sources, no extension) as the cwd."""
    shutil.copytree(
        INSTALLED, tmp_path / "membrain", ignore=shutil.ignore_patterns("_native*", "__pycache__")
    )
    assert not list((tmp_path / "membrain").glob("_native*"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_spawned_server_ignores_source_tree_in_cwd(source_checkout_cwd: Path) -> None:
    with spawn_server(capacity="16MiB", extra_args=["--no-prefault"]) as srv:
        assert srv.port > 0
        assert srv.returncode is None


def test_demo_server_starts_from_source_checkout(source_checkout_cwd: Path) -> None:
    log = source_checkout_cwd / "server.log"
    srv = C.start_server("16MiB", log)
    try:
        assert srv is not None, log.read_text()
        assert srv.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        if srv is not None:
            srv.stop()


def test_module_command_runs_installed_cli(source_checkout_cwd: Path) -> None:
    """Importing the copied tree would fail (it has no extension): success proves the child used
    the package this process imported."""
    out = subprocess.run(
        python_module_command("membrain", "--version"),
        cwd=source_checkout_cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == membrain.__version__
    assert Path(package_root()) == INSTALLED.parent
