"""The three services are deployed apart, so none may import another (shared/ is their common ground)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
SERVICES = sorted(p.name for p in SERVICES_DIR.iterdir() if (p / "__init__.py").exists())


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = [f"services.{other}" for other in SERVICES if other != service]
    offenders = [
        f"{path.relative_to(SERVICES_DIR)} imports {module}"
        for path in sorted((SERVICES_DIR / service).rglob("*.py"))
        for module in _imported_modules(path)
        if any(module == other or module.startswith(other + ".") for other in others)
    ]
    assert offenders == []
    assert len(SERVICES) == 3


TUNNEL_DIR = SERVICES_DIR / "tunnel"


def test_the_tunnel_connection_does_not_import_the_node() -> None:
    """The connection gets narrow interfaces (`ConnectionContext`), not the node: the node builds
    them, so the import goes one way only, and neither the registry nor the router knows the node."""
    for module in ("connection.py", "registry.py", "result_router.py", "duties.py", "session.py"):
        imported = _imported_modules(TUNNEL_DIR / module)
        assert "services.tunnel.node" not in imported, module
    assert "services.tunnel.connection" not in _imported_modules(TUNNEL_DIR / "registry.py")


def test_every_tunnel_module_says_why_it_exists() -> None:
    missing = [
        path.name
        for path in sorted(TUNNEL_DIR.glob("*.py"))
        if path.name != "__init__.py" and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert missing == []
