"""The reference Protege gateway: receives a persona's mail into a Maildir, sends through the relay.

It speaks exactly what an unmodified Protege gateway speaks (PROTOCOL.md A) plus the opt-in
`inbound_ack` capability, so operators can try the relay and the end-to-end tests can drive it.
"""
