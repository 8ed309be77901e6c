"""Edits against generations on a real `omni serve` (the demo model): latency side by side at the
same size and steps, and the server's resident memory before and after it serves edits (the edit
pipelines are built with from_pipe over the loaded modules, so it should barely move).

    .venv/bin/python benchmarks/edits.py --out benchmarks/results/edits-cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from common import start_server, stop_server, write_result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    server = start_server([])
    url = server.url
    try:
        w, h = (int(v) for v in args.size.split("x"))
        gen = {"prompt": "a lighthouse on a cliff", "size": args.size, "num_inference_steps": args.steps, "seed": 1}
        with httpx.Client(base_url=url, timeout=600) as c:
            source = base64.b64decode(c.post("/v1/images/generations", json=gen).json()["data"][0]["b64_json"])
            mask = Image.new("RGBA", (w, h), (0, 0, 0, 255))
            mask.paste((0, 0, 0, 0), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
            buf = io.BytesIO()
            mask.save(buf, format="PNG")
            for _ in range(2):
                c.post("/v1/images/generations", json=gen).raise_for_status()
            rss_t2i = rss_mb(server.proc.pid)
            form = {"prompt": "a lighthouse at night", "size": args.size, "num_inference_steps": str(args.steps), "seed": "2"}

            def edit(with_mask: bool, strength: float) -> None:
                files = [("image", ("s.png", source))] + ([("mask", ("m.png", buf.getvalue()))] if with_mask else [])
                c.post("/v1/images/edits", data={**form, "strength": str(strength)}, files=files).raise_for_status()

            edit(False, 0.6), edit(True, 0.6), edit(False, 1.0)  # builds both edit pipelines
            times: dict[str, list[float]] = {"generation": [], "img2img_strength_0.6": [], "img2img_strength_1.0": [], "inpaint_strength_0.6": []}
            for _ in range(args.repeats):  # interleaved
                for name, call in (("generation", lambda: c.post("/v1/images/generations", json=gen).raise_for_status()),
                                   ("img2img_strength_0.6", lambda: edit(False, 0.6)),
                                   ("img2img_strength_1.0", lambda: edit(False, 1.0)),
                                   ("inpaint_strength_0.6", lambda: edit(True, 0.6))):
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
            rss_edits = rss_mb(server.proc.pid)
    finally:
        stop_server(server, 60)
    out = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "size": args.size,
        "steps": args.steps,
        "median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()},
        "rss_mb_text_to_image_only": round(rss_t2i, 1),
        "rss_mb_after_edits": round(rss_edits, 1),
        "rss_growth_pct": round(100 * (rss_edits / rss_t2i - 1), 2),
    }
    return write_result(out, args.out)


if __name__ == "__main__":
    sys.exit(main())
