"""The warm interpreter behind tests/support/launcher.py: imports the relay once, then forks a child
per launch that runs `protege_relay.cli.main` as `python -m protege_relay.cli` would.

Run as `python -m tests.support.zygote FD`, FD being a SOCK_SEQPACKET socket to the test process.
Each request is one JSON message `{"argv", "env", "cwd", "targets"}` carrying descriptors by
SCM_RIGHTS (stdin, stdout, stderr, then every inherited descriptor); the child gets each at the
number named in `targets`, and nothing else. The zygote answers `{"pid"}` at once and
`{"exit": pid, "status": raw wait status}` when the child ends, so the launcher can serve
`Popen.poll()`/`wait()` for a process that is not its own child.

Nothing here may start a thread or an event loop, configure logging or read the environment at
import: a child inherits all of it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import signal
import socket
import sys
from typing import Any

# What a service or CLI process imports before it does anything; importing it here is the point.
import protege_relay.cli
import protege_relay.gateway.receive
import protege_relay.gateway.send
import protege_relay.queue_commands
import protege_relay.status
import protege_relay.supervisor
import services.egress.main
import services.ingress.main
import services.tunnel.main
import shared.identity

try:
    import uvloop  # noqa: F401  (the services' event loop where installed)
except ImportError:
    pass

PRELOADED = (
    protege_relay.gateway.receive,
    protege_relay.gateway.send,
    protege_relay.queue_commands,
    protege_relay.status,
    protege_relay.supervisor,
    services.egress.main,
    services.ingress.main,
    services.tunnel.main,
    shared.identity,
)
# The interpreter chose these from the locale, which the children share with the zygote.
STDIO_ENCODING = sys.__stdout__.encoding if sys.__stdout__ is not None else "utf-8"
STDIO_ERRORS = sys.__stdout__.errors if sys.__stdout__ is not None else "strict"
CLI_PATH = protege_relay.cli.__file__
MAX_REQUEST_BYTES = 1 << 20
MAX_FDS = 64
FIRST_SPARE_FD = 1024  # received descriptors are parked above every target before being placed


def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([channel.fileno(), wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
            _report_exits(channel, running)
        if channel.fileno() in readable:
            try:
                message, fds, _flags, _address = socket.recv_fds(channel, MAX_REQUEST_BYTES, MAX_FDS)
            except ConnectionResetError:
                message, fds = b"", []
            if not message:
                return  # the test process is gone; its children are its to stop
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                channel.close()
                os.close(wake_read)
                os.close(wake_write)
                _become_child(request, fds)
            for fd in fds:
                os.close(fd)
            running.add(pid)
            channel.send(json.dumps({"pid": pid}).encode())


def _report_exits(channel: socket.socket, running: set[int]) -> None:
    for pid in list(running):
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended == pid:
            running.discard(pid)
            channel.send(json.dumps({"exit": pid, "status": status}).encode())


def _become_child(request: dict[str, Any], fds: list[int]) -> None:
    """Turn this fork into the process `python -m protege_relay.cli ARGV` would have been."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    targets: list[int] = request["targets"]
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, FIRST_SPARE_FD) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, target in zip(parked, targets, strict=True):
        os.dup2(fd, target)  # inheritable, as Popen leaves them
    low = 0
    for fd in sorted(set(targets)):
        if low < fd:  # never an empty range: Python 3.11 turns closerange(n, n) into "close all from n"
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [CLI_PATH, *request["argv"]]
    _reopen_standard_streams()
    sys.exit(protege_relay.cli.main(request["argv"]))


def _reopen_standard_streams() -> None:
    """New stdio objects over descriptors 0-2, built as CPython's create_stdio builds them at
    startup (buffering from this child's PYTHONUNBUFFERED and terminals, not the zygote's)."""
    sys.stdin = sys.__stdin__ = _text_stream(0)  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = _text_stream(1)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = _text_stream(2)  # type: ignore[misc]


def _text_stream(fd: int) -> io.TextIOWrapper:
    writing = fd != 0
    unbuffered = writing and bool(os.environ.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, "wb" if writing else "rb", closefd=False)
    binary: Any = raw
    if not unbuffered:
        binary = io.BufferedWriter(raw) if writing else io.BufferedReader(raw)
    return io.TextIOWrapper(
        binary,
        encoding=STDIO_ENCODING,
        errors="backslashreplace" if fd == 2 else STDIO_ERRORS,
        line_buffering=not unbuffered and (fd == 2 or os.isatty(fd)),
        write_through=unbuffered,
    )


if __name__ == "__main__":
    main()
