"""`python -m bench [--quick | --smoke] [--only FIGURE ...] [--out DIR]`.

Starts one embedded Redis, runs each figure (relay and same-run baseline, several rounds),
and writes `report.md` and `report.json` (default into `bench/`). A figure that fails is
recorded with its error and the run goes on, so one broken service does not hide the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.harness import BenchError, bench_session
from bench.modes import FULL, QUICK, SMOKE
from bench.report import FigureResult, machine_info, print_line, write_reports

FIGURES = (
    "ingress_rate",
    "inbound_latency",
    "tunnel_throughput",
    "egress_rate",
    "idle_tunnels",
    "auth_rate",
    "e2e_cpu",
    "delivering_rate",
    "sender_auth_rate",
)
DEFAULT_OUT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes")
    speed.add_argument("--smoke", action="store_true", help="tiny sizes, one round: proves the harness")
    parser.add_argument("--only", action="append", choices=FIGURES, help="run only this figure (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for report.md/.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (service logs)")
    args = parser.parse_args(argv)
    mode = SMOKE if args.smoke else QUICK if args.quick else FULL
    selected = args.only or list(FIGURES)
    started_at = time.time()
    results: list[FigureResult] = []
    with bench_session(keep_dir=args.keep) as bench:
        machine = machine_info(bench.redis_version())
        print_line(f"bench: mode {mode.name}, figures {', '.join(selected)}, scratch {bench.work_dir}")
        for name in selected:
            print_line(f"bench: {name}")
            figure_started = time.perf_counter()
            try:
                module = importlib.import_module(f"bench.{name}")
                result: FigureResult = module.run(bench, mode)
            except (BenchError, OSError, RuntimeError, ValueError, KeyError) as exc:
                result = FigureResult(name, name, "")
                result.errors.append(f"{type(exc).__name__}: {exc}")
                print_line(traceback.format_exc())
            finally:
                bench.stop_all()
            result.seconds = time.perf_counter() - figure_started
            results.append(result)
            print_line(f"bench: {name} done in {result.seconds:.1f} s")
    md_path, json_path = write_reports(args.out, mode.name, machine, results, started_at)
    print_line(f"bench: wrote {md_path} and {json_path}")
    sys.stdout.write(md_path.read_text())
    return 1 if any(result.errors for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
