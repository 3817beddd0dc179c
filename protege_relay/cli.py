"""`protege-relay`: one console script for operators, tests and deployments.

Each service module exposes `async def serve(config, stopping)`, which runs until `stopping`
is set and then drains; this file only parses arguments, loads config, sets up logging and
turns SIGTERM/SIGINT into `stopping`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from protege_relay import queue
from shared.config import ConfigError, RelayConfig, env_variable_names, load_config
from shared.logs import setup_logging

SERVICES = ("ingress", "tunnel", "egress")
ServeFunction = Callable[[RelayConfig, asyncio.Event], Awaitable[None]]


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
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {name:<58} {path}" for name, path in env_variable_names())
    parser = argparse.ArgumentParser(
        prog="protege-relay",
        description="Protege Relay: internet email for Protege gateways, without opening port 25.",
        epilog="Environment overrides (RELAY_CONFIG names the config file):\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="embedded Redis plus ingress, tunnel and egress")
    run.add_argument("--config")
    run.add_argument(
        "--ingress-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="ingress processes sharing the SMTP port with SO_REUSEPORT (default: CPU count)",
    )
    run.set_defaults(handler=_cmd_run)

    for name in SERVICES:
        service = commands.add_parser(name, help=f"run the {name} service against RELAY_REDIS_URL")
        service.add_argument("--config")
        service.set_defaults(handler=_cmd_service, service=name)

    keygen = commands.add_parser("keygen", help="new persona key (PKCS#8 PEM), prints its address")
    keygen.add_argument("--out", required=True)
    keygen.add_argument("--domain", default="")
    keygen.set_defaults(handler=_cmd_keygen)

    gateway = commands.add_parser("gateway", help="reference gateway: receive mail into a Maildir")
    gateway.add_argument("--key", required=True)
    gateway.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    gateway.add_argument("--maildir", required=True)
    gateway.add_argument("--no-ack", action="store_true", help="behave as a legacy gateway (no inbound_ack)")
    gateway.set_defaults(handler=_cmd_gateway)

    send = commands.add_parser("send", help="reference gateway: send one message through the relay")
    send.add_argument("--key", required=True)
    send.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    send.add_argument("--from", dest="mail_from", required=True)
    send.add_argument("--to", action="append", required=True)
    send.add_argument("--timeout", type=float, default=20.0)
    send.add_argument("file")
    send.set_defaults(handler=_cmd_send)

    status = commands.add_parser("status", help="nodes, personas, backlog and queue depth from Redis")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)

    queue.register(commands)
    return parser


def _configure(args: argparse.Namespace, service: str) -> RelayConfig:
    config = load_config(getattr(args, "config", None))
    setup_logging(service, config.logging.level, config.logging.consoleLogFormat)
    return config


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

    passport = Passport.generate()
    try:
        passport.save(args.out)
    except FileExistsError:
        print(f"protege-relay: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 1
    print(persona_address(passport.persona_key, args.domain))
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from protege_relay.gateway.receive import run_gateway

    setup_logging("gateway")
    return run_gateway(args.key, args.url, args.maildir, inbound_ack=not args.no_ack)


def _cmd_send(args: argparse.Namespace) -> int:
    from protege_relay.gateway.send import run_send

    setup_logging("gateway")
    return run_send(args.key, args.url, args.mail_from, args.to, args.file, timeout_s=args.timeout)


def _cmd_status(args: argparse.Namespace) -> int:
    from protege_relay.status import run_status

    config = load_config(args.config)
    return run_status(config, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
