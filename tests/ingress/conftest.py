"""The SMTP ingress: in-process `serve()` (tests/support/ingress.py) or real `protege-relay ingress`
processes, over real SMTP against a real redis-server."""
