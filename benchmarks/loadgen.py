"""A load generator in a process of its own: signed receptionist webhooks over aiohttp.

    python -m benchmarks.loadgen --url URL --requests FILE --concurrency 50 [--duration S]

FILE is what `workload.write_signed_requests` writes. With `--duration` the senders
cycle through it for that long (measuring throughput and latency); without it every
line is sent once (delivering a workload), or with `--max-seconds` the lines that can
be started in that time, rounded up to a multiple of `--multiple`: always a prefix of
the file, whose length is `lines`. Prints
one JSON object. httpx's AsyncClient is not used here: at 50 concurrent connections it,
not the server, would be measured.
`benchmarks/wrk.lua` does the same job with wrk when wrk is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from benchmarks.harness import percentile


def read_requests(path: Path) -> list[tuple[dict[str, str], bytes]]:
    requests = []
    for line in path.read_text().splitlines():
        msg_id, stamp, signature, body = line.split("\t", 3)
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": stamp,
            "webhook-signature": signature,
            "content-type": "application/json",
        }
        requests.append((headers, body.encode()))
    return requests


async def send(
    url: str,
    requests: list[tuple[dict[str, str], bytes]],
    *,
    concurrency: int,
    duration: float | None,
    max_seconds: float | None = None,
    multiple: int = 1,
    offset: int = 0,
) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    next_index = offset if duration else 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.perf_counter()
    deadline = started + duration if duration else None
    cutoff = started + max_seconds if max_seconds else None

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while True:
            if deadline is not None:
                if time.perf_counter() >= deadline:
                    return
                headers, body = requests[next_index % len(requests)]
            else:
                if next_index >= len(requests):
                    return
                if (
                    cutoff is not None
                    and time.perf_counter() >= cutoff
                    and next_index % multiple == 0
                ):
                    return
                headers, body = requests[next_index]
            next_index += 1
            sent = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1
                continue
            latencies.append(time.perf_counter() - sent)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    return {
        "tool": "aiohttp",
        "sent": sum(statuses.values()),
        "lines": next_index - (offset if duration else 0),
        "ok": ok,
        "statuses": dict(statuses),
        "elapsed_s": elapsed,
        "rps": ok / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--multiple", type=int, default=1)
    parser.add_argument("--offset", type=int, default=0, help="with --duration: first line")
    args = parser.parse_args(argv)
    requests = read_requests(args.requests)
    work = send(
        args.url,
        requests,
        concurrency=args.concurrency,
        duration=args.duration,
        max_seconds=args.max_seconds,
        multiple=args.multiple,
        offset=args.offset,
    )
    try:
        import uvloop  # uvicorn[standard] brings it; it makes the generator cheaper still
    except ImportError:
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
