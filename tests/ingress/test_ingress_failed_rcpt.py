"""Refused RCPTs per session are bounded (docs/SECURITY.md "Smaller items", issue 9 item 7):
`smtp.maxFailedRecipients` refusals are answered as usual, the next is `421 4.7.0` and the
connection closes, so one session cannot harvest addresses or flood the logs, while another
sender is served meanwhile."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from tests.support.ingress import InProcessIngress, address, ingress_starter, mark_seen, new_persona

StartIngress = Callable[..., InProcessIngress]
TOO_MANY = b"4.7.0 too many failed recipients, closing connection"


@pytest.fixture
def start_ingress(redis_server: EmbeddedRedis) -> Iterator[StartIngress]:
    yield from ingress_starter(redis_server)


def test_the_refusal_after_the_limit_is_421_and_the_connection_closes(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    ingress = start_ingress()  # default smtp.maxFailedRecipients: 20
    honest_persona = new_persona()
    mark_seen(redis_client, honest_persona)
    unknown = [address(Passport.generate().persona_key) for _ in range(25)]  # never connected: 450
    replies: list[tuple[int, bytes]] = []
    with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as attacker:
        attacker.ehlo("harvester.example")
        assert attacker.mail("probe@example.org")[0] == 250
        replies.append(attacker.rcpt("not-a-key@relay.test"))  # 550 counts too
        for recipient in unknown:
            replies.append(attacker.rcpt(recipient))
            if replies[-1][0] == 421:
                break
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30, source_address=("127.0.0.2", 0)) as honest:
            honest.sendmail("someone@example.org", [address(honest_persona)], b"Subject: hi\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            attacker.rcpt(unknown[-1])
    codes = [code for code, _ in replies]
    print(f"\nRCPT replies in the session: {codes.count(550)} x 550, {codes.count(450)} x 450, then {codes[-1]}")
    assert codes[0] == 550 and codes[1:20] == [450] * 19, "the first 20 refusals are answered as they are"
    assert replies[20:] == [(421, TOO_MANY)], "the 21st is 421 and the last"
    assert redis_client.xlen(keys.inbox(honest_persona)) == 1, "another sender was served meanwhile"


def test_the_limit_is_configurable_and_accepted_recipients_do_not_count(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_SMTP_MAX_FAILED_RECIPIENTS="2", RELAY_SMTP_MAX_RECIPIENTS="10")
    persona = new_persona()
    mark_seen(redis_client, persona)
    with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as client:
        client.ehlo("sender.example")
        assert client.mail("someone@example.org")[0] == 250
        codes = [client.rcpt(address(persona, tag=str(n)))[0] for n in range(5)]
        codes += [client.rcpt("bad@relay.test")[0] for _ in range(3)]
    assert codes == [250] * 5 + [550, 550, 421]
