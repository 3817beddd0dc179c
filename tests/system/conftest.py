"""The system tier: several real processes at once (end to end, faults, multi-node, the bench smoke run).

Every test here carries the `system` marker, so `make test-fast` (`-m "not system"`) leaves the tier out
and `make test` runs it. Every test here also gets a redis-server of its own (`own_redis`): these tests
stop Redis, attach replicas to it and run several processes against it, so none starts from a server
another test used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mx_sink import MxSink
from tests.support.processes import free_port

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.system)
            item.add_marker(pytest.mark.own_redis)


@pytest.fixture
def mx_sink() -> Iterator[MxSink]:
    """A loopback MX sink on a free port; egress routes the remote domain to it."""
    with MxSink("127.0.0.1", free_port()) as sink:
        yield sink
