"""A local HTTPS server for MTA-STS policies (`/.well-known/mta-sts.txt`), with a trustme
certificate, so the egress fetches policies over real TLS as it would from `mta-sts.<domain>`."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme

POLICY_PATH = "/.well-known/mta-sts.txt"


class PolicyServer:
    """Serves `policy` (text) with `content_type` and `status`; `requests` counts GETs."""

    def __init__(self, host: str, port: int, cert: trustme.LeafCert, policy: str = "") -> None:
        self.policy = policy
        self.content_type = "text/plain"
        self.status = 200
        self.requests: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append(f"{self.headers.get('Host')} {self.path}")
                    body, status, content_type = server.policy.encode(), server.status, server.content_type
                if self.path != POLICY_PATH:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> PolicyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)

    def fetched(self) -> int:
        with self.lock:
            return len(self.requests)


__all__ = ["PolicyServer"]
