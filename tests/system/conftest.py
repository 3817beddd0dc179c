"""The system tier: several real processes at once (end to end, faults, multi-node, the bench smoke run).

Every test here carries the `system` marker, so `make test-fast` (`-m "not system"`) leaves the tier out
and `make test` runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.system)
