"""The one table the benchmark prints, and the JSON it writes next to it."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PASS, MISS, NOT_RUN = "pass", "MISS", "n/a"


@dataclass
class Row:
    """One line of the table: a measurement, both sides, their ratio and the target."""

    measurement: str
    hubline: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    status: str = NOT_RUN
    note: str = ""


def verdict(ok: bool | None) -> str:
    if ok is None:
        return NOT_RUN
    return PASS if ok else MISS


def fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.{digits}f}"
    return f"{text}{unit}"


def ratio(value: float | None, reference: float | None, *, suffix: str = "x") -> str:
    if value is None or not reference:
        return "-"
    return (
        f"{value / reference:,.2f}{suffix}"
        if value / reference < 10
        else (f"{value / reference:,.0f}{suffix}")
    )


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def table(self) -> str:
        headers = ("measurement", "Hubline", "baseline", "ratio", "target", "result")
        cells = [
            (r.measurement, r.hubline, r.baseline, r.ratio, r.target, r.status) for r in self.rows
        ]
        widths = [max(len(str(c[i])) for c in [headers, *cells]) for i in range(len(headers))]
        lines = [
            "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
            "  ".join("-" * w for w in widths),
        ]
        lines += [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
        ]
        footnotes = [f"- {r.measurement}: {r.note}" for r in self.rows if r.note]
        if footnotes:
            lines += ["", "Notes:", *footnotes]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def write_json(self, path: Path, *, command: str, elapsed_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "command": command,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed_s, 1),
            "commit": _commit(),
            "machine": {
                "python": platform.python_version(),
                "cpus": _cpus(),
                "platform": platform.platform(),
            },
            "table": [asdict(row) for row in self.rows],
            "notes": self.notes,
            "results": _rounded(self.results),
        }
        path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _rounded(value: Any) -> Any:
    """Floats to 4 significant places, so the file stays small and diffs stay readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
