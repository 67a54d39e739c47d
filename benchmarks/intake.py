"""Measurement 3: receptionist webhook intake against one `hubline serve` process.

Three servers, each one uvicorn process started the same way: a bare Starlette endpoint
that reads the body and answers 200 without storing, Hubline on SQLite and Hubline on
PostgreSQL. Hubline runs with `--no-worker`: this measures the webhook path (verify the
Standard Webhooks signature, validate, encrypt, store durably, answer); the worker's
cost is what the drain measures, and deployments that care about intake run workers as
separate processes (`hubline worker`). A fourth server gives context, not a verdict: the
bound (benchmarks/intake_bound.py), Hubline's own validation, hashing and encryption and
a group-committed SQLite insert with no web framework or ORM around them, shows how far
the 0.3x target is from what this stack allows in one process.

Every request is a new event (unique id, signed beforehand), sent by 50 concurrent
connections from wrk (C, one thread) when installed, else by the aiohttp generator in
its own process. Rounds alternate between the servers so drift on this shared machine
hits them all alike; the table shows the median round. Throughput counts answers in
2xx, and for Hubline the rows the inbox gained are checked against them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.crypto import new_webhook_secret
from benchmarks import harness
from benchmarks.context import Bench
from benchmarks.report import Row, fmt, verdict
from benchmarks.workload import realistic_mix, write_signed_requests

INTAKE_PORTAL = 1003
WARMUP_SECONDS = 1.0
# More signed events than Hubline can take in all its rounds (9,000/s for 16 s): a round
# that ran past the end would send repeats, which measure the duplicate path instead.
REQUESTS_PER_SERVER = 150_000

THROUGHPUT_TARGET = 1_000.0
SHARE_OF_BARE_TARGET = 0.3
P99_TARGET_MS = 100.0
# Above this share of a core the generator, not the server, sets the pace (2 cores here).
GENERATOR_SATURATED = 0.8


@dataclass
class Target:
    name: str
    proc: harness.Proc
    url: str
    requests_file: Path
    database_url: str | None = None
    lines: int = 0  # signed requests in the file; 0: the bare endpoint's, which cycles
    offset: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    repeats: dict[str, Any] | None = None  # a round that re-sends events already stored

    def median(self, key: str) -> float:
        return float(statistics.median(r[key] for r in self.rounds))


def load_tool(bench: Bench) -> str:
    wanted = bench.options.load_tool
    if wanted == "wrk" or (wanted == "auto" and shutil.which("wrk")):
        return "wrk"
    return "aiohttp"


async def run_load(
    bench: Bench, target: Target, seconds: float, *, tool: str, repeat: bool = False
) -> dict[str, Any]:
    """One timed burst at `target`; answers throughput, latency and CPU use on both sides.

    Each burst sends events not sent before, unless `repeat`: then it re-sends the events the
    first measured round had answered, as a sender retrying everything it sent would.
    """
    offset = 0 if repeat else target.offset
    requests_file = _answered_requests(target) if repeat else target.requests_file
    concurrency = bench.options.intake_concurrency
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu_before = harness.cpu_seconds(target.proc.pid)
    stored_before = await _stored(target)
    if tool == "wrk":
        args = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(harness.REPO / "benchmarks" / "wrk.lua"),
            target.url,
            "--",
            str(requests_file),
            str(offset),
        ]
    else:
        args = [
            harness.PYTHON,
            "-m",
            "benchmarks.loadgen",
            "--url",
            target.url,
            "--requests",
            str(requests_file),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(seconds),
            "--offset",
            str(offset),
        ]
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=harness.REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{tool} failed: {err.decode()[-1000:]}")
    server_cpu = harness.cpu_seconds(target.proc.pid) - server_cpu_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    generator_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    result = _parse(tool, out.decode())
    stored = await _stored(target)
    result |= {
        "server_cpu_share": server_cpu / result["elapsed_s"],
        "generator_cpu_share": generator_cpu / result["elapsed_s"],
        "stored": None if stored is None or stored_before is None else stored - stored_before,
    }
    if repeat:
        return result
    result["offset"] = offset
    # Each round starts past every line this one may have sent (wrk does not count the
    # requests still in flight when it stops), so no event is ever sent twice.
    target.offset += int(result.get("lines", result["sent"])) + concurrency
    if target.lines and target.offset > target.lines:
        raise RuntimeError(
            f"{target.name}: the rounds used up the {target.lines} signed events and sent "
            "some twice; raise REQUESTS_PER_SERVER"
        )
    return result


def _answered_requests(target: Target) -> Path:
    """As many requests as the first measured round got 2xx answers, from its first line.

    Both load tools hand lines out in order, so every one of these was sent (the repeat
    round's check, none stored again, confirms each had been stored). Lines a round
    skipped (the margin left for requests in flight when it stopped) were never sent, so
    re-sending from the first line would store a few events for the first time.
    """
    first = target.rounds[0]
    path = target.requests_file.with_name(target.requests_file.stem + "-answered.tsv")
    with target.requests_file.open() as source:
        lines = itertools.islice(source, first["offset"], first["offset"] + first["ok"])
        path.write_text("".join(lines))
    return path


def _parse(tool: str, output: str) -> dict[str, Any]:
    if tool == "aiohttp":
        data: dict[str, Any] = json.loads(output)
        return data
    line = next(x for x in output.splitlines() if x.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    elapsed = raw["duration_us"] / 1e6
    failed = raw["status_errors"] + raw["timeouts"]
    ok = raw["requests"] - raw["status_errors"]
    return {
        "tool": "wrk",
        "sent": raw["requests"],
        "ok": ok,
        "errors": failed + raw["connect_errors"] + raw["read_errors"] + raw["write_errors"],
        "elapsed_s": elapsed,
        "rps": ok / elapsed if elapsed else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }


async def _stored(target: Target) -> int | None:
    if target.database_url is None:
        return None
    query = "SELECT count(*) FROM events WHERE source = 'receptionist'"
    return int(await harness.scalar(target.database_url, query))


async def hubline_target(bench: Bench, kind: str) -> Target:
    database_url = await bench.databases.fresh(kind, f"intake_{kind}")
    proc = await harness.start_hubline(
        bench.stack,
        f"hubline-intake-{kind}",
        database_url=database_url,
        sandbox_url=bench.sandbox.url,
        worker=False,
    )
    installed = await harness.install_portal(proc.url, bench.sandbox.url, INTAKE_PORTAL)
    events = realistic_mix(REQUESTS_PER_SERVER, seed=21, prefix=f"i{kind[0]}").events
    requests_file = write_signed_requests(
        events, installed.webhook_secret, bench.work_dir / f"intake-{kind}.tsv"
    )
    return Target(
        f"Hubline, {kind}",
        proc,
        installed.webhook_url,
        requests_file,
        database_url,
        lines=len(events),
    )


async def bound_target(bench: Bench) -> Target:
    """benchmarks/intake_bound.py: Hubline's unskippable work without framework or ORM."""
    database_url = await bench.databases.fresh("sqlite", "intake_bound")
    secret = new_webhook_secret()
    proc = await harness.start_bound(bench.stack, database_url=database_url, secret=secret)
    events = realistic_mix(REQUESTS_PER_SERVER, seed=21, prefix="ib").events
    requests_file = write_signed_requests(events, secret, bench.work_dir / "intake-bound.tsv")
    return Target(
        "bound, sqlite",
        proc,
        f"{proc.url}/webhooks/portals/{INTAKE_PORTAL}/receptionist",
        requests_file,
        database_url,
        lines=len(events),
    )


async def measure(bench: Bench) -> None:
    options = bench.options
    tool = load_tool(bench)
    bare_proc = await harness.start_bare(bench.stack)
    bare_file = write_signed_requests(
        realistic_mix(20_000, seed=22, prefix="bare").events,
        "whsec_" + "A" * 43 + "=",
        bench.work_dir / "intake-bare.tsv",
    )
    bare = Target(
        "bare",
        bare_proc,
        f"{bare_proc.url}/webhooks/portals/{INTAKE_PORTAL}/receptionist",
        bare_file,
    )
    targets = [bare, await hubline_target(bench, "sqlite")]
    if bench.databases.has_postgres:
        targets.append(await hubline_target(bench, "postgres"))
    bound = await bound_target(bench)
    targets.append(bound)
    for target in targets:
        await run_load(bench, target, WARMUP_SECONDS, tool=tool)
    for _ in range(options.intake_rounds):
        for target in targets:
            target.rounds.append(await run_load(bench, target, options.intake_seconds, tool=tool))
    for target in targets[1:-1]:
        target.repeats = await run_load(
            bench, target, options.intake_seconds, tool=tool, repeat=True
        )
    for target in targets:
        await bench.stack.stop(target.proc)
    _add_rows(bench, tool, bare, targets[1:-1])
    _add_bound_row(bench, bare, bound, targets[1:-1])


def _add_rows(bench: Bench, tool: str, bare: Target, hublines: list[Target]) -> None:
    report = bench.report
    bare_rps = bare.median("rps")
    for target in hublines:
        rps = target.median("rps")
        p50, p99 = target.median("p50_ms"), target.median("p99_ms")
        share = rps / bare_rps if bare_rps else None
        stored = sum(r["stored"] or 0 for r in target.rounds)
        ok = sum(r["ok"] for r in target.rounds)
        report.add(
            Row(
                f"3. intake {target.name.removeprefix('Hubline, ')}: events/s",
                fmt(rps, 0),
                f"{fmt(bare_rps, 0)} (bare)",
                f"{share:.2f}x" if share is not None else "-",
                f">= {THROUGHPUT_TARGET:,.0f}; >= {SHARE_OF_BARE_TARGET}x bare",
                verdict(rps >= THROUGHPUT_TARGET and (share or 0) >= SHARE_OF_BARE_TARGET),
                f"median of {len(target.rounds)} rounds of {bench.options.intake_seconds:g}s "
                f"(rounds: {', '.join(fmt(r['rps'], 0) for r in target.rounds)}; bare: "
                f"{', '.join(fmt(r['rps'], 0) for r in bare.rounds)}); "
                f"{stored:,} events stored for {ok:,} 2xx answers; server CPU "
                f"{target.median('server_cpu_share'):.0%}, {tool} CPU "
                f"{target.median('generator_cpu_share'):.0%} of a core",
            )
        )
        if target.repeats is not None:
            repeats = target.repeats
            report.add(
                Row(
                    f"3. intake {target.name.removeprefix('Hubline, ')}: repeats/s",
                    fmt(repeats["rps"], 0),
                    f"{fmt(rps, 0)} (new events)",
                    f"{repeats['rps'] / rps:.2f}x" if rps else "-",
                    "stores none",
                    verdict(repeats["stored"] == 0),
                    note=(
                        f"one round re-sending the {target.rounds[0]['ok']:,} events the first "
                        f"round stored (a sender retrying everything): {repeats['ok']:,} "
                        f"answered, {repeats['stored'] or 0:,} stored again; p99 "
                        f"{repeats['p99_ms']:.1f} ms"
                    ),
                )
            )
        report.add(
            Row(
                f"3. intake {target.name.removeprefix('Hubline, ')}: p50 / p99 ms",
                f"{p50:.1f} / {p99:.1f}",
                f"{bare.median('p50_ms'):.1f} / {bare.median('p99_ms'):.1f}",
                "-",
                f"p99 < {P99_TARGET_MS:g}",
                verdict(p99 < P99_TARGET_MS),
            )
        )
    generator_share = bare.median("generator_cpu_share")
    if generator_share > GENERATOR_SATURATED:
        report.notes.append(
            f"intake: WARNING the load generator ({tool}) used {generator_share:.0%} of a core "
            "against the bare endpoint, so it, not the server, bounded the bare figure: the "
            "ratios to bare flatter Hubline. Install wrk (apt-get install wrk) and rerun."
        )
    report.notes.append(
        f"intake: load from {tool} at {bench.options.intake_concurrency} connections; the bare "
        f"endpoint used {bare.median('server_cpu_share'):.0%} of a core and the generator "
        f"{bare.median('generator_cpu_share'):.0%} at {fmt(bare_rps, 0)} requests/s."
    )
    report.results["intake"] = {
        "tool": tool,
        "concurrency": bench.options.intake_concurrency,
        "seconds_per_round": bench.options.intake_seconds,
        "servers": {
            t.name: {"rounds": t.rounds, "median_rps": t.median("rps"), "repeats": t.repeats}
            for t in [bare, *hublines]
        },
    }


def _add_bound_row(bench: Bench, bare: Target, bound: Target, hublines: list[Target]) -> None:
    """The bound's figure: context for the 0.3x target, not a measurement of Hubline."""
    bare_rps, bound_rps = bare.median("rps"), bound.median("rps")
    stored = sum(r["stored"] or 0 for r in bound.rounds)
    ok = sum(r["ok"] for r in bound.rounds)
    hubline_shares = ", ".join(
        f"{t.name.removeprefix('Hubline, ')} {t.median('rps') / bound_rps:.0%}" for t in hublines
    )
    bench.report.add(
        Row(
            "3. intake bound: the same work, no framework or ORM (SQLite), events/s",
            fmt(bound_rps, 0),
            f"{fmt(bare_rps, 0)} (bare)",
            f"{bound_rps / bare_rps:.2f}x" if bare_rps else "-",
            "context, not Hubline",
            "-",
            f"benchmarks/intake_bound.py: verify, validate with parse_event, hash, encrypt, "
            f"group-commit by sqlite3, answer; median of {len(bound.rounds)} rounds (rounds: "
            f"{', '.join(fmt(r['rps'], 0) for r in bound.rounds)}); {stored:,} events stored "
            f"for {ok:,} 2xx answers; p50 / p99 {bound.median('p50_ms'):.1f} / "
            f"{bound.median('p99_ms'):.1f} ms; server CPU "
            f"{bound.median('server_cpu_share'):.0%}; Hubline reaches {hubline_shares} of it",
        )
    )
    bench.report.results["intake"]["servers"][bound.name] = {
        "rounds": bound.rounds,
        "median_rps": bound_rps,
    }
