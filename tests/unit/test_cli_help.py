"""`--help` of every command says, for each option, what it means, its default and an example;
the top-level help lists every environment variable with its default."""

from __future__ import annotations

import argparse

import pytest

from protege_relay.cli import _build_parser, environment_help
from shared.config import env_variable_names

COMMANDS = ("run", "ingress", "tunnel", "egress", "keygen", "gateway", "send", "status")


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = _build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub: argparse.ArgumentParser = commands.choices[name]
    return sub


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_a_meaning_a_default_and_an_example(name: str) -> None:
    parser = subcommand(name)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options, name
    for action in options:
        text = action.help or ""
        flags = "/".join(action.option_strings)
        assert len(text) > 20, f"{name} {flags}: no meaning"
        assert "default" in text.lower() or action.required, f"{name} {flags}: no default"
        is_switch = isinstance(action, argparse._StoreTrueAction)
        assert is_switch or "e.g." in text.lower(), f"{name} {flags}: no example"
    assert "Example:" in (parser.epilog or ""), f"{name}: no example command"
    assert parser.description, name


def test_the_environment_list_has_every_variable_and_its_default() -> None:
    text = environment_help()
    lines = text.splitlines()
    assert all("(default: " in line for line in lines)
    listed = {line.split()[0] for line in lines}
    assert {name for name, _ in env_variable_names()} <= listed
    [data_dir] = [line for line in lines if line.split()[0] == "RELAY_DATA_DIR"]
    assert "(default: ./var)" in data_dir
    [smtp_port] = [line for line in lines if line.split()[0] == "RELAY_SMTP_PORT"]
    assert "smtp.port" in smtp_port and "(default: 2526)" in smtp_port
    assert "RELAY_CONFIG" in listed
