"""The WebSocket tunnel: in-process `RunningTunnel` or real `protege-relay tunnel` processes, real
WebSockets (tests/support/ws_client.py) against a real redis-server."""
