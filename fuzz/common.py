"""What every harness's `__main__` does: write its seed inputs when asked (`--write-seeds=DIR`,
used by `run.py`), else hand over to libFuzzer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

SEEDS_FLAG = "--write-seeds="


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], list[bytes]]) -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith(SEEDS_FLAG):
        directory = Path(sys.argv[1][len(SEEDS_FLAG) :])
        directory.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds()):
            (directory / f"seed-{index}").write_bytes(seed)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
