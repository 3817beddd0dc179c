"""Reading a delivery status notification the way a mail client would."""

from __future__ import annotations

from email.message import Message


def status_groups(status: Message) -> list[Message]:
    """The header groups of a `message/delivery-status` part: the per-message group, then one per
    recipient. The email package parses them into a list, which its types cannot say."""
    groups = status.get_payload()
    assert isinstance(groups, list), groups
    assert all(isinstance(group, Message) for group in groups), groups
    return [group for group in groups if isinstance(group, Message)]
