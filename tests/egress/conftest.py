"""The egress: MX resolution against the local DNS server, delivery to local MX sinks, the arq
worker and PromptWorker against a real redis-server."""

from __future__ import annotations

import pytest

from tests.support.processes import free_port


@pytest.fixture
def smtp_port() -> int:
    """The one port every local MX sink of a test listens on (the egress uses one `egress.smtpPort`)."""
    return free_port()
