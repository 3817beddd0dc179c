"""What the tunnel process sets up before it serves: its TLS context and file-descriptor headroom.

Implicit TLS (`wss://` without a proxy) is on when `ws.tls.certPath` and `ws.tls.keyPath` are
both set. The key file passes the `shared.secrets` checks first (not readable by group or
others); ssl then loads it by path, as it takes no bytes. A configured key that is refused
stops the start: serving plain `ws://` instead would silently drop the encryption.

Every socket is a file descriptor, and the common soft limit (1024) would cap the node at
about a thousand gateways, so the soft limit is raised to the hard one at startup.
"""

from __future__ import annotations

import resource
import ssl

from shared.config import TlsFilesConfig
from shared.secrets import SecretFileError, read_secret_file

# Used when the hard limit is unlimited (setting an unlimited soft limit is refused by Linux).
UNLIMITED_FALLBACK_OPEN_FILES = 1_048_576


def tls_context(tls: TlsFilesConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    read_secret_file(tls.keyPath, purpose="ws.tls.keyPath")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certPath, tls.keyPath)
    except (OSError, ssl.SSLError) as exc:
        raise SecretFileError(f"ws.tls: cannot load {tls.certPath} with its key: {exc}") from None
    return context


def raise_open_files_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (soft before, soft after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_FALLBACK_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target
