"""tests/support/launcher.py: a CLI process forked from the warm interpreter behaves as the one
`python -m protege_relay.cli` starts, and the launcher falls back to that where it must."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.metrics_registry import MULTIPROC_DIR_ENV
from tests.support import launcher
from tests.support.processes import REPO_ROOT, poll_until, service_env

pytestmark = pytest.mark.timeout(60)
EXIT_TIMEOUT_S = 30
UNREACHABLE_REDIS = "redis://127.0.0.1:9"  # discard port: the egress waits for it, forever


def keygen_twice(directory: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """A relative --out (so the working directory counts), a domain from the environment, a second
    run that must refuse: stdout, stderr and exit codes all show."""
    env = service_env(UNREACHABLE_REDIS, RELAY_MAIL_DOMAINS="launcher.test")
    command = [sys.executable, "-m", "protege_relay.cli", "keygen", "--out", "persona.key"]
    options: dict[str, Any] = {
        "cwd": directory,
        "env": env,
        "capture_output": True,
        "text": True,
        "timeout": EXIT_TIMEOUT_S,
    }
    return launcher.run(command, **options), launcher.run(command, **options)


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def start_waiting_egress(tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / "egress.log").open("wb")
    return launcher.popen(
        [sys.executable, "-m", "protege_relay.cli", "egress"],
        cwd=REPO_ROOT,
        env=service_env(UNREACHABLE_REDIS, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_a_forked_cli_gives_the_same_output_files_and_exit_codes_as_a_fresh_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(launcher.EXEC_ONLY_ENV, raising=False)
    (tmp_path / "warm").mkdir()
    (tmp_path / "exec").mkdir()
    warm = keygen_twice(tmp_path / "warm")
    monkeypatch.setenv(launcher.EXEC_ONLY_ENV, "1")
    fresh = keygen_twice(tmp_path / "exec")
    for first, second in (warm, fresh):
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip().endswith("@launcher.test")
        assert second.returncode == 1 and "refusing to overwrite" in second.stderr
    assert (tmp_path / "warm" / "persona.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "exec" / "persona.key").stat().st_mode & 0o777 == 0o600
    assert warm[1].stderr.replace("warm", "exec") == fresh[1].stderr


def test_a_forked_service_is_signalled_and_reaped_like_a_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launcher.EXEC_ONLY_ENV, raising=False)
    egress = start_waiting_egress(tmp_path)
    assert parent_of(egress.pid) == launcher.zygote_pid()
    assert egress.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        egress.wait(timeout=0.2)
    egress.send_signal(signal.SIGKILL)
    assert egress.wait(timeout=EXIT_TIMEOUT_S) == -signal.SIGKILL
    assert egress.poll() == -signal.SIGKILL


def test_sigterm_ends_a_forked_service_with_its_own_exit_code(tmp_path: Path) -> None:
    egress = start_waiting_egress(tmp_path)
    poll_until(lambda: "127.0.0.1:9" in (tmp_path / "egress.log").read_text(), timeout_s=EXIT_TIMEOUT_S)
    egress.terminate()
    assert egress.wait(timeout=EXIT_TIMEOUT_S) == 0, (tmp_path / "egress.log").read_text()


@pytest.mark.parametrize("why", ["metrics directory", "exec only"])
def test_what_the_warm_interpreter_cannot_be_runs_in_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    env = {}
    if why == "metrics directory":
        env[MULTIPROC_DIR_ENV] = str(tmp_path)  # prometheus_client reads it at import
    else:
        monkeypatch.setenv(launcher.EXEC_ONLY_ENV, "1")
    egress = start_waiting_egress(tmp_path, **env)
    try:
        assert parent_of(egress.pid) == os.getpid()
    finally:
        egress.kill()
        egress.wait(timeout=EXIT_TIMEOUT_S)
