"""`make fuzz`: run each atheris harness for a bounded time and fail if any of them finds an
input that raises something other than its documented errors.

Each harness runs as its own process (libFuzzer owns the process) with a fresh corpus seeded
from the harness's `seeds()`, under `var/fuzz/<name>/`; a failing input is kept there as
`crash-*` for reproduction: `PYTHONPATH=. .venv/bin/python fuzz/fuzz_<name>.py <crash file>`.
`FUZZ_SECONDS` (default 60) bounds each harness.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HARNESSES = ("frames", "control", "session")
DEFAULT_SECONDS = 60
RSS_LIMIT_MB = 1024


def run(name: str, seconds: int, work: Path) -> bool:
    harness = REPO_ROOT / "fuzz" / f"fuzz_{name}.py"
    corpus = work / name / "corpus"
    shutil.rmtree(work / name, ignore_errors=True)
    corpus.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, str(harness), f"--write-seeds={corpus}"], env=env, check=True, stderr=subprocess.DEVNULL
    )
    command = [
        sys.executable,
        str(harness),
        str(corpus),
        f"-max_total_time={seconds}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={work / name}/",
        "-print_final_stats=1",
    ]
    print(f"fuzz {name}: {seconds} s", flush=True)
    log_path = work / name / "fuzz.log"
    with log_path.open("wb") as log:
        outcome = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    tail = log_path.read_text(errors="replace").splitlines()
    summary = [line for line in tail if "DONE" in line or line.startswith("stat::number_of_executed_units")]
    print("\n".join(summary[-2:]) or "\n".join(tail[-5:]), flush=True)
    if outcome.returncode != 0:
        print(f"fuzz {name}: FAILED (exit {outcome.returncode}); see {log_path}", flush=True)
        print("\n".join(tail[-40:]), flush=True)
        return False
    return True


def main() -> int:
    seconds = int(os.environ.get("FUZZ_SECONDS", DEFAULT_SECONDS))
    work = REPO_ROOT / "var" / "fuzz"
    chosen = sys.argv[1:] or list(HARNESSES)
    failed = [name for name in chosen if not run(name, seconds, work)]
    if failed:
        print(f"fuzzing found failures in: {', '.join(failed)}")
        return 1
    print("fuzzing: no failures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
