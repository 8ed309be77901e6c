"""LoRA adapters on the demo model, per runtime, side by side in one run (CPU):

- base (no adapter), one adapter (torch: PEFT's unmerged LoRA branch; onnxruntime: a session whose
  initializers hold the merged weights) and two adapters at once, interleaved round by round so a
  shared machine's load falls on all alike; ratios are medians of per-round ratios to base;
- the switch between batches (set_adapters, a session swap), a set's first use (torch loads the
  file, onnxruntime builds its session), and requests alternating between two adapters;
- torch-compile: the merged weights copied into the compiled modules in place, and dynamo's count
  of graphs compiled while adapters switch (0: no recompile);
- torch fused: diffusers' fuse_lora of one adapter against the plain pipeline, round by round (the
  steady state of "merge when a set stays active"), to set beside the unmerged ratio;
- the process's resident memory with 1, 4 and 16 adapters registered.

    .venv/bin/python benchmarks/lora.py --out benchmarks/results/lora-cpu.json

On a GPU host the GPU suite's opt-in `--lora` step runs it on a refittable TensorRT engine dir:
    python3 benchmarks/lora.py --model DIR --engine-dir ENGINES --runtimes tensorrt --device cuda --size 1024x1024 --steps 9
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result

sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


SETS = {"base": (), "steady": (("a", 1.0),), "two_adapters": (("a", 1.0), ("b", 0.5))}


def measure(rt, req, repeats: int) -> dict:
    """Base, one adapter and two adapters interleaved round by round (the order rotating), so a
    shared machine's load falls on all three alike; each ratio is the median of its per-round
    ratios to base. A generation's time is the pipeline call's (stages["total"]), the switch before
    it counted apart. Then a set's first use (torch loads the file, onnxruntime builds a session),
    and requests alternating between two adapters, each switching first."""
    first = {name: rt.generate([dataclasses.replace(req, lora=s)]).lora_switch for name, s in SETS.items()}
    gen: dict[str, list[float]] = {name: [] for name in SETS}
    switch: list[float] = []
    names = list(SETS)
    for i in range(repeats):
        for name in names[i % 3:] + names[:i % 3]:
            out = rt.generate([dataclasses.replace(req, lora=SETS[name])])
            gen[name].append(out.stages["total"])
            switch.append(out.lora_switch or 0.0)
    out = {name: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4)} for name, v in gen.items()}
    out["ratios"] = {name: round(statistics.median(g / b for g, b in zip(gen[name], gen["base"])), 3) for name in ("steady", "two_adapters")}
    out["first_use_switch_s"] = {name: round(s, 4) for name, s in first.items() if s}
    out["switch_between_batches_median_s"] = round(statistics.median(switch), 4)
    alternating = [rt.generate([dataclasses.replace(req, lora=(((("a", 1.0),), (("b", 1.0),))[i % 2]))]) for i in range(2 * repeats)]
    out["alternating_two_adapters"] = {"median_s": round(statistics.median(r.stages["total"] for r in alternating), 4),
                                       "switch_median_s": round(statistics.median(r.lora_switch or 0.0 for r in alternating), 4)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="a diffusers folder (default: the demo model)")
    ap.add_argument("--engine-dir", default=None, help="engines already built for --model (default: an ONNX export made here)")
    ap.add_argument("--runtimes", default="torch,torch-compile,onnxruntime", help="comma-separated: torch, torch-compile, onnxruntime, tensorrt")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="RSS with 1, 4, 16 adapters registered")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runtimes = args.runtimes.split(",")

    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.compiler.execute import build_engines
    from omni_trt.demo import ensure_demo_model
    from omni_trt.demo.lora import make_adapter
    from omni_trt.models import detect_family
    from omni_trt.runtime.loader import load_runtime
    from omni_trt.runtime.pipeline import LoadOptions, LoraOptions, load_pipeline
    from omni_trt.runtime.request import ImageAsk, resolve

    model = args.model or str(ensure_demo_model())
    work = Path(tempfile.mkdtemp(prefix="omni-lora-bench-"))
    maker = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    for seed in range(16 if args.memory else 2):
        make_adapter(maker, work / f"l{seed}", seed=seed, rank=args.rank, strength=0.05)
    lora = LoraOptions((("a", str(work / "l0")), ("b", str(work / "l1"))), str(work))
    load = LoadOptions(device=args.device, dtype=args.dtype, lora=lora)
    result = {"benchmark": "lora", "model": args.model or "demo (trained tiny Z-Image)", "size": args.size, "steps": args.steps, "rank": args.rank,
              "repeats": args.repeats, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch_version": torch.__version__, "cores": os.cpu_count(), "load_avg_1m_start": round(os.getloadavg()[0], 2)}

    req = resolve(detect_family(model), ImageAsk("a red circle on a blue background", size=args.size, steps=args.steps, seed=1))
    if "torch" in runtimes:
        t_rt = load_pipeline(model, load)
        result["torch"] = measure(t_rt, req, args.repeats)
        result["torch"]["adapter_targets"] = len(t_rt.adapters.registry.get("a").layers)
        result["torch_fused"] = fused_steady(model, work, req, args.repeats, args.device, args.dtype)
        del t_rt
        gc.collect()
    engine_dir = args.engine_dir
    for kind in (r for r in runtimes if r != "torch"):
        if kind == "torch-compile":
            result[kind] = compiled_measure(model, dataclasses.replace(load, warmup_size=args.size), req, args.repeats)
            continue
        if engine_dir is None:
            engine_dir = work / "engines"
            t0 = time.perf_counter()
            build_engines(model, engine_dir, onnx_only=True, min_size=args.size, max_size=args.size, max_batch=1,
                          components="transformer,vae_decoder")
            result["onnx_export_s"] = round(time.perf_counter() - t0, 1)
        rt = load_runtime(model, engine_dir, kind, load)
        result[kind] = {**measure(rt, req, args.repeats), **rt.adapters.memory()}
        del rt
        gc.collect()
    if args.memory:
        result["registered_adapters_memory"] = registered_memory(maker, work)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    result["peak_rss_mb"] = round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024, 1)
    return write_result(result, args.out)


def compiled_measure(model: str, load, req, repeats: int) -> dict:
    """--runtime torch-compile: merged weights copied in place; dynamo's graph count before and after."""
    from torch._dynamo.utils import counters

    from omni_trt.runtime.loader import load_runtime

    t0 = time.perf_counter()
    rt = load_runtime(model, None, "torch-compile", load)
    load_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    out = measure(rt, req, repeats)
    out["compile_load_s"] = round(load_s, 1)
    out["graphs_compiled_during_measure"] = counters["stats"]["unique_graphs"] - graphs
    return out


def fused_steady(model: str, work: Path, req, repeats: int, device: str | None, dtype: str | None) -> dict:
    """diffusers' fuse_lora of adapter a into the weights (then unload_lora_weights: plain layers
    again), against the plain pipeline round by round: the steady state of "merge when a set stays
    active", to set beside the unmerged steady ratio."""
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline

    plain = load_pipeline(model, LoadOptions(device=device, dtype=dtype))
    fused = load_pipeline(model, LoadOptions(device=device, dtype=dtype))
    fused.pipe.load_lora_weights(str(work / "l0"), adapter_name="a")
    t0 = time.perf_counter()
    fused.pipe.fuse_lora(adapter_names=["a"])
    fused.pipe.unload_lora_weights()
    fuse_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"base": [], "fused": []}
    for i in range(repeats + 1):
        for name, rt in (("base", plain), ("fused", fused))[:: 1 if i % 2 else -1]:
            times[name].append(rt.generate([req]).stages["total"])
    times = {k: v[1:] for k, v in times.items()}  # the first round warms both up
    return {"median_s": round(statistics.median(times["fused"]), 4), "base_median_s": round(statistics.median(times["base"]), 4),
            "ratio": round(statistics.median(f / b for f, b in zip(times["fused"], times["base"])), 3), "fuse_and_unload_s": round(fuse_s, 4)}


def registered_memory(maker, work: Path) -> dict:
    """Resident memory as 1, 4 and 16 adapters are registered (their factors held by the registry)."""
    from omni_trt.lora import Registry

    rss = {}
    reg = Registry(type(maker), {n: tuple(p.shape) for n, p in maker.transformer.named_parameters()}, work)
    before = rss_mb()
    for n in range(16):
        reg.load(f"r{n}", f"l{n}")
        if n + 1 in (1, 4, 16):
            rss[str(n + 1)] = {"rss_mb": round(rss_mb(), 1), "over_none_mb": round(rss_mb() - before, 1),
                               "factors_mb": round(sum(a.nbytes for a in reg.adapters()) / 2**20, 2)}
    return rss


if __name__ == "__main__":
    raise SystemExit(main())
