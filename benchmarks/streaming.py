"""What streaming costs, and how long an abandoned request holds the worker, against a real
`omni serve` process on the demo model (side by side in one run).

    .venv/bin/python benchmarks/streaming.py --out benchmarks/results/streaming-cpu.json

1. Time to first event, and the added latency per partial image: the same request (256x256,
   8 steps) unstreamed and streamed with partial_images 0..3, interleaved, medians; next to the
   server's own VAE-decode time for one image (its /metrics), which is what a partial should cost.
2. Abandonment: a long request (512x512, 100 steps) whose client leaves after 0.3 s, then a small
   one: how long the small one waited behind the abandoned work. `--abandon-only` runs just this
   part (it needs nothing but HTTP, so it measures older servers too: copy this file and
   common.py into an older checkout's benchmarks/).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

import httpx

from common import start_server, stop_server, write_result

GEN = "/v1/images/generations"


def stream_once(c: httpx.Client, body: dict) -> tuple[float, float, int]:
    """(seconds to the first event, seconds to the end, events)."""
    t0 = time.perf_counter()
    first, events = None, 0
    with c.stream("POST", GEN, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                events += 1
                first = first or time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, events


def vae_decode_mean_ms(c: httpx.Client) -> float | None:
    """Mean VAE-decode seconds per observation from the server's histogram (sum / count)."""
    text = c.get("/metrics").text
    s = re.search(r'omni_stage_seconds_sum\{stage="vae_decode"\} (\S+)', text)
    n = re.search(r'omni_stage_seconds_count\{stage="vae_decode"\} (\S+)', text)
    return float(s.group(1)) / float(n.group(1)) * 1000 if s and n and float(n.group(1)) else None


def bench_streaming(url: str, repeats: int) -> dict:
    body = {"prompt": "a lighthouse on a cliff at dusk", "size": "256x256", "num_inference_steps": 8, "seed": 1}
    out: dict = {"size": body["size"], "steps": body["num_inference_steps"], "repeats": repeats}
    with httpx.Client(base_url=url, timeout=600) as c:
        for _ in range(3):  # warm-up; then the server's own VAE-decode time, before any preview adds to it
            c.post(GEN, json=body).raise_for_status()
        out["server_vae_decode_ms"] = vae_decode_mean_ms(c)
        plain, streamed = [], {p: [] for p in range(4)}
        first = {p: [] for p in range(4)}
        for _ in range(repeats):  # interleaved: drift hits every variant alike
            t0 = time.perf_counter()
            c.post(GEN, json=body).raise_for_status()
            plain.append(time.perf_counter() - t0)
            for p in range(4):
                f, total, events = stream_once(c, {**body, "stream": True, "partial_images": p})
                assert events == p + 1, (p, events)
                streamed[p].append(total)
                first[p].append(f)
        med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
        out["unstreamed_ms"] = round(med(plain), 1)
        out["streamed_ms"] = {p: round(med(v), 1) for p, v in streamed.items()}
        out["first_event_ms"] = {p: round(med(v), 1) for p, v in first.items()}
        base = med(streamed[0])
        out["added_ms_per_partial"] = {p: round((med(streamed[p]) - base) / p, 1) for p in (1, 2, 3)}
        out["stream_overhead_ms"] = round(base - med(plain), 1)
    return out


def bench_abandon(url: str) -> dict:
    # Long enough that running it out (what an older server did) is plain next to a step.
    long = {"prompt": "an abandoned request", "size": "512x512", "num_inference_steps": 100, "seed": 2}
    small = {"prompt": "the next request", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    with httpx.Client(base_url=url, timeout=600) as c:
        c.post(GEN, json=small).raise_for_status()
        t0 = time.perf_counter()
        c.post(GEN, json=small).raise_for_status()
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        c.post(GEN, json=long).raise_for_status()
        full = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=url, timeout=0.3) as c:
            c.post(GEN, json=long)
    except httpx.TimeoutException:
        pass
    left = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as c:
        c.post(GEN, json=small).raise_for_status()
    waited = time.perf_counter() - left
    return {"long_request_ms": round(full * 1000, 1), "next_request_alone_ms": round(alone * 1000, 1),
            "next_request_after_abandon_ms": round(waited * 1000, 1),
            "abandoned_work_held_worker_ms": round(max(0.0, waited - alone) * 1000, 1),
            "long_request_step_ms": round(full * 1000 / long["num_inference_steps"], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--abandon-only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    server = start_server(["--max-batch-size", "1"])
    url = server.url
    try:
        result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
        if not args.abandon_only:
            result["streaming"] = bench_streaming(url, args.repeats)
        result["abandon"] = bench_abandon(url)
    finally:
        stop_server(server, 60)
    return write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
