"""The docs stay in the repository and in step with the code they describe: README and docs/
link only to files that exist here, docs/ARCHITECTURE.md names every Redis key and every Lua
script, and the egress drain the deploy guide states is the one the code uses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from services.egress.main import PUBLISH_MARGIN_S
from shared import keys, lua

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("document", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository_and_resolve(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (document.parent / target).resolve()
        assert REPO in resolved.parents or resolved == REPO, f"{document.name} links outside: {target}"
        assert resolved.exists(), f"{document.name} links to a missing file: {target}"


def test_the_architecture_names_every_redis_key() -> None:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tree = ast.parse((REPO / "shared" / "keys.py").read_text(encoding="utf-8"))
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    names += [
        t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    ]
    assert len(names) > 15
    missing = [name for name in names if f"`{name}`" not in text]
    assert missing == [], f"docs/ARCHITECTURE.md's key table lacks {missing}"
    assert f"`{keys.inbox('pk')}`" in text  # the table shows real names, hash tag included


def test_the_architecture_lists_every_lua_script() -> None:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text[text.index("| script (`shared/lua.py`)") :].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \| `([\w/.]+)`", table, flags=re.MULTILINE)
    scripts = lua.all_scripts()
    assert sorted(name for name, _ in documented) == sorted(scripts), "docs/ARCHITECTURE.md's script table"
    for name, caller in documented:
        assert (REPO / caller).exists() and f"lua.{name}" in (REPO / caller).read_text(encoding="utf-8"), (
            f"{name} is not run by {caller}"
        )


def test_the_deploy_guide_states_the_egress_drain_the_code_uses() -> None:
    guide = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    assert f"`egress.jobTimeoutSeconds` + {PUBLISH_MARGIN_S} s" in guide
    egress_part = guide[guide.index("- **egress,") :].split("\n- **", 1)[0]
    assert "DRAIN_TIMEOUT_S" not in egress_part
