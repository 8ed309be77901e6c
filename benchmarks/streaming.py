"""What streaming costs, and how long an abandoned request holds the worker, against real
`omni serve` processes (side by side in one run) on MODEL: by default the tiny random-weight
Z-Image pipeline (the demo model issue 19 measured), built into this run's cache.

    .venv/bin/python benchmarks/streaming.py --out benchmarks/results/streaming-cpu.json

1. Previews: one server per --preview-decoder (full: a VAE decode per preview, as before issue 19;
   linear: the fitted latent-to-RGB map; mlp: the fitted per-pixel network, serve's default), all
   up at once and their requests interleaved, so drift hits each alike. Per size (512x512 and 1024x1024, 8 steps): the same request unstreamed and
   streamed with 0 and 3 partial images, medians; the streamed/unstreamed ratios; when the first
   partial image arrives, also as a share of the unstreamed time. Then, in this process, the cost
   of one preview of each fitted map against one full decode at each size (map + upsample to
   <= 512 px + PNG, against VAE decode + postprocess + full-size PNG), and against one denoising
   step (the unstreamed time less one full decode, over the steps: a step's share, text encoding
   included).
2. Abandonment: a long request (512x512, 100 steps) whose client leaves after 0.3 s, then a small
   one: how long the small one waited behind the abandoned work. `--abandon-only` runs just this
   part (it needs nothing but HTTP, so it measures older servers too: copy this file and
   common.py into an older checkout's benchmarks/).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import ROOT, start_server, stop_server, write_result

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


def med_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 1)


def bench_previews(urls: dict[str, str], sizes: list[str], steps: int, partials: list[int], repeats: int) -> dict:
    """Per size, per preview decoder: unstreamed and streamed times, first-partial times, ratios."""
    out: dict = {"steps": steps, "repeats": repeats, "sizes": {}}
    clients = {d: httpx.Client(base_url=u, timeout=600) for d, u in urls.items()}
    try:
        for size in sizes:
            body = {"prompt": "a lighthouse on a cliff at dusk", "size": size, "num_inference_steps": steps, "seed": 1}
            for c in clients.values():  # warm-up
                c.post(GEN, json=body).raise_for_status()
                stream_once(c, {**body, "stream": True, "partial_images": max(partials)})
            plain = {d: [] for d in clients}
            total = {d: {p: [] for p in partials} for d in clients}
            first = {d: {p: [] for p in partials} for d in clients}
            for _ in range(repeats):  # interleaved: drift hits every variant and decoder alike
                for d, c in clients.items():
                    t0 = time.perf_counter()
                    c.post(GEN, json=body).raise_for_status()
                    plain[d].append(time.perf_counter() - t0)
                    for p in partials:
                        f, t, events = stream_once(c, {**body, "stream": True, "partial_images": p})
                        assert events == p + 1, (p, events)
                        total[d][p].append(t)
                        first[d][p].append(f)
            row = {}
            for d in clients:
                base = med_ms(plain[d])
                row[d] = {
                    "unstreamed_ms": base,
                    "streamed_ms": {p: med_ms(total[d][p]) for p in partials},
                    "streamed_ratio": {p: round(med_ms(total[d][p]) / base, 2) for p in partials},
                    "first_event_ms": {p: med_ms(first[d][p]) for p in partials},
                    "first_partial_share": {p: round(med_ms(first[d][p]) / base, 2) for p in partials if p},
                }
            out["sizes"][size] = row
    finally:
        for c in clients.values():
            c.close()
    return out


def preview_cost(model: str, sizes: list[str], kinds: list[str], repeats: int = 5) -> dict:
    """One preview's own cost against one full decode, in this process: each fitted map (`kinds`)
    + upsample + PNG, against VAE decode + postprocess + PNG of the full image. Medians of `repeats`."""
    import torch

    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
    from omni_trt.server.encoding import encode_image

    rts = {k: load_pipeline(model, LoadOptions(preview_decoder=k)) for k in kinds}
    rt = rts[kinds[0]]
    layout, factor = rt.family.latent_layout, rt.pipe.vae_scale_factor
    out: dict = {"fit": {k: r.preview.fit for k, r in rts.items()}}
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        grid = torch.randn(1, layout.channels(rt.pipe), h // factor, w // factor, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {k: [] for k in ("full_decode", "full_png", *(f"{m}_{p}" for m in kinds for p in ("decode", "png")))}
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                full = rt.pipe.image_processor.postprocess(layout.decode(rt.pipe, grid), output_type="pil")[0]
            t1 = time.perf_counter()
            encode_image(full, "png")
            times["full_decode"].append(t1 - t0)
            times["full_png"].append(time.perf_counter() - t1)
            for k, r in rts.items():
                t0 = time.perf_counter()
                small = r.preview.images(grid, w, h)[0]
                t1 = time.perf_counter()
                encode_image(small, "png")
                times[f"{k}_decode"].append(t1 - t0)
                times[f"{k}_png"].append(time.perf_counter() - t1)
        row: dict = {k: med_ms(v) for k, v in times.items()}
        row["preview_size"] = f"{small.size[0]}x{small.size[1]}"
        for k in kinds:
            row[f"{k}_share_of_full"] = round((row[f"{k}_decode"] + row[f"{k}_png"]) / (row["full_decode"] + row["full_png"]), 4)
        out[size] = row
    return out


def step_shares(result: dict, steps: int) -> None:
    """Each fitted preview's cost against one step: (unstreamed - one full decode) / steps, from the
    run's own numbers (the servers' unstreamed medians, this process's decode)."""
    cost = result["preview_cost"]
    for size, decoders in result["previews"]["sizes"].items():
        row = cost[size]
        base = next(iter(decoders.values()))["unstreamed_ms"]
        step = (base - row["full_decode"] - row["full_png"]) / steps
        row["step_ms_estimate"] = round(step, 1)
        for k in cost["fit"]:
            row[f"{k}_share_of_step"] = round((row[f"{k}_decode"] + row[f"{k}_png"]) / step, 3) if step > 0 else None


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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="512x512,1024x1024")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--partials", default="0,3", help="partial_images values streamed (default: 0,3)")
    ap.add_argument("--decoders", default="full,linear,mlp", help="--preview-decoder of each server (default: full,linear,mlp)")
    ap.add_argument("--model", default=None, help="MODEL for omni serve (default: the tiny random-weight Z-Image pipeline)")
    ap.add_argument("--abandon-only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    cache = tempfile.mkdtemp(prefix="omni-bench-")  # one demo model for every server
    os.environ["OMNI_TRT_CACHE"] = cache
    sys.path.insert(0, str(ROOT))
    from omni_trt.demo import build_demo_model

    model = args.model or str(build_demo_model(Path(cache) / "tiny-z-image", "z-image"))
    result: dict = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "model": args.model or "tiny random-weight z-image"}
    if not args.abandon_only:
        servers = {}
        try:
            for d in args.decoders.split(","):
                servers[d] = start_server([model, "--max-batch-size", "1", "--preview-decoder", d], cache=cache)
            result["servers_ready_s"] = {d: round(s.started_s, 1) for d, s in servers.items()}
            result["previews"] = bench_previews({d: s.url for d, s in servers.items()}, sizes, args.steps,
                                                [int(p) for p in args.partials.split(",")], args.repeats)
        finally:
            for s in servers.values():
                stop_server(s, 60)
        kinds = [d for d in args.decoders.split(",") if d != "full"]
        if kinds:
            result["preview_cost"] = preview_cost(model, sizes, kinds)
            step_shares(result, args.steps)
    server = start_server([model, "--max-batch-size", "1"], cache=cache)
    try:
        result["abandon"] = bench_abandon(server.url)
    finally:
        stop_server(server, 60)
    return write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
