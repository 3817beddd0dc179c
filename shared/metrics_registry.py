"""What `/metrics` exports: this process's metrics, or every worker's when several processes of
one service share a port.

`protege-relay run` starts one ingress process per CPU; a scrape reaches one of them, which
alone would report a fraction of the traffic. The standard answer is prometheus_client's
multiprocess mode: the supervisor gives each service a directory in `PROMETHEUS_MULTIPROC_DIR`
(fresh for every run), every process of the service writes its metric values to files there,
and the scraped process reads them all (counters and histograms summed, gauges by their
`multiprocess_mode`: "livesum" for a count of open things, one series per process otherwise).
A service run alone (docker-compose, Kubernetes: one process per container) has no such
directory and exports its own registry, process metrics included.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@functools.cache
def export_registry() -> CollectorRegistry:
    """Read once: prometheus_client itself chose its storage from the variable at import."""
    if not os.environ.get(MULTIPROC_DIR_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def metrics_text() -> bytes:
    return generate_latest(export_registry())
