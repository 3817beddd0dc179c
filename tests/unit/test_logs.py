"""One logger naming scheme across services: `relay.<service>[.<module>]` (shared/logs.py)."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest

from shared.logs import logger_name


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("services.tunnel.node", "relay.tunnel.node"),
        ("services.ingress.main", "relay.ingress"),
        ("services.ingress.sender_auth.spf_check", "relay.ingress.sender_auth.spf_check"),
        ("shared.enqueue", "relay.shared.enqueue"),
        ("protege_relay.gateway.send", "relay.gateway.send"),
        ("protege_relay.supervisor", "relay.supervisor"),
    ],
)
def test_logger_name_of_a_module(module: str, expected: str) -> None:
    assert logger_name(module) == expected


def test_every_module_logger_follows_the_scheme() -> None:
    """A module-level `logger` named any other way (`getLogger("egress")`) fails here."""
    checked = []
    for package_name in ("shared", "services", "protege_relay"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            module = importlib.import_module(info.name)
            logger = getattr(module, "logger", None)
            if isinstance(logger, logging.Logger):
                assert logger.name == logger_name(info.name), info.name
                checked.append(info.name)
    print(f"{len(checked)} module loggers checked")
    assert len(checked) >= 15
