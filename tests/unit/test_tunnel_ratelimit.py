"""Which address an auth attempt is counted against (`ws.trustedProxies`, X-Forwarded-For)."""

from __future__ import annotations

from services.tunnel.ratelimit import client_ip, parse_trusted_proxies

TRUSTED = parse_trusted_proxies(["10.0.0.0/8", "127.0.0.1", "not an ip"])


def test_header_ignored_when_peer_is_not_a_trusted_proxy() -> None:
    assert client_ip("203.0.113.9", "198.51.100.1", TRUSTED) == "203.0.113.9"
    assert client_ip("203.0.113.9", "198.51.100.1", []) == "203.0.113.9"


def test_rightmost_untrusted_hop_is_the_client() -> None:
    assert client_ip("127.0.0.1", "198.51.100.1", TRUSTED) == "198.51.100.1"
    # a client-written first hop cannot choose its own bucket
    assert client_ip("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9", TRUSTED) == "198.51.100.1"


def test_garbage_or_all_trusted_headers_fall_back_to_the_peer() -> None:
    assert client_ip("127.0.0.1", "", TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", "10.0.0.1, 10.0.0.2", TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", "garbage", TRUSTED) == "127.0.0.1"
    assert client_ip("127.0.0.1", "2001:db8::1", TRUSTED) == "2001:db8::1"
