"""The tested library versions: pyproject's ranges, shared/versions.py's startup check and
constraints.txt (what `make install` and the image install) agree with each other and with the
venv the suite runs in."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version

import pytest

from shared import versions
from tests.support.processes import REPO_ROOT


def pyproject_dependencies() -> dict[str, str]:
    """Runtime dependency name -> its specifier text, from pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        assert match is not None, requirement
        found[match[1].lower()] = match[2].strip()
    return found


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt pins exact versions only: {line!r}"
            pins[name.lower().replace("_", "-")] = pinned
    return pins


@pytest.mark.parametrize("distribution", sorted(versions.TESTED_RANGES))
def test_the_startup_check_and_pyproject_name_the_same_range(distribution: str) -> None:
    low, high = versions.TESTED_RANGES[distribution]
    assert pyproject_dependencies()[distribution] == f">={low},<{high}"


@pytest.mark.parametrize("distribution", sorted(versions.TESTED_RANGES))
def test_the_installed_version_is_inside_the_tested_range(distribution: str) -> None:
    assert versions.untested(distribution) is None
    versions.require_tested("test", distribution)  # does not exit


def test_an_untested_release_is_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = version("aiosmtpd")
    monkeypatch.setitem(versions.TESTED_RANGES, "aiosmtpd", ("0.1", "0.2"))
    with pytest.raises(SystemExit) as refused:
        versions.require_tested("ingress", "aiosmtpd")
    message = str(refused.value.code)
    print(message)
    assert message.startswith(f"protege-relay ingress: aiosmtpd {installed} is untested (tested: >=0.1,<0.2)")
    assert "constraints.txt" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("installed", "inside"),
    [("1.4.6", True), ("1.4.6.post2", True), ("1.4.9", True), ("1.4.5", False), ("1.5.0", False), ("1.5rc1", False)],
)
def test_range_edges(installed: str, inside: bool) -> None:
    assert (versions.untested("aiosmtpd", installed) is None) == inside


def test_constraints_pin_every_dependency_at_the_version_the_suite_runs() -> None:
    pins = constraints()
    for name in pyproject_dependencies():
        if name == "uvloop" and name not in pins:
            continue  # not installed where its marker excludes it
        assert name in pins, f"{name} missing from constraints.txt (make constraints)"
        assert version(name) == pins[name], f"{name}: venv has {version(name)}, constraints.txt {pins[name]}"
