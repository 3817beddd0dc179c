"""Durable, deduplicating Maildir delivery for the reference gateway.

The gateway acknowledges a message only after it is on disk, and the relay redelivers an
unacknowledged message under the same stream id (PROTOCOL.md B), so storing must be durable
(fsync of file and directory) and idempotent per stream id.

Dedupe has two sources of truth that cover each other's gaps: every stored file's name carries
a token derived from its stream id (survives a crash between storing and indexing), and a small
index file remembers tokens of messages the user has since moved or deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

INDEX_FILE_NAME = ".protege-delivered"
INDEX_KEEP_ENTRIES = 10_000
_TOKEN_PATTERN = re.compile(r"S([0-9a-f]{32})")


def stream_token(stream_id: str) -> str:
    """Filename-safe, fixed-length stand-in for a stream id (which may hold any UTF-8)."""
    return hashlib.sha256(stream_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    stored: bool  # False: this stream id was delivered before, nothing written
    path: Path | None


class MaildirStore:
    """Writes each message's exact bytes once into `<root>/new/`."""

    def __init__(self, root: str | Path, index_keep_entries: int = INDEX_KEEP_ENTRIES) -> None:
        self.root = Path(root)
        for folder in ("tmp", "new", "cur"):  # what mailbox.Maildir expects; it skips an existing root
            (self.root / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._index_path = self.root / INDEX_FILE_NAME
        self._index_keep_entries = index_keep_entries
        self._tokens: OrderedDict[str, None] = OrderedDict()
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
        self._sequence = 0
        self._load_index()

    def contains(self, stream_id: str) -> bool:
        return stream_token(stream_id) in self._tokens

    def deliver(self, stream_id: str, message: bytes) -> StoreOutcome:
        token = stream_token(stream_id)
        if token in self._tokens:
            return StoreOutcome(stored=False, path=None)
        name = self._unique_name(token)
        temporary = self.root / "tmp" / name
        final = self.root / "new" / name
        _write_synced(temporary, message)
        os.rename(temporary, final)
        _fsync_directory(final.parent)
        self._remember(token)
        return StoreOutcome(stored=True, path=final)

    def _unique_name(self, token: str) -> str:
        self._sequence += 1
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{self._sequence}S{token}.{self._host}"

    def _load_index(self) -> None:
        if self._index_path.exists():
            for line in self._index_path.read_text(encoding="ascii", errors="ignore").splitlines():
                if _TOKEN_PATTERN.fullmatch("S" + line):
                    self._tokens[line] = None
        for folder in ("new", "cur"):
            for entry in os.scandir(self.root / folder):
                match = _TOKEN_PATTERN.search(entry.name)
                if match and match.group(1) not in self._tokens:
                    self._remember(match.group(1))

    def _remember(self, token: str) -> None:
        self._tokens[token] = None
        with self._index_path.open("a", encoding="ascii") as index:
            index.write(token + "\n")
            index.flush()
            os.fsync(index.fileno())
        if len(self._tokens) > 2 * self._index_keep_entries:
            self._compact_index()

    def _compact_index(self) -> None:
        while len(self._tokens) > self._index_keep_entries:
            self._tokens.popitem(last=False)
        replacement = self._index_path.with_name(INDEX_FILE_NAME + ".tmp")
        _write_synced(replacement, "".join(token + "\n" for token in self._tokens).encode("ascii"))
        os.replace(replacement, self._index_path)
        _fsync_directory(self.root)


def _write_synced(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
