"""The `warden` CLI as an operator meets it: real subprocesses against real servers.

Each test runs the installed CLI (`python -m services.cli`) and reads what a person would: the exit
code, the lines printed, the files left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from services.cli.main import cli
from shared.server import free_port
from tests.gitrepo import make_repo
from tests.processes import ended

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
    opened: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        opened = _let_others_reach(Path(__file__).resolve().parent.parent)
    try:
        yield prefix, workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for path, mode in reversed(opened):
            path.chmod(mode)


def _let_others_reach(checkout: Path) -> list[tuple[Path, int]]:
    """Let the dropped user read this checkout for the test's length: a checkout in a private
    folder (`mktemp -d` makes it 0700) is otherwise unreadable to it, and the command it runs
    fails to import Warden. The checkout itself gets read and search, its parents search only;
    returns the modes to restore."""
    changed: list[tuple[Path, int]] = []
    for path in (checkout, *checkout.parents):
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = mode | stat.S_IXOTH | (stat.S_IROTH if path == checkout else 0)
        if wanted != mode:
            path.chmod(wanted)
            changed.append((path, mode))
    return changed


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
    stop(proc)
    raise AssertionError(f"warden up exited {proc.returncode} before ready:\n{''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> int:
    return ended(proc)


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
            # A job submitted to d (by the same user, from the same relative directory)...
            submitted = warden(
                "submit", "--kind", "only-in-d", "--data-dir", "d", cwd=workdir, env=env, prefix=prefix
            )
            assert submitted.returncode == 0, submitted.stderr
            projected(f"http://127.0.0.1:{first_port}")
            projected(f"http://127.0.0.1:{second_port}")
            with httpx.Client(timeout=10) as http:
                first_status = http.get(f"http://127.0.0.1:{first_port}/api/status").json()
                second_status = http.get(f"http://127.0.0.1:{second_port}/api/status").json()
            # ...is in d's read model and not in e's.
            for data_dir, expected in (("d", 1), ("e", 0)):
                listed = warden(
                    "jobs",
                    "--kind",
                    "only-in-d",
                    "--json",
                    "--data-dir",
                    data_dir,
                    cwd=workdir,
                    env=env,
                    prefix=prefix,
                )
                assert listed.returncode == 0, listed.stderr
                assert json.loads(listed.stdout)["total"] == expected, data_dir
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


def warden(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "services.cli", *args],
        cwd=cwd,
        env=env or warden_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One `warden up` for the tests that only talk to it: (its data dir, its API's base URL)."""
    data_dir = tmp_path_factory.mktemp("deployment") / "d"
    port = free_port()
    proc = start_up([], data_dir.parent, "d", port, warden_env())
    try:
        yield data_dir, f"http://127.0.0.1:{port}"
    finally:
        assert stop(proc) == 0


def projected(api: str) -> None:
    """Wait (with a deadline) until the read model holds every event stored so far."""
    with httpx.Client(base_url=api, timeout=30) as http:
        last = http.get("/api/status").json()["stream_last_event"]
        status = http.get("/api/status", params={"at_least": last, "timeout": 20}).json()
    assert status["position"] >= last, status


def run_one_job(data_dir: Path, tmp_path: Path, kind: str, *command: str) -> str:
    """Submit a job and let `warden agent exec` run `command` for it; returns the job id."""
    repo = make_repo(tmp_path)
    submitted = warden("submit", "--kind", kind, "--repo", str(repo), "--json", "--data-dir", str(data_dir))
    assert submitted.returncode == 0, submitted.stderr
    ran = warden(
        "agent", "exec", "--name", f"agent-{kind}", "--kind", kind, "--jobs", "1", "--data-dir", str(data_dir),
        "--", *command,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    return str(json.loads(submitted.stdout)["job_id"])


UNREACHABLE = "nats://127.0.0.1:1"
A_JOB = "6b0e6d0e-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "--kind", "x"],
        ["explain", A_JOB],
        ["revocations"],
        ["cancel", A_JOB, "--reason", "r"],
        ["agent", "exec", "--name", "fixer", "--nats", UNREACHABLE, "--timeout", "1", "--", "true"],
    ],
    ids=lambda c: c[0] if c[0] != "agent" else "agent exec",
)
def test_a_client_command_gives_up_on_an_unreachable_server_in_one_line_with_exit_4(
    command: list[str],
) -> None:
    if "--nats" not in command:
        command = [*command, "--nats", UNREACHABLE, "--timeout", "1"]
    started = time.monotonic()
    result = warden(*command, timeout=60)  # before: never exited, a warning every 250 ms
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    line = one_line(result.stderr)
    assert UNREACHABLE in line and "within 1s" in line and "--nats" in line
    assert elapsed < 30  # 1 s of trying plus interpreter start-up, with a loaded machine's slack


def test_warden_timeout_comes_from_the_environment_too() -> None:
    result = warden("revocations", "--nats", UNREACHABLE, env=warden_env(WARDEN_TIMEOUT="0.5"))
    assert result.returncode == 4
    assert "within 0.5s" in one_line(result.stderr)


def test_an_http_url_given_as_the_nats_server_is_a_usage_error_naming_the_fix() -> None:
    result = warden("submit", "--kind", "x", "--nats", "http://127.0.0.1:8765")
    assert result.returncode == 2
    assert "nats://" in one_line(result.stderr)


def test_a_job_agent_or_proposal_that_is_not_in_the_record_exits_3(deployment: tuple[Path, str]) -> None:
    data_dir, _url = deployment
    for command in (
        ["explain", A_JOB],
        ["cancel", A_JOB, "--reason", "typo"],
        ["requeue", A_JOB, "--reason", "typo"],
        ["revoke", "ghost", "--reason", "typo"],
        ["rollback", str(uuid.uuid4()), "--reason", "typo"],
    ):
        result = warden(*command, "--data-dir", str(data_dir))
        assert result.returncode == 3, (command, result.stdout, result.stderr)
        assert "traceback" not in result.stderr.lower()


def test_a_refused_operator_command_exits_1_and_a_bad_id_exits_2(deployment: tuple[Path, str]) -> None:
    data_dir, _url = deployment
    submitted = warden("submit", "--kind", "noop", "--json", "--data-dir", str(data_dir))
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job_id"]
    assert warden("requeue", job, "--reason", "not dead", "--data-dir", str(data_dir)).returncode == 1
    bad = warden("cancel", "not-a-uuid", "--reason", "r", "--data-dir", str(data_dir))
    assert bad.returncode == 2 and "not a job id" in one_line(bad.stderr)


def test_a_busy_http_port_is_one_line_and_exit_1_and_a_traceback_only_with_v(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = warden("up", "--data-dir", str(tmp_path / "d"), "--http", f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in one_line(result.stderr)
        verbose = warden("-v", "up", "--data-dir", str(tmp_path / "d"), "--http", f"127.0.0.1:{port}")
        assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert not (tmp_path / "d" / "server.json").exists()  # and the owner's lock was let go:
    assert warden("up", "--data-dir", str(tmp_path / "d"), "--http", "nonsense").returncode == 2


def test_an_unknown_telemetry_exporter_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = warden(
        "up",
        "--data-dir",
        str(tmp_path / "d"),
        "--http",
        "127.0.0.1:0",
        env=warden_env(WARDEN_OTEL_EXPORTER="bogus"),
    )
    assert result.returncode == 2
    assert "WARDEN_OTEL_EXPORTER 'bogus'" in one_line(result.stderr)


def test_a_bad_agent_name_is_one_line_and_exit_2() -> None:
    result = warden("agent", "exec", "--name", "bad name", "--nats", UNREACHABLE, "--", "true")
    assert result.returncode == 2
    assert "agent name 'bad name'" in one_line(result.stderr)


def _commands(group: click.Group, path: str = "warden") -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(group, info_name=path)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)  # loads its module, as naming it on the command line does
        assert command is not None, name
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")


def test_every_option_of_every_command_has_help_and_only_promote_and_demote_take_a_level() -> None:
    assert {"warden jobs", "warden agent exec", "warden status", "warden cancel"} <= {
        p for p, _ in _commands(cli)
    }
    missing_help = [
        f"{path} {option.opts[0]}"
        for path, command in _commands(cli)
        for option in command.params
        if isinstance(option, click.Option) and not option.help
    ]
    assert missing_help == []
    with_level = sorted(
        path
        for path, command in _commands(cli)
        if any("--level" in p.opts for p in command.params if isinstance(p, click.Option))
    )
    # (agents filters by level, submit requires one; of the operator commands only these two set one)
    assert with_level == ["warden agents", "warden demote", "warden promote", "warden submit"]


def test_warden_version_names_the_installed_version() -> None:
    from importlib.metadata import version

    result = warden("--version")
    assert result.returncode == 0 and version("warden") in result.stdout


def test_one_warden_up_owns_a_data_dir_and_a_kill_9_of_it_frees_the_lock(tmp_path: Path) -> None:
    env = warden_env()
    owner = start_up([], tmp_path, "d", free_port(), env)
    data_dir = tmp_path / "d"
    try:
        state = json.loads((data_dir / "server.json").read_text())
        config = (data_dir / "nats" / "nats-server.conf").read_text()
        assert (data_dir / "warden.lock").read_text().strip() == str(owner.pid)

        second = warden("up", "--data-dir", str(data_dir), "--http", "127.0.0.1:0", env=env)
        assert second.returncode == 1
        assert f"in use by warden pid {owner.pid}" in one_line(second.stderr)

        joined = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "revoker", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            assert joined.stdout is not None
            ready = joined.stdout.readline()  # bounded by the pytest timeout
            assert f"revoker on {state['url']} (joined warden pid {owner.pid}" in ready
        finally:
            assert stop(joined) == 0
        # The owner's server, its config and its server.json are untouched by the joiner.
        assert json.loads((data_dir / "server.json").read_text()) == state
        assert (data_dir / "nats" / "nats-server.conf").read_text() == config
        orphan = int((data_dir / "nats" / "nats-server.pid").read_text())

        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        successor = start_up([], tmp_path, "d", free_port(), env)
        try:
            assert (data_dir / "warden.lock").read_text().strip() == str(successor.pid)
            fresh = json.loads((data_dir / "server.json").read_text())
            assert fresh["pid"] == successor.pid
            # The killed owner's nats-server was stopped before a new one opened the store.
            assert not Path(f"/proc/{orphan}").exists()
            assert int((data_dir / "nats" / "nats-server.pid").read_text()) != orphan
        finally:
            assert stop(successor) == 0
    finally:
        stop(owner)
    assert not (data_dir / "server.json").exists()


def test_warden_jobs_lists_filters_and_pages_from_the_read_model(deployment: tuple[Path, str]) -> None:
    data_dir, api = deployment
    kind = f"listed-{uuid.uuid4().hex[:6]}"
    made = []
    for _ in range(3):
        submitted = warden("submit", "--kind", kind, "--json", "--data-dir", str(data_dir))
        made.append(json.loads(submitted.stdout)["job_id"])
    projected(api)
    listed = warden("jobs", "--kind", kind, "--state", "queued", "--json", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    body = json.loads(listed.stdout)
    assert body["total"] == 3 and sorted(j["job_id"] for j in body["items"]) == sorted(made)
    second = json.loads(
        warden(
            "jobs", "--kind", kind, "--limit", "2", "--page", "2", "--json", "--data-dir", str(data_dir)
        ).stdout
    )
    assert len(second["items"]) == 1 and second["offset"] == 2
    assert (
        json.loads(
            warden(
                "jobs", "--kind", kind, "--state", "completed", "--json", "--data-dir", str(data_dir)
            ).stdout
        )["total"]
        == 0
    )
    future = json.loads(
        warden(
            "jobs", "--kind", kind, "--since", "2999-01-01T00:00:00", "--json", "--data-dir", str(data_dir)
        ).stdout
    )
    recent = json.loads(
        warden("jobs", "--kind", kind, "--since", "1h", "--json", "--data-dir", str(data_dir)).stdout
    )
    assert future["total"] == 0 and recent["total"] == 3
    text = warden("jobs", "--kind", kind, "--data-dir", str(data_dir))
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["JOB", "KIND", "STATE"] and len(lines) == 4
    assert "{" not in text.stdout  # a table, not reprs
    bad = warden("jobs", "--since", "yesterday-ish", "--data-dir", str(data_dir))
    assert bad.returncode == 2


def test_warden_logs_shows_each_attempts_output_and_agents_lists_the_agent(
    deployment: tuple[Path, str], tmp_path: Path
) -> None:
    data_dir, api = deployment
    job = run_one_job(
        data_dir,
        tmp_path,
        "echo",
        sys.executable,
        "-c",
        "print('hello from the agent'); import sys; sys.stderr.write('a warning'); sys.exit(3)",
    )
    shown = warden("logs", job[:8], "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert "attempt 1 by agent-echo" in shown.stdout and "exited 3" in shown.stdout
    assert "hello from the agent" in shown.stdout and "a warning" in shown.stdout
    as_json = json.loads(warden("logs", job, "--json", "--data-dir", str(data_dir)).stdout)
    assert as_json["attempts"][0]["outputs"][0]["stdout"] == "hello from the agent\n"
    missing = warden("logs", str(uuid.uuid4()), "--data-dir", str(data_dir))
    assert missing.returncode == 3 and "no events for job" in one_line(missing.stderr)

    projected(api)
    agents = json.loads(warden("agents", "--json", "--data-dir", str(data_dir)).stdout)
    row = next(a for a in agents["items"] if a["name"] == "agent-echo")
    assert row["leases"] == 1 and row["standing"] == "active"
    assert "agent-echo" in warden("agents", "--data-dir", str(data_dir)).stdout
    # Shell completion offers job ids from the read model.
    completion = subprocess.run(
        [sys.executable, "-m", "services.cli"],
        env={**warden_env(WARDEN_DATA_DIR=str(data_dir)), "_WARDEN_COMPLETE": "bash_complete", "COMP_WORDS": f"warden logs {job[:6]}", "COMP_CWORD": "2"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"plain,{job}" in completion.stdout.splitlines()


def test_warden_status_reports_each_service_its_backlog_and_the_read_model(
    deployment: tuple[Path, str],
) -> None:
    data_dir, api = deployment
    warden("submit", "--kind", "status-probe", "--data-dir", str(data_dir))
    projected(api)
    result = warden("status", "--json", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(s["alive"] for s in report["services"].values())
    assert set(report["services"]) >= {
        "scheduler",
        "reconciler",
        "checker",
        "revoker",
        "applier",
        "projector",
        "api",
    }
    assert {c["durable"] for c in report["consumers"]} == {"scheduler", "reconciler", "checker", "revoker"}
    model = report["read_model"]
    assert model["queued_jobs"] >= 1 and model["oldest_queued"]["state"] == "queued"
    assert str(data_dir / "projections.sqlite") in model["store"]
    text = warden("status", "--data-dir", str(data_dir)).stdout
    assert (
        "service   scheduler   alive" in text and "consumer  scheduler" in text and "queued; oldest" in text
    )


def test_warden_status_on_a_server_without_services_says_which_are_down_and_exits_1(tmp_path: Path) -> None:
    from shared.server import EmbeddedServer

    with EmbeddedServer(store_dir=tmp_path / "bare") as server:
        result = warden("status", "--nats", server.url, "--data-dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "service   scheduler   down   NO ANSWER" in result.stdout
    assert "no read model at" in result.stdout


def test_lists_without_a_read_model_say_where_they_looked_and_exit_4(tmp_path: Path) -> None:
    result = warden("jobs", "--data-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 4
    assert str(tmp_path / "nothing-here" / "projections.sqlite") in one_line(result.stderr)
    assert not (tmp_path / "nothing-here").exists()  # reading created nothing


def test_warden_demo_without_keep_prints_plain_text_no_dead_url_and_removes_its_folder(
    tmp_path: Path,
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = warden_env(TMPDIR=str(scratch))
    result = warden("demo", "--http", f"127.0.0.1:{free_port()}", env=env, timeout=300)
    assert result.returncode in (0, 1), result.stderr
    assert "{'" not in result.stdout and "': " not in result.stdout  # no Python reprs
    assert "http://" not in result.stdout  # the dashboard is gone when this prints
    assert "guarantees" in result.stdout and "jobs: " in result.stdout
    if result.returncode == 0:
        assert list(scratch.iterdir()) == []  # the demo's folder, agents' workspaces included
    else:  # a failed guarantee keeps the evidence, and says where
        (kept,) = list(scratch.iterdir())
        assert f"data kept in {kept / 'warden'}" in result.stdout


def test_warden_demo_keep_prints_its_urls_and_other_commands_find_its_server(tmp_path: Path) -> None:
    env = warden_env(TMPDIR=str(tmp_path))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--jobs",
            "3",
            "--keep",
            "--http",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        printed: dict[str, str] = {}
        for line in proc.stdout:  # bounded by the pytest timeout
            name, sep, value = line.partition(":")
            if sep and name in ("NATS", "dashboard", "data dir", "operator token"):
                printed[name] = value.split()[0]
            if line.startswith("--keep:"):
                break
        assert printed["dashboard"] == f"http://127.0.0.1:{port}/"
        data_dir = Path(printed["data dir"])
        state = json.loads((data_dir / "server.json").read_text())
        assert state["url"] == printed["NATS"] and state["pid"] == proc.pid
        with httpx.Client(timeout=10) as http:
            assert http.get(printed["dashboard"]).status_code == 200
            # The printed token acts, so the dashboard's buttons work in the demo; none is refused.
            api = printed["dashboard"].rstrip("/")
            body = {"agent": "ghost-of-the-demo", "reason": "trying the token"}
            assert http.post(f"{api}/api/operator/suspend", json=body).status_code == 401
            answer = http.post(
                f"{api}/api/operator/suspend",
                json=body,
                headers={"Authorization": f"Bearer {printed['operator token']}"},
            )
            assert answer.status_code == 422, answer.text  # authenticated: refused for the unknown agent
            assert "ghost-of-the-demo" in answer.text
            assert (data_dir / "operator-token").read_text().strip() == printed["operator token"]
        listed = warden("jobs", "--json", "--data-dir", str(data_dir), env=env)
        assert listed.returncode == 0 and json.loads(listed.stdout)["total"] == 3
        assert warden("status", "--data-dir", str(data_dir), env=env).returncode == 0
    finally:
        code = ended(proc, timeout=60)
    assert code in (0, 1)  # stopped cleanly (1: a guarantee failed, as three jobs may not exercise all)
    assert not (data_dir / "server.json").exists()
