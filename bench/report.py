"""What a benchmark run produced, summarised the same way for every figure.

A figure is one or more metrics; each metric has a value per round and, when the issue asks
for one, a baseline measured in the same round on the same machine. The report gives the
median and spread (min..max) of both, the ratio of the medians, the range of the per-round
paired ratios, and whether the target holds — as markdown for people and JSON for tools.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """`ratio >= 1.8` (value over baseline) or `value <= 2.0` / `value >= x` on the value itself."""

    kind: str  # "ratio_at_least" | "ratio_at_most" | "value_at_most" | "value_at_least"
    threshold: float

    def describe(self, unit: str) -> str:
        if self.kind == "ratio_at_least":
            return f">= {self.threshold:g}x baseline"
        if self.kind == "ratio_at_most":
            return f"<= {self.threshold:g}x baseline"
        sign = "<=" if self.kind == "value_at_most" else ">="
        return f"{sign} {self.threshold:g} {unit}"


@dataclass
class Metric:
    name: str
    unit: str
    rounds: list[float] = field(default_factory=list)
    baseline_rounds: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: Target | None = None
    notes: str = ""

    def summary(self) -> dict[str, Any]:
        value = _spread(self.rounds)
        baseline = _spread(self.baseline_rounds)
        ratio = None
        paired: list[float] = []
        if value and baseline and baseline["median"]:
            ratio = value["median"] / baseline["median"]
            paired = [v / b for v, b in zip(self.rounds, self.baseline_rounds, strict=False) if b]
        met: bool | None = None
        if self.target is not None and value:
            if self.target.kind == "ratio_at_least":
                met = None if ratio is None else ratio >= self.target.threshold
            elif self.target.kind == "ratio_at_most":
                met = None if ratio is None else ratio <= self.target.threshold
            elif self.target.kind == "value_at_most":
                met = value["median"] <= self.target.threshold
            else:
                met = value["median"] >= self.target.threshold
        return {
            "name": self.name,
            "unit": self.unit,
            "value": value,
            "baseline_name": self.baseline_name,
            "baseline": baseline,
            "ratio": ratio,
            "paired_ratios": paired,
            "target": None if self.target is None else self.target.describe(self.unit),
            "target_met": met,
            "notes": self.notes,
        }


@dataclass
class FigureResult:
    figure: str
    title: str
    how: str
    metrics: list[Metric] = field(default_factory=list)
    skipped: str = ""  # why the relay side could not be measured (service not there yet, ...)
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, name: str, unit: str, **kwargs: Any) -> Metric:
        for existing in self.metrics:
            if existing.name == name:
                return existing
        created = Metric(name, unit, **kwargs)
        self.metrics.append(created)
        return created

    def as_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "title": self.title,
            "how": self.how,
            "skipped": self.skipped,
            "errors": self.errors,
            "details": self.details,
            "seconds": round(self.seconds, 1),
            "metrics": [m.summary() | {"rounds": m.rounds, "baseline_rounds": m.baseline_rounds} for m in self.metrics],
        }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def machine_info(redis_version: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "redis": redis_version,
        "uvloop": _version_of("uvloop"),
        "websockets": _version_of("websockets"),
        "aiosmtpd": _version_of("aiosmtpd"),
        "load_average_at_start": list(os.getloadavg()),
    }
    info["git_commit"] = _git_commit()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version_of(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[1],
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_reports(
    out_dir: Path, mode: str, machine: dict[str, Any], figures: list[FigureResult], started_at: float
) -> tuple[Path, Path]:
    document = {
        "mode": mode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "duration_s": round(time.time() - started_at, 1),
        "machine": machine,
        "figures": [figure.as_json() for figure in figures],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(render_markdown(document))
    return md_path, json_path


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_spread(spread: dict[str, float] | None) -> str:
    if not spread:
        return "—"
    return f"{_fmt(spread['median'])} ({_fmt(spread['min'])}-{_fmt(spread['max'])}, n={int(spread['n'])})"


def render_markdown(document: dict[str, Any]) -> str:
    machine = document["machine"]
    lines = [
        "# Protege Relay benchmark report",
        "",
        f"Mode **{document['mode']}**, started {document['started_at']}, took {document['duration_s']} s.",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['platform']}, "
        f"Python {machine['python']}, Redis {machine['redis']}, uvloop {machine['uvloop']}, "
        f"websockets {machine['websockets']}, aiosmtpd {machine['aiosmtpd']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}; "
        f"commit {machine.get('git_commit') or '?'}.",
        "",
        "Values are the median over rounds with (min-max, rounds). The ratio is median value over "
        "median baseline; 'paired' is the range of per-round ratios (baseline and relay measured "
        "back to back in each round).",
        "",
        "| figure | metric | value | baseline | ratio (paired) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure in document["figures"]:
        if not figure["metrics"]:
            lines.append(f"| {figure['title']} | — | {figure['skipped'] or 'no result'} | | | | |")
        for metric in figure["metrics"]:
            paired = metric["paired_ratios"]
            ratio = "—" if metric["ratio"] is None else f"{metric['ratio']:.2f}x"
            if len(paired) > 1:
                ratio += f" ({min(paired):.2f}-{max(paired):.2f})"
            value = _fmt_spread(metric["value"])
            if metric["value"] is None and figure["skipped"]:
                value = f"not measured: {figure['skipped']}"
            baseline = _fmt_spread(metric["baseline"])
            if metric["baseline_name"] and metric["baseline"]:
                baseline = f"{baseline} [{metric['baseline_name']}]"
            met = {True: "yes", False: "**no**", None: "—"}[metric["target_met"]]
            lines.append(
                f"| {figure['title']} | {metric['name']} ({metric['unit']}) | {value} | {baseline} | "
                f"{ratio} | {metric['target'] or '—'} | {met} |"
            )
    lines += ["", "## Figures", ""]
    for figure in document["figures"]:
        lines += [f"### {figure['title']} (`{figure['figure']}`, {figure['seconds']} s)", "", figure["how"], ""]
        if figure["skipped"]:
            lines += [f"Relay side not measured: {figure['skipped']}", ""]
        for metric in figure["metrics"]:
            if metric["notes"]:
                lines.append(f"- {metric['name']}: {metric['notes']}")
            rounds = ", ".join(_fmt(v) for v in metric["rounds"]) or "—"
            baseline_rounds = ", ".join(_fmt(v) for v in metric["baseline_rounds"]) or "—"
            lines.append(f"- {metric['name']} rounds: {rounds}; baseline rounds: {baseline_rounds}")
        for key, value in figure["details"].items():
            lines.append(f"- {key}: {json.dumps(value) if not isinstance(value, str) else value}")
        for error in figure["errors"]:
            lines.append(f"- error: {error}")
        lines.append("")
    return "\n".join(lines) + "\n"


def print_line(text: str) -> None:
    """Progress on stderr, so stdout stays free for whoever runs `python -m bench`."""
    print(text, file=sys.stderr, flush=True)


__all__ = ["FigureResult", "Metric", "Target", "asdict", "machine_info", "print_line", "write_reports"]
