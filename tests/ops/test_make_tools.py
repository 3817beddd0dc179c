"""`make test` on a fresh machine: scripts/test-tools.sh provides swaks and docker-compose or
says in one line what to install. Run with a PATH holding only the tools each case needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.processes import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "test-tools.sh"
BASICS = ("sh", "id")


def path_with(tmp_path: Path, *tools: str) -> str:
    """A PATH directory holding links to exactly `tools` (plus the shell basics)."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    for tool in (*BASICS, *tools):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to run this test"
        os.symlink(found, folder / tool)
    return str(folder)


def run_script(path: str) -> subprocess.CompletedProcess[str]:
    shell = shutil.which("sh")
    assert shell is not None
    return subprocess.run(
        [shell, str(SCRIPT)], env={"PATH": path}, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT
    )


def test_nothing_happens_when_the_tools_are_there(tmp_path: Path) -> None:
    result = run_script(path_with(tmp_path, "swaks", "docker-compose"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_without_apt_get_one_line_says_what_to_install_and_make_stops(tmp_path: Path) -> None:
    result = run_script(path_with(tmp_path, "docker-compose"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("make test needs swaks: install it")
    assert "apt-get install swaks libnet-ssleay-perl" in line and "brew install swaks" in line
    both = run_script(path_with(tmp_path / "none"))
    assert both.returncode == 1 and "needs swaks docker-compose" in both.stderr


def test_the_makefile_runs_the_tools_check_before_the_tests() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "test: install test-tools" in makefile and "scripts/test-tools.sh" in makefile
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line.startswith("make ")] == ["make install", "make lint", "make test"]
