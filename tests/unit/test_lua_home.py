"""Every Lua script lives in shared/lua.py (one home, next to its KEYS/ARGV contract), and each
one there is run by some caller: a script copied into a module, or left behind unused after a
caller changed, fails here."""

from __future__ import annotations

import re
from pathlib import Path

from shared import keys, lua

REPO = Path(__file__).resolve().parents[2]
HOME = REPO / "shared" / "lua.py"
CODE = [
    path
    for folder in ("shared", "services", "protege_relay", "bench")
    for path in sorted((REPO / folder).rglob("*.py"))
    if path != HOME
]
# Lua's way into Redis, and redis-py's ways of running a script text
SCRIPT_MARKERS = re.compile(r"redis\.p?call\(|register_script\(|\.eval\(|EVAL\b")


def test_no_lua_outside_the_scripts_home() -> None:
    assert len(CODE) > 50
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in CODE
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if SCRIPT_MARKERS.search(line)
    ]
    assert offenders == [], "Lua belongs in shared/lua.py"


def test_every_script_is_run_by_some_caller() -> None:
    scripts = lua.all_scripts()
    assert len(scripts) >= 14
    code = "\n".join(path.read_text(encoding="utf-8") for path in CODE)
    unused = [name for name in scripts if not re.search(rf"\blua\.{name}\b", code)]
    assert unused == [], f"scripts nobody runs: {unused}"


def test_lua_string_refuses_anything_but_a_plain_name() -> None:
    assert lua.lua_string("relay:node:") == "'relay:node:'"
    for hostile in ("a'b", "a\\b", "a\nb", "a]]b"):
        try:
            lua.lua_string(hostile)
        except ValueError:
            continue
        raise AssertionError(f"{hostile!r} was written into a script")


def test_every_script_that_publishes_uses_the_one_wake_up_rule() -> None:
    publishing = {name for name, script in lua.all_scripts().items() if b"PUBLISH" in script.source}
    assert publishing == {"WAKE", "ENQUEUE", "PUBLISH_RESULT"}
    for name in publishing:
        source = lua.all_scripts()[name].source.decode()
        assert source.startswith(lua.WAKE_FUNCTION) and "PUBLISH" not in source[len(lua.WAKE_FUNCTION) :], name
    assert f"'{keys.NODE_CHANNEL_PREFIX}'" in lua.WAKE_FUNCTION
    assert keys.node_channel("n") == keys.NODE_CHANNEL_PREFIX + "n"
