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
