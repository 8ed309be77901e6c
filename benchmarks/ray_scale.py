"""`omni serve --replicas 2` against the single-process server, side by side in one run, on the
embedded demo model with one torch thread per model process:

- throughput at a fixed concurrency (images/s over the same requests, after warm-up), and the
  same for two single-process servers side by side with the client alternating between them:
  what this machine's cores give two model processes without Ray, the replicas' ceiling here;
  with where the cores went during each burst;
- the Ray hop: the median latency of one request at a time, both servers, for a generation and
  for GET /v1/models (the ingress -> replica call with almost no work behind it);
- time to start (launch to /health 200, fresh local Ray cluster included);
- the kill test: SIGKILL one replica's process during a burst, then count what each request got.

    .venv/bin/python benchmarks/ray_scale.py --out benchmarks/results/ray-scale-cpu.json
    .venv/bin/python benchmarks/ray_scale.py --max-batch-size 1 --out benchmarks/results/ray-scale-batch1-cpu.json

--lora: adapter switches per 100 requests with 8 adapters (PEFT on the tiny Z-Image, saved with
save_lora_weights) on 2 replicas, with and without routing by adapter set (Ray Serve's model
multiplexing; OMNI_RAY_ROUTE_BY_ADAPTERS=0 turns it off), from /metrics' omni_lora_switches_total:

    .venv/bin/python benchmarks/ray_scale.py --lora --out benchmarks/results/ray-lora-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]

from common import start_server, stop_server, write_result  # noqa: E402
from serving import ray_replica_pids  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def cpu_ticks(server_pids: list[int]) -> dict[str, int]:
    """CPU time so far (clock ticks) of this machine's processes, by what they are."""
    out: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        pid = int(proc.name)
        kind = ("client" if pid == os.getpid() else "server" if pid in server_pids
                else "model_replicas" if title.startswith("ray::ServeReplica:omni:ModelReplica")
                else "ingress" if title.startswith("ray::ServeReplica:omni:Ingress")
                else "ray_proxy" if title.startswith("ray::ProxyActor")
                else "ray_other" if title.startswith("ray::") or "/ray/" in title else "other")
        out[kind] = out.get(kind, 0) + int(fields[11]) + int(fields[12])
    return out


def batch_totals(urls: list[str]) -> tuple[float, float]:
    """(images, pipeline calls) so far over the servers (a Ray app's replica="all" sums)."""
    from prometheus_client.parser import text_string_to_metric_families

    images = calls = 0.0
    for url in urls:
        for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
            for s in fam.samples:
                if s.labels.get("replica", "all") == "all" and s.name in ("omni_batch_images_sum", "omni_batch_images_count"):
                    images, calls = (images + s.value, calls) if s.name.endswith("_sum") else (images, calls + s.value)
    return images, calls


def measure(urls: list[str], body: dict, concurrency: int, requests: int, repeats: int, server_pids: list[int]) -> dict:
    """One request at a time on the first server, then bursts spread over all of them in turn."""
    with httpx.Client(base_url=urls[0], timeout=600) as c:
        gen = lambda: c.post("/v1/images/generations", json=body).raise_for_status()  # noqa: E731
        for _ in range(2):
            gen()
        one = median_ms(gen, repeats)
        models = median_ms(lambda: c.get("/v1/models").raise_for_status(), 20)

    local = threading.local()

    def send(i: int) -> int:
        # One keep-alive client per thread: the client shares these cores with the servers.
        if not hasattr(local, "clients"):
            local.clients = [httpx.Client(base_url=url, timeout=600) for url in urls]
        return local.clients[i % len(urls)].post("/v1/images/generations", json={**body, "seed": i}).status_code

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, range(concurrency)))  # warm: every replica has served
        time.sleep(1.5)  # a Ray replica pushes its metrics once a second
        batched = batch_totals(urls)
        before = cpu_ticks(server_pids)
        t0 = time.perf_counter()
        statuses = list(pool.map(send, range(requests)))
        wall = time.perf_counter() - t0
        after = cpu_ticks(server_pids)
        time.sleep(1.5)
        images, calls = (a - b for a, b in zip(batch_totals(urls), batched))
    hz = os.sysconf("SC_CLK_TCK")
    # Where the machine's cores went during the burst (a process that started or ended in it is partly missed).
    cores = {k: round((after[k] - before.get(k, 0)) / hz / wall, 2) for k in sorted(after) if after[k] - before.get(k, 0) > 0}
    return {"one_request_ms": round(one, 1), "models_ms": round(models, 2), "burst_wall_s": round(wall, 2),
            "images_per_s": round(statuses.count(200) / wall, 3), "burst_statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "burst_cores_used": cores, "burst_images_per_pipeline_call": round(images / calls, 2) if calls else None}


def kill_test(url: str, body: dict, concurrency: int, requests: int) -> dict:
    pids = ray_replica_pids()
    results: list = [None] * requests

    def send(i: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=300) as c:
                results[i] = c.post("/v1/images/generations", json={**body, "seed": 1000 + i})
        except httpx.HTTPError as e:
            results[i] = e

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(send, i) for i in range(requests)]
        while sum(r is not None for r in results) < concurrency:
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        for f in futures:
            f.result(timeout=600)
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
    replaced_s = None
    while time.monotonic() - t0 < 300:
        now = ray_replica_pids()
        if len(now) == len(pids) and pids[0] not in now:
            replaced_s = round(time.monotonic() - t0, 1)
            break
        time.sleep(0.5)
    return {"requests": requests, "concurrency": concurrency, "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "answered": sum(isinstance(r, httpx.Response) for r in results), "replaced_after_s": replaced_s,
            "served_by": sorted({r.headers.get("x-omni-replica", "") for r in results if isinstance(r, httpx.Response) and r.status_code == 200})}


def switches(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("omni_lora_switches_total") and 'replica="all"' in line), 0.0)


def lora_switches(replicas: int, adapters: int, requests: int, concurrency: int) -> dict:
    """Each request names one of `adapters` adapters at random (seeded): the switches the replicas
    made per 100 requests, routed by adapter set and not."""
    import random

    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.demo import builders
    from omni_trt.demo.lora import make_adapter

    root = Path(tempfile.mkdtemp(prefix="omni-ray-lora-"))
    builders("z-image")[0](root / "model")
    pipe = DiffusionPipeline.from_pretrained(root / "model", dtype=torch.float32)
    modules = [f"l{i}={make_adapter(pipe, root / f'l{i}', seed=i + 1)}" for i in range(adapters)]
    rng = random.Random(0)
    names = [rng.randrange(adapters) for _ in range(requests)]
    body = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 1}
    out: dict = {"setup": {"model": "tiny z-image", "replicas": replicas, "adapters": adapters, "requests": requests,
                           "concurrency": concurrency, **{k: v for k, v in body.items() if k != "prompt"}}}
    for label, env in (("routed", "1"), ("not_routed", "0")):
        s = start_server([str(root / "model"), "--replicas", str(replicas), "--threads", "1", "--lora-modules", *modules],
                         root, env={"RAY_DEDUP_LOGS": "0", "OMNI_RAY_ROUTE_BY_ADAPTERS": env})
        try:
            before = switches(s.url)
            with httpx.Client(base_url=s.url, timeout=300) as c, ThreadPoolExecutor(concurrency) as pool:
                codes = list(pool.map(lambda i: c.post("/v1/images/generations", json={**body, "lora": f"l{i}"}).status_code, names))
            time.sleep(2.5)  # replicas push their metrics about once a second
            n = switches(s.url) - before
            out[label] = {"ok": codes.count(200), "switches": n, "switches_per_100": round(100 * n / requests, 1)}
        finally:
            stop_server(s)
        print(label, json.dumps(out[label]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="one-at-a-time requests per median")
    ap.add_argument("--max-batch-size", type=int, default=None, help="the servers' batch cap (default: omni serve's); 1 "
                    "takes batching out of the comparison, since a process with more requests waiting batches more of them")
    ap.add_argument("--lora", action="store_true", help="adapter switches per 100 requests, routed by adapter set or not")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.lora:
        write_result(lora_switches(args.replicas, 8, 100, args.concurrency), args.out)
        return 0
    body = {"prompt": "a lighthouse on a cliff", "size": args.size, "num_inference_steps": args.steps, "seed": 1}
    cache = tempfile.mkdtemp(prefix="omni-ray-bench-")
    out: dict = {"host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
                 "setup": {"model": "embedded demo", "threads_per_process": 1, **{k: v for k, v in vars(args).items() if k != "out"}}}
    # single: one process; two_processes: two of them, the client alternating (what two cores give
    # here without Ray: the ceiling for the replicas); ray_N: --replicas N.
    common = ["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []
    for name, runs in (("single", [[]]), ("two_processes", [[], []]), (f"ray_{args.replicas}", [["--replicas", str(args.replicas)]])):
        servers = [start_server(["--threads", "1", *common, *extra], cache, env={"RAY_DEDUP_LOGS": "0"}) for extra in runs]
        try:
            out[name] = {"start_s": round(max(s.started_s for s in servers), 1),
                         **measure([s.url for s in servers], body, args.concurrency, args.requests, args.repeats, [s.proc.pid for s in servers])}
            if name.startswith("ray_"):
                out["kill_test"] = kill_test(servers[0].url, body, args.concurrency, 40)
        finally:
            for s in servers:
                stop_server(s)
        print(name, json.dumps(out[name]), flush=True)
    ray, single = out[f"ray_{args.replicas}"], out["single"]
    out["throughput_ratio"] = round(ray["images_per_s"] / single["images_per_s"], 2)
    out["two_processes_ratio"] = round(out["two_processes"]["images_per_s"] / single["images_per_s"], 2)
    out["ray_hop_ms"] = {"generation": round(ray["one_request_ms"] - single["one_request_ms"], 1),
                         "models": round(ray["models_ms"] - single["models_ms"], 2)}
    print(json.dumps({k: out[k] for k in ("throughput_ratio", "two_processes_ratio", "ray_hop_ms", "kill_test")}, indent=1))
    write_result(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
