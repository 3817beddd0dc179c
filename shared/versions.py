"""Libraries whose internals the relay relies on, and the version ranges it was tested with.

`services/ingress/server.py` overrides private members of aiosmtpd's `SMTP` (`_handle_client`,
`_timeout_cb`, `_getaddr`, `_create_session`, `_create_envelope`, and reads `_reader`);
`services/egress/prompt_worker.py` reads and writes arq's Redis keys itself;
`services/tunnel/wsio.py` frames several messages through websockets' `Protocol` inside its
`send_context` and overrides `send_data`; `shared/redis_batch.py` and `shared/redis_send.py`
(every service's Redis client) use redis-py's connection internals (`send_packed_command`,
`read_response`, `parse_response`, the connection's reader and `socket_timeout`). A release outside the
tested range may change those without notice, so a service refuses to start on one instead of
misbehaving later. pyproject.toml pins the same ranges (tests/unit/test_versions.py keeps the two
equal) and constraints.txt the exact versions tested.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

_RELEASE = re.compile(r"(\d+(?:\.\d+)*)")

# distribution -> (lowest tested, first untested): the range >=low,<high
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "aiosmtpd": ("1.4.6", "1.5"),
    "arq": ("0.26", "0.29"),
    "redis": ("5.3", "6"),
    "websockets": ("17.0", "18"),
}


def _release(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "1.4.6.post2" -> (1, 4, 6), "1.5rc1" -> (1, 5)."""
    match = _RELEASE.match(text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def untested(distribution: str, installed: str | None = None) -> str | None:
    """Why the installed `distribution` is outside its tested range (one line), or None if inside."""
    low, high = TESTED_RANGES[distribution]
    if installed is None:
        try:
            installed = version(distribution)
        except PackageNotFoundError:
            return f"{distribution} is not installed"
    if _release(low) <= _release(installed) < _release(high):
        return None
    return (
        f"{distribution} {installed} is untested (tested: >={low},<{high}); "
        "install the tested versions with `pip install -c constraints.txt .`"
    )


def require_tested(service: str, *distributions: str) -> None:
    """Stop the service with one line if any of `distributions` is outside its tested range."""
    for distribution in distributions:
        problem = untested(distribution)
        if problem is not None:
            raise SystemExit(f"protege-relay {service}: {problem}")
