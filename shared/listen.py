"""Listening sockets that either work or fail with one line naming the setting to change.

A port is never shared silently: sockets are bound without `SO_REUSEPORT`, so a second relay
(or a stray single service) on a port already in use fails at once instead of taking half of
the traffic. Only the ingress workers of one `protege-relay run` share the SMTP port, and they
do it by inheriting the one socket the supervisor bound (`inherited_socket`), never by
binding it again.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import MutableMapping

from shared.config import env_name

# The supervisor hands the bound SMTP socket to its ingress workers under this descriptor
# number (an internal contract between the two, not a setting: hence no RELAY_ prefix).
INHERITED_SMTP_FD_ENV = "PROTEGE_RELAY_SMTP_FD"
DEFAULT_BACKLOG = 1024


class ListenError(Exception):
    """A listening socket could not be opened; the message is the one line to show."""


def describe_failure(host: str, port: int, field: str, error: OSError) -> str:
    """One line: where, why, which setting (config field and environment variable), what to do."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EADDRINUSE:
        hint = "another process listens there (a relay already running?): stop it or choose another port"
    elif error.errno == errno.EACCES:
        hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE: choose another port or grant it"
    elif error.errno == errno.EADDRNOTAVAIL:
        hint = "no interface of this machine has that address: use 127.0.0.1 or 0.0.0.0"
    else:
        hint = "choose another address or port"
    return f"cannot listen on {where}: {reason} (set by {field} / {env_name(field)}); {hint}"


def bind_listener(host: str, port: int, *, field: str, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A non-blocking listening TCP socket on `host:port`, with SO_REUSEADDR (restart while
    old connections sit in TIME_WAIT) but never SO_REUSEPORT. `field` is the config field of
    the port (its host field is the same section's `host`), named in the error."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(describe_failure(host, port, field, OSError(exc.errno, exc.strerror))) from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        raise ListenError(describe_failure(host, port, field, exc)) from None
    return listener


def inherited_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket a supervisor passed down (see `INHERITED_SMTP_FD_ENV`), or None.

    The variable is removed once read, so processes this one starts do not inherit the claim."""
    environ = os.environ if environ is None else environ
    raw = environ.pop(INHERITED_SMTP_FD_ENV, None)
    if not raw:
        return None
    try:
        listener = socket.socket(fileno=int(raw))
    except (ValueError, OSError) as exc:
        raise ListenError(f"{INHERITED_SMTP_FD_ENV}={raw} is not an open socket ({exc}); unset it") from None
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.close()
        raise ListenError(f"{INHERITED_SMTP_FD_ENV}={raw} is not a listening socket; unset it")
    listener.setblocking(False)
    return listener


def bound_port(listener: socket.socket) -> int:
    port: int = listener.getsockname()[1]
    return port
