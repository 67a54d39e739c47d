"""A run's result, the printed table, and reliability/results/latest.json."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def say(message: str) -> None:
    """A progress line (stderr): the table and the JSON stay on their own streams."""
    print(f"  · {message}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    number: int
    name: str
    injected: str
    sent: int = 0
    lost: int = 0
    duplicated: int = 0
    passed: bool = False
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def check(self, name: str, ok: bool) -> None:
        self.checks[name] = bool(ok)

    def settle(self) -> RunResult:
        self.passed = self.error is None and bool(self.checks) and all(self.checks.values())
        return self


def _cell(text: object, width: int) -> str:
    value = str(text)
    return value if len(value) <= width else value[: width - 1] + "…"


def table(results: list[RunResult]) -> str:
    header = (
        f"{'#':>2}  {'run':<18} {'injected':<58} {'sent':>7} {'lost':>5} {'dup':>4} {'s':>6}"
        "  result"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(
            f"{r.number:>2}  {_cell(r.name, 18):<18} {_cell(r.injected, 58):<58} "
            f"{r.sent:>7} {r.lost:>5} {r.duplicated:>4} {r.seconds:>6.0f}  {verdict}"
        )
    lines.append("")
    for r in results:
        failed = [name for name, ok in r.checks.items() if not ok]
        summary = ", ".join(
            f"{k}={v}" for k, v in r.details.items() if not isinstance(v, dict | list)
        )
        lines.append(f"{r.number}. {r.name}: {summary}")
        for name, ok in r.checks.items():
            lines.append(f"     [{'x' if ok else ' '}] {name}")
        if r.error:
            lines.append(f"     error: {r.error}")
        elif failed:
            lines.append(f"     failed: {', '.join(failed)}")
    return "\n".join(lines)


def write_json(
    results: list[RunResult],
    path: Path | None = None,
    *,
    keep_other_runs: bool | None = None,
    **meta: Any,
) -> Path:
    """Write the report. Into the default latest.json (or with `keep_other_runs`), runs
    made now replace their earlier results and the other runs' stay, each with the
    command and time that made it: a partial run (`--runs 1,4`) does not erase the
    report of the whole suite. Elsewhere (`--output`), this invocation's runs alone."""
    target = path or RESULTS_DIR / "latest.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    runs = {r.number: {**asdict(r), "finished_at": finished_at, **meta} for r in results}
    if keep_other_runs is None:
        keep_other_runs = path is None
    if keep_other_runs:
        for run in _earlier_runs(target):
            runs.setdefault(run["number"], run)
    document = {
        "finished_at": finished_at,
        "passed": all(run["passed"] for run in runs.values()),
        "runs": [runs[number] for number in sorted(runs)],
    }
    target.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return target


def _earlier_runs(target: Path) -> list[dict[str, Any]]:
    """The runs of an earlier report, each carrying its document's command and time."""
    try:
        earlier = json.loads(target.read_text())
    except (OSError, ValueError):
        return []
    shared = {key: earlier[key] for key in ("finished_at", "command", "logs") if key in earlier}
    return [
        {**shared, **run}
        for run in earlier.get("runs", [])
        if isinstance(run, dict) and isinstance(run.get("number"), int)
    ]
