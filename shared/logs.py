"""Structured logs: one JSON object per line on stderr.

Callers pass ids as keyword fields (`queue_id=`, `stream_id=`, `persona=`) so a message can be
followed across services with one grep. Never pass secrets or message bodies.

Logger names follow one scheme, `relay.<service>[.<module>]`, derived from the module by
`get_logger(__name__)`: `services.tunnel.node` logs as `relay.tunnel.node`, a service's `main` as
`relay.<service>`, `shared.enqueue` as `relay.shared.enqueue`, `protege_relay.gateway.send` as
`relay.gateway.send`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))
_PACKAGE_PREFIXES = ("services.", "protege_relay.")


def logger_name(module: str) -> str:
    """`relay.<service>[.<module>]` for a module's `__name__` (see the module docstring)."""
    for prefix in _PACKAGE_PREFIXES:
        module = module.removeprefix(prefix)
    return "relay." + module.removesuffix(".main")


def get_logger(module: str) -> logging.Logger:
    """The logger for a module: `logger = get_logger(__name__)`."""
    return logging.getLogger(logger_name(module))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class PrettyFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RESERVED)
        return f"{record.levelname:<7} {record.name}: {record.getMessage()} {fields}".rstrip()


def setup_logging(service: str, level: str = "info", log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("websockets", "mail.log", "arq", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def log(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured `fields` (ids, codes, counts — never bodies or keys)."""
    logger.log(level, message, extra=fields)
