"""Load test: N requests at concurrency C against a real `omni serve` process (the demo model),
with a few bad requests mixed in; every request must get an answer (nothing lost, nothing hung).
Records statuses, latency percentiles per status, throughput and the server's exit.

    .venv/bin/python benchmarks/load_test.py --out benchmarks/results/load-cpu.json

Defaults: 200 requests at concurrency 32, 64x64 at 2 steps, one request in ten malformed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import start_server, stop_server, write_result

BAD = [  # what careless clients send; each must be a 4xx without disturbing the rest
    b'{"prompt": "a \\ud800 fox", "size": "64x64"}',
    b'{"prompt": "x", "guidance_scale": NaN}',
    b'{"prompt": "x", "size": "\\u00b2x\\u00b2"}',
    b'{"prompt": "x", "n": "2"}',
    b"{not json",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bad-every", type=int, default=10, help="every Nth request is malformed (0: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    server = start_server(["--max-queue", str(args.requests)])
    url = server.url
    try:
        good = {"prompt": "a fox in the snow", "size": args.size, "num_inference_steps": args.steps}

        def send(i: int) -> tuple[str, int | str, float]:
            bad = args.bad_every and i % args.bad_every == args.bad_every - 1
            t0 = time.perf_counter()
            try:
                with httpx.Client(timeout=600) as c:
                    if bad:
                        r = c.post(f"{url}/v1/images/generations", content=BAD[(i // args.bad_every) % len(BAD)], headers={"content-type": "application/json"})
                    else:
                        r = c.post(f"{url}/v1/images/generations", json={**good, "seed": i})
                status: int | str = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            return ("bad" if bad else "good"), status, time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(send, range(args.requests)))
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        code = stop_server(server, 60)
    server_log = server.log.read_text()
    by_kind: dict[str, dict] = {}
    for kind in ("good", "bad"):
        rows = [r for r in results if r[0] == kind]
        if not rows:
            continue
        lat = [r[2] * 1000 for r in rows]
        by_kind[kind] = {
            "requests": len(rows),
            "statuses": dict(Counter(str(r[1]) for r in rows)),
            "p50_ms": round(percentile(lat, 50), 1),
            "p99_ms": round(percentile(lat, 99), 1),
            "max_ms": round(max(lat), 1),
            "mean_ms": round(statistics.mean(lat), 1),
        }
    answered = sum(isinstance(r[1], int) for r in results)
    out = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "requests": args.requests,
        "concurrency": args.concurrency,
        "size": args.size,
        "steps": args.steps,
        "wall_s": round(wall, 2),
        "throughput_rps": round(args.requests / wall, 2),
        "answered": answered,
        "lost": args.requests - answered,
        "server_5xx": sum(isinstance(r[1], int) and r[1] >= 500 for r in results),
        "by_kind": by_kind,
        "batched_calls": next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("omni_batch_images_count")), None),
        "server_exit": code,
        "server_log_tracebacks": server_log.count("Traceback"),
    }
    write_result(out, args.out)
    return 0 if out["lost"] == 0 and out["server_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
