"""Start `python -m protege_relay.cli ...` for a test at a fraction of the CPU.

Each such start costs about 0.45 CPU-seconds, nearly all of it importing redis-py, websockets,
dnspython and the rest; the non-system tests start about 120 of them, a third of the CPU
`make test-fast` has on two cores. `popen` and `run` here fork them from a warm interpreter
instead (tests/support/zygote.py, one per test process). The child is still a process of its
own, running the same `protege_relay.cli.main(argv)` with the test's environment, working
directory and descriptors, so its signals, exit code, sockets and /proc figures are those of the
process an operator starts. What it hands back is a `subprocess.Popen` in every respect a test
uses (pipes, `communicate`, `poll`, `wait`, signals); only how the child comes to be, and how
its exit status is collected (the zygote reaps it and reports), differ.

A fresh interpreter is still used where the warm one would not be the same: any command other
than `python -m protege_relay.cli`, options a fork cannot honour, an environment that sets
PROMETHEUS_MULTIPROC_DIR (prometheus_client chooses its storage at import), and every launch
when PROTEGE_TEST_EXEC=1 is set, which runs the suite the plain way to show that both agree.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.metrics_registry import MULTIPROC_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
EXEC_ONLY_ENV = "PROTEGE_TEST_EXEC"
CLI_PREFIX = (sys.executable, "-m", "protege_relay.cli")
MAX_MESSAGE_BYTES = 1 << 16
READ_SLICE_S = 0.05
# Options a forked child honours as Popen would; any other non-default option means a real exec.
WARM_OPTIONS = frozenset(
    {"env", "cwd", "stdin", "stdout", "stderr", "pass_fds", "text", "encoding", "errors", "close_fds", "bufsize"}
)


def popen(args: Sequence[str], **options: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(args, **options)`, forked from the warm interpreter when it can be."""
    if _warm_eligible(args, options):
        return _WarmPopen(list(args), **options)
    return subprocess.Popen(list(args), **options)


def run(
    args: Sequence[str],
    *,
    input: str | bytes | None = None,
    timeout: float | None = None,
    capture_output: bool = False,
    check: bool = False,
    **options: Any,
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run` over `popen`, with its `input`, `timeout`, `capture_output` and `check`."""
    if capture_output:
        options.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        options["stdin"] = subprocess.PIPE
    with popen(args, **options) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        completed.check_returncode()
    return completed


def zygote_pid() -> int:
    """The warm interpreter's pid: the parent of every process `popen` forked."""
    return _zygote().process.pid


def _warm_eligible(args: Sequence[str], options: dict[str, Any]) -> bool:
    if os.environ.get(EXEC_ONLY_ENV) == "1":
        return False
    if tuple(args[: len(CLI_PREFIX)]) != CLI_PREFIX or not set(options) <= WARM_OPTIONS:
        return False
    if options.get("close_fds", True) is not True:
        return False
    env = options.get("env")
    return MULTIPROC_DIR_ENV not in (os.environ if env is None else env)


class _WarmPopen(subprocess.Popen[Any]):
    """A Popen whose child the zygote forks and reaps; the pipes and everything else are Popen's."""

    def _execute_child(
        self,
        args: list[str],
        executable: object,
        preexec_fn: object,
        close_fds: bool,
        pass_fds: Sequence[int],
        cwd: str | os.PathLike[str] | None,
        env: dict[str, str] | None,
        startupinfo: object,
        creationflags: int,
        shell: bool,
        p2cread: int,
        p2cwrite: int,
        c2pread: int,
        c2pwrite: int,
        errread: int,
        errwrite: int,
        *_rest: object,
    ) -> None:
        # -1: the child shares the test process's own descriptor, as a Popen child would.
        descriptors = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1]
        descriptors.append(errwrite if errwrite != -1 else 2)
        try:
            self.pid = _zygote().spawn(
                argv=args[len(CLI_PREFIX) :],
                env=dict(os.environ if env is None else env),
                cwd=os.fspath(cwd) if cwd is not None else os.getcwd(),
                descriptors=[*descriptors, *pass_fds],
                targets=[0, 1, 2, *pass_fds],
            )
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]

    def _internal_poll(self, _deadstate: int | None = None, **_unused: object) -> int | None:
        if self.returncode is None:
            status = _zygote().exit_status(self.pid, wait_s=0)
            if status is not None:
                self._handle_exitstatus(status)  # type: ignore[attr-defined]
        return self.returncode

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        status = _zygote().exit_status(self.pid, wait_s=0 if wait_flags & os.WNOHANG else None)
        return (0, 0) if status is None else (self.pid, status)


class _Zygote:
    """One warm interpreter per test process, spoken to over a SOCK_SEQPACKET socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != MULTIPROC_DIR_ENV}
        env["PYTHONPATH"] = str(REPO_ROOT)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        theirs.close()
        self.channel = ours
        self.owner_pid = os.getpid()
        self.lock = threading.Lock()
        self.exits: dict[int, int] = {}

    def spawn(
        self, *, argv: list[str], env: dict[str, str], cwd: str, descriptors: list[int], targets: list[int]
    ) -> int:
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "targets": targets}).encode()
        with self.lock:
            socket.send_fds(self.channel, [request], descriptors)
            while True:
                reply = self._read(timeout_s=None)
                assert reply is not None
                if "pid" in reply:
                    return int(reply["pid"])

    def exit_status(self, pid: int, *, wait_s: float | None) -> int | None:
        """The raw wait status of `pid` once it has ended; None while it runs (after `wait_s`)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        if deadline is None and self.channel.fileno() == -1:
            raise RuntimeError(f"pid {pid}: the test zygote was already closed, so its exit cannot be known")
        while True:
            with self.lock:
                if pid in self.exits:
                    return self.exits.pop(pid)
                remaining = READ_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
                self._read(timeout_s=min(remaining, READ_SLICE_S))
                if pid in self.exits:
                    return self.exits.pop(pid)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _read(self, *, timeout_s: float | None) -> dict[str, Any] | None:
        """One message (exits are filed as they come); None if none came within the timeout."""
        if self.channel.fileno() == -1:
            return None  # closed at exit; a Popen finalised after that learns nothing more
        readable, _, _ = select.select([self.channel], [], [], timeout_s)
        if not readable:
            return None
        message = self.channel.recv(MAX_MESSAGE_BYTES)
        if not message:
            raise RuntimeError(f"the test zygote exited ({self.process.poll()}); its error is on stderr above")
        reply: dict[str, Any] = json.loads(message)
        if "exit" in reply:
            self.exits[int(reply["exit"])] = int(reply["status"])
        return reply

    def close(self) -> None:
        self.channel.close()  # the zygote ends when its socket does
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


_current: _Zygote | None = None
_current_lock = threading.Lock()


def _zygote() -> _Zygote:
    global _current
    with _current_lock:
        if _current is None or _current.owner_pid != os.getpid():
            _current = _Zygote()
            atexit.register(_current.close)
        return _current
