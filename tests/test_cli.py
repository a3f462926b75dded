"""The `warden` CLI as an operator meets it: real subprocesses against real servers.

Each test runs the installed CLI (`python -m services.cli`) and reads what a person would: the exit
code, the lines printed, the files left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.server import free_port

NOBODY = 65534


@pytest.fixture
def unprivileged() -> Iterator[tuple[list[str], Path]]:
    """A command prefix that runs as a non-root user, and a working directory that user owns.

    As root the command drops to `nobody` with setpriv; as anyone else it already runs unprivileged.
    The directory is outside pytest's tmp_path, which is private to the user running the suite.
    """
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop to a non-root user")
    workdir = Path(tempfile.mkdtemp(prefix="warden-nonroot-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    try:
        yield prefix, workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def warden_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no server, read model or data dir chosen by the suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    env.update(extra)
    return env


def start_up(
    prefix: list[str], cwd: Path, data_dir: str, port: int, env: dict[str, str]
) -> subprocess.Popen[str]:
    """`warden up` as a subprocess, returned once it prints its ready line."""
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--data-dir",
            data_dir,
            "--http",
            f"127.0.0.1:{port}",
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:  # bounded by the pytest timeout; ends if the process dies
        seen.append(line)
        if "warden ready" in line:
            return proc
    proc.wait(timeout=10)
    raise AssertionError(f"warden up exited {proc.returncode} before ready:\n{''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> int:
    proc.terminate()
    return proc.wait(timeout=30)


def test_a_non_root_user_runs_warden_up_with_a_relative_data_dir_and_every_file_lands_inside_it(
    unprivileged: tuple[list[str], Path],
) -> None:
    prefix, workdir = unprivileged
    env = warden_env(HOME=str(workdir))
    first_port, second_port = free_port(), free_port()
    first = start_up(prefix, workdir, "d", first_port, env)
    try:
        second = start_up(prefix, workdir, "e", second_port, env)
        try:
            with httpx.Client(timeout=10) as http:
                first_status = http.get(f"http://127.0.0.1:{first_port}/api/status").json()
                second_status = http.get(f"http://127.0.0.1:{second_port}/api/status").json()
        finally:
            assert stop(second) == 0
    finally:
        assert stop(first) == 0
    assert first_status["store"] == f"sqlite:///{workdir / 'd' / 'projections.sqlite'}"
    assert second_status["store"] == f"sqlite:///{workdir / 'e' / 'projections.sqlite'}"
    assert (workdir / "d" / "projections.sqlite").is_file()
    assert (workdir / "d" / "nats" / "jetstream").is_dir()
    # Nothing written beside the data directories (the working directory holds only d and e).
    assert sorted(p.name for p in workdir.iterdir()) == ["d", "e"]
