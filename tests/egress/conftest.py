"""The egress: MX resolution against the local DNS server, delivery to local MX sinks, the arq
worker and PromptWorker against a real redis-server."""
