"""Prometheus metrics of the tunnel service (served on its own port at `/metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPEN = Gauge(
    "relay_tunnel_connections_open", "Open WebSocket connections on this node", multiprocess_mode="livesum"
)
AUTH_OUTCOMES = Counter(
    "relay_tunnel_auth_total", "Authentication outcomes by code (ok or the auth_error code)", ["code"]
)
INBOUND_DELIVERED = Counter(
    "relay_tunnel_inbound_delivered_total", "Inbound streams sent to a gateway (including re-sends)"
)
INBOUND_ACKED = Counter(
    "relay_tunnel_inbound_acked_total", "Inbound streams acknowledged by a gateway and removed from Redis"
)
INBOUND_ACK_SECONDS = Histogram(
    "relay_tunnel_inbound_ack_seconds",
    "From smtp_end sent to the gateway's smtp_ack (or pong)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
OUTBOUND_OUTCOMES = Counter(
    "relay_tunnel_outbound_total", "Outbound streams by outcome (accepted, duplicate, or the refusal)", ["outcome"]
)
RESULTS_FORWARDED = Counter("relay_tunnel_results_forwarded_total", "Delivery results sent to gateways")
CONNECTIONS_REFUSED = Counter(
    "relay_tunnel_connections_refused_total", "WebSocket upgrades refused before auth, by reason", ["reason"]
)
