"""`protege-relay`: one console script for operators, tests and deployments.

Each service module exposes `async def serve(config, stopping)`, which runs until `stopping`
is set and then drains; this file only parses arguments, loads config, sets up logging and
turns SIGTERM/SIGINT into `stopping`. Errors an operator can fix (config, ports in use, key
files, paths) end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from protege_relay import queue
from protege_relay.supervisor import SUPERVISED_ENV, tunnel_url
from shared.config import ConfigError, RelayConfig, env_variable_names, load_config
from shared.listen import ListenError
from shared.logs import get_logger, log, setup_logging

SERVICES = ("ingress", "tunnel", "egress")
ServeFunction = Callable[[RelayConfig, asyncio.Event], Awaitable[None]]
DEFAULT_TUNNEL_URL = "ws://127.0.0.1:8080/ws"
DEFAULT_DATA_DIR = "./var"
logger = get_logger(__name__)

CONFIG_HELP = (
    "config file (JSON, docs/PROTOCOL.md part D). Default: $RELAY_CONFIG, else relay/config.json if it exists, "
    "else built-in defaults; RELAY_* variables override it. E.g. --config relay/config.json"
)
SERVICE_DOES = {
    "ingress": "the SMTP server: takes mail for personas and stores it durably in Redis",
    "tunnel": "the WebSocket endpoint /ws that gateways connect to",
    "egress": "the workers that deliver outbound mail to recipients' MX hosts",
}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"protege-relay: configuration error: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"protege-relay {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `protege-relay status | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def environment_help() -> str:
    """Every RELAY_* variable with its config field and default, for `--help`."""
    defaults = RelayConfig()
    rows = [
        ("RELAY_CONFIG", "config file path", "relay/config.json if it exists"),
        ("RELAY_DATA_DIR", "where `run` keeps its embedded Redis and lock", DEFAULT_DATA_DIR),
    ]
    for name, path in env_variable_names():
        value: Any = defaults
        for part in path.split("."):
            value = getattr(value, part)
        rows.append((name, path, _describe_default(path, value)))
    width = max(len(name) for name, _, _ in rows)
    return "\n".join(f"  {name:<{width}}  {path}  (default: {default})" for name, path, default in rows)


def _describe_default(path: str, value: Any) -> str:
    if path == "redis.url":
        return "embedded Redis under `run`; redis://127.0.0.1:6379/0 for a single service"
    if path == "nodeId":
        return "hostname-pid"
    if dataclasses.is_dataclass(value):
        return "{}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "empty"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="protege-relay",
        description="Protege Relay: internet email for Protege gateways, without opening port 25.",
        epilog="Environment variables (each overrides its config field):\n" + environment_help(),
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="the whole relay on this machine: embedded Redis plus ingress, tunnel and egress",
        description="Start an embedded Redis (data in $RELAY_DATA_DIR, default ./var) unless RELAY_REDIS_URL "
        "is set, then ingress, tunnel and egress as child processes; prints one line when all are ready. "
        "Ctrl-C drains and stops everything.",
        epilog="Example:\n  protege-relay run\n  RELAY_SMTP_PORT=2525 protege-relay run --ingress-workers 2",
        formatter_class=formatter,
    )
    run.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    run.add_argument(
        "--ingress-workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="ingress processes sharing the one SMTP socket the supervisor binds "
        f"(default: the CPU count, {os.cpu_count() or 1} here). E.g. --ingress-workers 2",
    )
    run.set_defaults(handler=_cmd_run)

    for name in SERVICES:
        service = commands.add_parser(
            name,
            help=f"one {name} process against RELAY_REDIS_URL (what containers run)",
            description=f"The {name} service: {SERVICE_DOES[name]}. Uses the Redis at RELAY_REDIS_URL "
            "(default redis://127.0.0.1:6379/0) and reports ready only once Redis answers.",
            epilog=f"Example:\n  RELAY_REDIS_URL=redis://127.0.0.1:6379/0 protege-relay {name}",
            formatter_class=formatter,
        )
        service.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        service.set_defaults(handler=_cmd_service, service=name)

    keygen = commands.add_parser(
        "keygen",
        help="new persona key (PKCS#8 PEM, mode 0600); prints the persona's address",
        description="Write a new Ed25519 persona key (the persona's identity) and print its email address.",
        epilog="Example:\n  protege-relay keygen --out passport.key --domain localhost",
        formatter_class=formatter,
    )
    keygen.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write the key (required; never overwritten). E.g. --out passport.key",
    )
    keygen.add_argument(
        "--domain",
        default="",
        metavar="DOMAIN",
        help="mail domain of the printed address (default: the first of mailDomains, else localhost). "
        "E.g. --domain relay.example.com",
    )
    keygen.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    keygen.set_defaults(handler=_cmd_keygen)

    gateway = commands.add_parser(
        "gateway",
        help="reference gateway: receive the persona's mail into a Maildir",
        description="Keep one authenticated WebSocket to the relay and store each message in a Maildir "
        "(fsynced before it is acknowledged). Reconnects on network errors; stops when the URL is wrong, "
        "the key is refused, or another gateway takes the persona (unless --take-over).",
        epilog="Example:\n  protege-relay gateway --key passport.key --url ws://127.0.0.1:8080/ws --maildir ./mail\n"
        "Exit codes: 0 stopped by a signal, 2 bad key/URL/Maildir, 3 key refused by the relay, "
        "4 replaced by another gateway",
        formatter_class=formatter,
    )
    gateway.add_argument(
        "--key",
        required=True,
        metavar="FILE",
        help="the persona key from keygen (required; must be mode 0600). E.g. --key passport.key",
    )
    gateway.add_argument(
        "--url",
        default=None,
        metavar="URL[,URL...]",
        help="tunnel WebSocket URL(s), tried in turn (default: this machine's relay from the config, "
        f"host and port: {DEFAULT_TUNNEL_URL} unless RELAY_HOST / RELAY_PORT say otherwise). "
        "E.g. --url ws://10.0.0.5:8080/ws,ws://10.0.0.6:8080/ws",
    )
    gateway.add_argument("--config", metavar="FILE", help=CONFIG_HELP + " (read for the default --url)")
    gateway.add_argument(
        "--maildir",
        required=True,
        metavar="DIR",
        help="Maildir to store mail in, created if missing (required). E.g. --maildir ./mail",
    )
    gateway.add_argument(
        "--no-ack",
        action="store_true",
        help="behave as an original Protege gateway: no inbound_ack capability (default: off)",
    )
    gateway.add_argument(
        "--take-over",
        action="store_true",
        help="when another gateway with the same key takes the persona (close 4400), take it back "
        "instead of stopping (default: off, stop with exit code 4)",
    )
    gateway.set_defaults(handler=_cmd_gateway)

    send = commands.add_parser(
        "send",
        help="reference gateway: send one message through the relay",
        description="Send FILE (an RFC 5322 message) to each --to recipient through the relay, and print "
        "one JSON result line per recipient. Exit 0 only if every recipient's status is sent.",
        epilog="Example:\n  protege-relay send --key passport.key --to bob@example.test hello.eml",
        formatter_class=formatter,
    )
    send.add_argument(
        "--key", required=True, metavar="FILE", help="the persona key (required). E.g. --key passport.key"
    )
    send.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="tunnel WebSocket URL (default: this machine's relay from the config, host and port: "
        f"{DEFAULT_TUNNEL_URL} unless RELAY_HOST / RELAY_PORT say otherwise). "
        "E.g. --url wss://relay.example.com/ws",
    )
    send.add_argument(
        "--from",
        dest="mail_from",
        default=None,
        metavar="ADDR",
        help="envelope sender, which must be the persona's own address (default: <key>@ the first of "
        "mailDomains, else @localhost). E.g. --from <key>@relay.example.com",
    )
    send.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="ADDR",
        help="a recipient; repeat for several (required). E.g. --to bob@example.test",
    )
    send.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="how long to wait for the delivery results (default: 20). E.g. --timeout 60",
    )
    send.add_argument("--config", metavar="FILE", help=CONFIG_HELP + " (read for mailDomains and the default --url)")
    send.add_argument("file", metavar="FILE", help="the message to send. E.g. hello.eml")
    send.set_defaults(handler=_cmd_send)

    status = commands.add_parser(
        "status",
        help="nodes, connected personas, backlog and queue depth, read from Redis",
        description="Read the relay's state from its Redis: RELAY_REDIS_URL if set, else the embedded Redis "
        "of a `protege-relay run` using this data directory ($RELAY_DATA_DIR, default ./var).",
        epilog="Example:\n  protege-relay status\n  RELAY_DATA_DIR=/srv/relay/var protege-relay status --json",
        formatter_class=formatter,
    )
    status.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="print one JSON document instead of tables (default: off)")
    status.set_defaults(handler=_cmd_status)

    queue.register(commands)
    return parser


def _configure(args: argparse.Namespace, service: str) -> RelayConfig:
    config = load_config(getattr(args, "config", None))
    setup_logging(service, config.logging.level, config.logging.consoleLogFormat)
    if service in ("ingress", "tunnel", "supervisor") and not os.environ.get(SUPERVISED_ENV):
        warn_about_config(config)
    return config


def warn_about_config(config: RelayConfig) -> None:
    """Settings that work but are rarely what a public relay wants."""
    if not config.mailDomains:
        log(
            logger,
            logging.WARNING,
            "mailDomains is empty: mail for any domain is accepted and a persona may send as its key "
            "at any domain; set mailDomains (RELAY_MAIL_DOMAINS) to your domains",
        )


def run_until_signal(serve: ServeFunction, config: RelayConfig) -> None:
    """Run `serve` on a fresh event loop (uvloop when installed) until SIGTERM or SIGINT."""

    async def supervise() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await serve(config, stopping)

    try:
        import uvloop

        uvloop.run(supervise())
    except ImportError:
        asyncio.run(supervise())


def _cmd_service(args: argparse.Namespace) -> int:
    config = _configure(args, args.service)
    module: Any = importlib.import_module(f"services.{args.service}.main")
    run_until_signal(module.serve, config)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from protege_relay.supervisor import run_all

    config = _configure(args, "supervisor")
    return run_all(config, config_path=args.config, ingress_workers=args.ingress_workers)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from shared.identity import Passport, persona_address

    domain = args.domain or load_config(args.config).primary_mail_domain or "localhost"
    passport = Passport.generate()
    try:
        passport.save(args.out)
    except FileExistsError:
        print(f"protege-relay keygen: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 1
    except OSError as exc:
        hint = "; create the directory first" if not os.path.isdir(os.path.dirname(args.out) or ".") else ""
        print(f"protege-relay keygen: cannot write {args.out}: {exc.strerror}{hint}", file=sys.stderr)
        return 1
    print(persona_address(passport.persona_key, domain))
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from protege_relay.gateway.receive import run_gateway

    setup_logging("gateway")
    url = args.url or tunnel_url(load_config(args.config))
    return run_gateway(args.key, url, args.maildir, inbound_ack=not args.no_ack, take_over=args.take_over)


def _cmd_send(args: argparse.Namespace) -> int:
    from protege_relay.gateway.send import run_send

    setup_logging("gateway")
    config = load_config(args.config)
    url = args.url or tunnel_url(config)
    return run_send(
        args.key,
        url,
        args.mail_from,
        args.to,
        args.file,
        timeout_s=args.timeout,
        mail_domain=config.primary_mail_domain,
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from protege_relay.status import run_status

    config = load_config(args.config)
    return run_status(config, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
