"""Structured logs on stderr: one JSON object per line, or one readable line on a terminal.

`logging.consoleLogFormat` chooses: `json` always, `pretty` always, `auto` (the default) pretty
when stderr is a terminal (someone is watching `make run`) and JSON otherwise (containers, log
collectors, tests). Both carry the same facts: timestamp, level, service, message, fields.

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
from typing import Any, TextIO

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_PACKAGE_PREFIXES = ("services.", "protege_relay.")


def logger_name(module: str) -> str:
    """`relay.<service>[.<module>]` for a module's `__name__` (see the module docstring)."""
    for prefix in _PACKAGE_PREFIXES:
        module = module.removeprefix(prefix)
    return "relay." + module.removesuffix(".main")


def get_logger(module: str) -> logging.Logger:
    """The logger for a module: `logger = get_logger(__name__)`."""
    return logging.getLogger(logger_name(module))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


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
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class PrettyFormatter(logging.Formatter):
    """`2025-01-31 14:02:07.412 INFO    ingress  ready  smtp_port=2526 node_id=host-1` (local time);
    fields that are None are left out, values with spaces are quoted."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = " ".join(f"{k}={_pretty_value(v)}" for k, v in _fields(record).items() if v is not None)
        line = f"{stamp} {record.levelname:<7} {self._service or record.name:<10} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _pretty_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return json.dumps(text) if not text or any(c.isspace() or c in "\"'=" for c in text) else text


def resolve_format(log_format: str, stream: TextIO) -> str:
    """`auto` becomes `pretty` on a terminal and `json` elsewhere; the others stay as they are."""
    if log_format != "auto":
        return log_format
    try:
        return "pretty" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup_logging(service: str, level: str = "info", log_format: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    chosen = resolve_format(log_format, sys.stderr)
    handler.setFormatter(JsonFormatter(service) if chosen == "json" else PrettyFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("websockets", "mail.log", "arq", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def log(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured `fields` (ids, codes, counts — never bodies or keys)."""
    logger.log(level, message, extra=fields)
