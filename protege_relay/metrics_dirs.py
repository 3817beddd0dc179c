"""Where the processes of `protege-relay run` keep their Prometheus values (see
shared/metrics_registry.py): `<data dir>/metrics/<service>/`, one directory per service so a
service's `/metrics` never reports another's, emptied at every start so counters begin at zero
and no file of a process from an earlier run is read."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from shared.metrics_registry import MULTIPROC_DIR_ENV

__all__ = ["MULTIPROC_DIR_ENV", "prepare_metrics_dirs"]


def prepare_metrics_dirs(state_dir: Path, services: Iterable[str]) -> dict[str, Path]:
    """Fresh, empty directories; call only while holding the data directory's lock."""
    root = state_dir / "metrics"
    shutil.rmtree(root, ignore_errors=True)
    directories = {service: root / service for service in services}
    for directory in directories.values():
        directory.mkdir(parents=True)
    return directories
