"""The GPU suite: every speed figure omni-trt claims, measured in one command and one JSON.

On a GPU host with the wheelhouse installed (DEVELOPERS.md, "The GPU suite"), from the repo root:

    python3 benchmarks/gpu_suite.py --out $OUT/gpu-suite.json          # at most --budget 480 s

Steps, in order, each time-bound (a step that fails or runs out of time records its error and the
suite goes on):
  1. probe: TensorRT-RTX (and datacenter TensorRT, if installed) builds, deserializes and runs a DiT
     block on this GPU through omni-trt's own build and runtime code (benchmarks/trt_probe.py);
  2. model: the Z-Image real-shape pipeline (`omni demo-model --real-shapes`, random weights);
  3. engines: its ONNX export and, where a TensorRT runs here, its engines (fp16: one export that
     both ONNX Runtime and TensorRT run), only if one of them can run;
  4. bench: 1024x1024, 9 steps, batch 1 through `omni bench`: torch eager, torch.compile, ONNX
     Runtime CUDA, TensorRT; each that runs, the others skipped with the reason;
  5. concurrency: 8 requests of 512x512 sent at once against the same 8 one after another, to a
     real `omni serve` subprocess (its scheduler batches compatible requests).

  6. --family NAME (opt-in, repeatable; e.g. flux2-klein): that family's real-shape pipeline built,
     then `omni bench` on torch at the bench size and its own default steps (klein 4B: a 1024x1024
     generation in 4 steps; qwen-image-edit, edit-only: a 1024x1024 edit of one plain input image
     in 40 steps), the model removed after (disk). Give the suite more --budget for it.
  7. --lora (opt-in): LoRA adapters on TensorRT: a one-layer real-shape Z-Image (full width) built
     with --refittable, then benchmarks/lora.py on it: base generation, one adapter steady, the
     first request after a switch (its refit seconds), two adapters. Skipped where no TensorRT runs.
  8. --cache (opt-in): the step cache: `omni calibrate-cache` on the Z-Image real-shape model (its
     engines where step 3 built them, else torch) at the bench size, 20 and 50 steps: calibration
     seconds, then per threshold transformer calls, seconds, speed-up and PSNR/SSIM against
     uncached. With --family NAME it runs on that family's model too (e.g. qwen-image), before the
     model is removed.

--tiny runs the same steps on the tiny demo model on CPU (64x64, 2 steps, 4 requests, the VAE decoder
alone exported; ONNX Runtime on CPU stands in for CUDA), so `make test` keeps the suite from rotting.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_trt.bench import compare  # noqa: E402  (light: no torch at import)

BENCH_RUNTIMES = ("torch", "torch-compile", "onnxruntime", "tensorrt")
DISTRIBUTIONS = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "tensorrt-rtx", "tensorrt-rtx-cu13", "tensorrt_rtx", "polygraphy", "fastapi", "uvicorn", "omni-trt")
MIN_STEP_S = 10.0  # a step with less time than this left is skipped rather than started


@dataclass(frozen=True)
class Plan:
    """What each mode runs: sizes, steps, repeats, and each step's time cap in seconds."""

    bench_size: str
    bench_steps: int
    repeats: int
    serve_size: str
    serve_steps: int
    requests: int
    real_shapes: bool
    caps: dict[str, float]


GPU = Plan("1024x1024", 9, 3, "512x512", 9, 8, True,
           caps={"probe": 120, "model": 180, "engines": 300, "bench": 330, "concurrency": 120, "family": 420, "lora": 420, "cache": 420})
TINY = Plan("64x64", 2, 2, "64x64", 2, 4, False,
            caps={"probe": 90, "model": 60, "engines": 120, "bench": 180, "concurrency": 90, "family": 120, "lora": 60, "cache": 90})
# Time kept back for the later steps while an earlier one runs: the comparison (bench) and the
# concurrency figure are what the suite is for, so model or engine builds cannot eat them.
RESERVE = {"probe": 300, "model": 240, "engines": 200, "bench": 60, "concurrency": 0, "family": 0, "lora": 0, "cache": 0}


class StepError(Exception):
    """A step that failed; the message says why (and ends with its output's tail)."""


class Suite:
    def __init__(self, plan: Plan, tiny: bool, budget_s: float, out: Path, work: Path, families: tuple[str, ...] = (),
                 lora: bool = False, cache: bool = False) -> None:
        self.plan, self.tiny, self.out, self.work, self.families, self.with_lora = plan, tiny, out, work, families, lora
        self.with_cache = cache
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.report: dict[str, Any] = {"suite": "omni-trt gpu suite", "tiny": tiny, "budget_s": budget_s,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "machine": machine(), "plan": {k: v for k, v in vars(plan).items() if k != "caps"},
                                       "steps": {}, "figures": {}, "skipped": {}}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        if tiny:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny run is the CPU rehearsal, also on a GPU host
        self.env.setdefault("OMNI_TRT_CACHE", str(work / "cache"))

    # ---- bookkeeping ----

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn: Callable[[float], dict[str, Any]]) -> dict[str, Any] | None:
        """Run fn(timeout) within the step's cap and what the budget leaves after the later
        steps' reserve; record its result, or its error, and write the JSON."""
        kind = name.split(" ")[0]  # "family flux2-klein": the family steps share one cap
        timeout = min(self.plan.caps[kind], self.left() - (0 if self.tiny else RESERVE[kind]))
        timeout = max(timeout, min(MIN_STEP_S, self.left()))  # the reserve bends before a step is starved
        if timeout < MIN_STEP_S:
            self.report["steps"][name] = {"ok": False, "error": f"out of time: {self.left():.0f} s of the budget left"}
            self.write()
            return None
        t0 = time.monotonic()
        try:
            result = fn(timeout)
            self.report["steps"][name] = {"ok": True, "seconds": round(time.monotonic() - t0, 2), **result}
        except _Skip as e:  # nothing to do here: not a failure
            self.report["steps"][name] = {"ok": True, "skipped": str(e)}
            self.report["skipped"][name] = str(e)
            result = None
        except Exception as e:  # a failed step is recorded; the suite goes on
            self.report["steps"][name] = {"ok": False, "seconds": round(time.monotonic() - t0, 2), "error": f"{type(e).__name__}: {e}"[-3000:]}
            result = None
        print(f"gpu_suite: {name}: {'ok' if result is not None else 'FAILED'} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        self.write()
        return result

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(tmp, self.out)

    def run(self, args: list[str], timeout: float, log_name: str) -> subprocess.CompletedProcess:
        """A subprocess in its own process group (inductor's compile workers die with it), its
        output in work/<log_name>.log; StepError with the output's tail on failure or timeout."""
        log_path = self.work / f"{log_name}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise StepError(f"timed out after {timeout:.0f} s; output ends: {_tail(log_path)}") from None
        if rc != 0:
            raise StepError(f"exit status {rc}; output ends: {_tail(log_path)}")
        return subprocess.CompletedProcess(args, rc)

    # ---- the steps ----

    def probe(self, timeout: float) -> dict[str, Any]:
        flavors = {"tensorrt-rtx": None}
        if _installed("tensorrt"):
            flavors["tensorrt"] = None
        per = timeout / len(flavors)
        for flavor in flavors:
            out = self.work / f"probe-{flavor}.json"
            try:
                self.run(["benchmarks/trt_probe.py", "--flavor", flavor, "--out", str(out), *(["--tiny"] if self.tiny else [])], per, f"probe-{flavor}")
                flavors[flavor] = json.loads(out.read_text())
            except StepError as e:  # a crash in TensorRT is a finding too
                flavors[flavor] = {"flavor": flavor, "runs": False, "error": str(e)}
        if "tensorrt" not in flavors:
            self.report["skipped"]["probe tensorrt"] = "datacenter tensorrt is not installed"
        return {"flavors": flavors}

    def model(self, timeout: float) -> dict[str, Any]:
        model_dir = self.work / "z-image"
        self.run(["-m", "omni_trt", "demo-model", str(model_dir), "--family", "z-image", *(["--real-shapes"] if self.plan.real_shapes else [])],
                 timeout, "model")
        size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
        return {"dir": str(model_dir), "real_shapes": self.plan.real_shapes, "gb": round(size / 1e9, 3)}

    def engines(self, timeout: float, model_dir: str, probe: dict[str, Any] | None) -> dict[str, Any]:
        runs = [f for f, r in ((probe or {}).get("flavors") or {}).items() if r and r.get("runs")]
        ort_here = self.tiny or _ort_has_cuda()
        if not runs and not ort_here:
            raise _Skip("no TensorRT runs on this GPU (see probe) and ONNX Runtime has no CUDA provider "
                        "(pip uninstall -y onnxruntime && pip install 'omni-trt[ort-gpu]'): nothing would run the engines")
        engine_dir = self.work / "engines"
        size = self.plan.bench_size
        # fp16 on a GPU: ONNX Runtime cannot feed bf16, and one export then serves both engines.
        # Text-to-image needs no VAE encoder. The CPU rehearsal exports the VAE decoder alone: the
        # same commands and code paths, without the tiny transformer's export (most of its time).
        components = "vae_decoder" if self.tiny else "transformer,vae_decoder"
        args = ["-m", "omni_trt", "build-engine", model_dir, "--engine-dir", str(engine_dir), "--min-size", size, "--opt-size", size,
                "--max-size", size, "--dtype", "fp32" if self.tiny else "fp16", "--components", components]
        if runs:
            args += ["--target", "tensorrt" if "tensorrt" in runs else "tensorrt-rtx"]
        else:
            args += ["--onnx-only"]
            self.report["skipped"]["engines tensorrt"] = "no TensorRT runs here (see the probe): ONNX export only"
        self.run(args, timeout, "engines")
        return {"dir": str(engine_dir), "tensorrt": runs[0] if runs else None, "onnx_only": not runs}

    def bench(self, timeout: float, model_dir: str, engine_dir: str | None, engines_why: str | None) -> dict[str, Any]:
        """omni bench over the runtimes; a crash or timeout loses only the runtime it hit: the
        runtimes after it run in a new bench process."""
        names = list(BENCH_RUNTIMES)
        merged: dict[str, Any] = {}
        if engine_dir is None:
            for name in ("onnxruntime", "tensorrt"):
                merged[name] = {"skipped": f"no engines: {engines_why}"}
            names = [n for n in names if n not in merged]
        deadline = time.monotonic() + timeout
        part = 0
        report: dict[str, Any] = {}
        while names and deadline - time.monotonic() >= MIN_STEP_S:
            part += 1
            out = self.work / f"bench-{part}.json"
            args = ["-m", "omni_trt", "bench", model_dir, "--runtimes", ",".join(names), "--size", self.plan.bench_size,
                    "--steps", str(self.plan.bench_steps), "--batch", "1", "--warmup", "1", "--repeats", str(self.plan.repeats),
                    "--out", str(out), *(["--engine-dir", engine_dir] if engine_dir else [])]
            error = None
            try:
                self.run(args, deadline - time.monotonic(), f"bench-{part}")
            except StepError as e:
                error = str(e)
            report = json.loads(out.read_text()) if out.is_file() else {}
            merged.update({name: entry for name, entry in report.get("runtimes", {}).items() if name in names})
            rest = [n for n in names if n not in merged]
            if rest and error:  # the first runtime it did not finish is the one that crashed or ran out of time
                merged[rest[0]] = {"error": error}
                rest = rest[1:]
            if not error:
                break
            names = rest
        for name in BENCH_RUNTIMES:
            merged.setdefault(name, {"error": "out of time before it ran"})
        runtimes = {name: merged[name] for name in BENCH_RUNTIMES}
        baseline, ratios = compare(runtimes)
        for name, entry in runtimes.items():
            if "skipped" in entry:
                self.report["skipped"][f"bench {name}"] = entry["skipped"]
        return {"size": report.get("size", self.plan.bench_size), "steps": report.get("steps", self.plan.bench_steps), "batch": 1,
                "repeats": self.plan.repeats, "runtimes": runtimes, "baseline": baseline,
                **({f"speedup_vs_{baseline}": ratios} if baseline else {})}

    def concurrency(self, timeout: float, model_dir: str) -> dict[str, Any]:
        import httpx
        from common import free_port

        deadline = time.monotonic() + timeout
        port = free_port()
        n = self.plan.requests
        log_path = self.work / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "omni_trt", "serve", model_dir, "--port", str(port), "--runtime", "torch",
                                     "--max-batch-size", str(n), "--max-queue", str(4 * n)],
                                    cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                url = f"http://127.0.0.1:{port}"
                with httpx.Client(base_url=url, timeout=max(1.0, deadline - time.monotonic())) as client:
                    _wait_ready(client, proc, deadline, log_path)
                    body = {"prompt": "a dragon over green mountains", "size": self.plan.serve_size, "num_inference_steps": self.plan.serve_steps}

                    def post(seed: int, via: Any = client) -> float:
                        t0 = time.perf_counter()
                        r = via.post("/v1/images/generations", json={**body, "seed": seed}, timeout=max(1.0, deadline - time.monotonic()))
                        if r.status_code != 200:
                            raise StepError(f"request {seed}: HTTP {r.status_code} {r.text[:300]}")
                        return time.perf_counter() - t0

                    post(0)  # warm-up: the first call pays for allocations and kernel selection
                    t0 = time.perf_counter()
                    serial = [post(1 + i) for i in range(n)]
                    serial_s = time.perf_counter() - t0
                    calls_before = _pipeline_calls(client)
                    concurrent, errors = [0.0] * n, []

                    def one(i: int) -> None:
                        try:
                            with httpx.Client(base_url=url) as own:  # one client per thread
                                concurrent[i] = post(100 + i, own)
                        except Exception as e:  # collected: the measurement fails as a whole
                            errors.append(e)

                    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    concurrent_s = time.perf_counter() - t0
                    if errors:
                        raise StepError(f"{len(errors)} of {n} concurrent requests failed: {errors[0]}")
                    calls = _pipeline_calls(client) - calls_before
                    runtime = client.get("/health").json().get("runtime")
            finally:
                _kill(proc)
        return {"runtime": runtime, "size": self.plan.serve_size, "steps": self.plan.serve_steps, "requests": n, "max_batch_size": n,
                "serial_s": serial_s, "concurrent_s": concurrent_s, "speedup": serial_s / concurrent_s, "concurrent_pipeline_calls": calls,
                "serial_images_per_s": n / serial_s, "concurrent_images_per_s": n / concurrent_s,
                "serial_latency_median_ms": statistics.median(serial) * 1000,
                "concurrent_latency_median_ms": statistics.median(concurrent) * 1000, "concurrent_latency_max_ms": max(concurrent) * 1000}

    def family(self, timeout: float, name: str) -> dict[str, Any]:
        """Another family's real-shape pipeline (the tiny one with --tiny) through `omni bench` on
        torch, at the bench size and the family's own default steps."""
        deadline = time.monotonic() + timeout
        model_dir, out = self.work / f"family-{name}", self.work / f"bench-{name}.json"
        try:
            self.run(["-m", "omni_trt", "demo-model", str(model_dir), "--family", name, *(["--real-shapes"] if self.plan.real_shapes else [])],
                     timeout, f"model-{name}")
            self.run(["-m", "omni_trt", "bench", str(model_dir), "--runtimes", "torch", "--size", self.plan.bench_size, "--batch", "1",
                      "--warmup", "1", "--repeats", str(self.plan.repeats), "--out", str(out)], deadline - time.monotonic(), f"bench-{name}")
            if self.with_cache:
                self.step(f"cache {name}", lambda t: self.cache(min(t, deadline - time.monotonic()), str(model_dir), None, name))
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)  # disk: a real-shape model is tens of GB
        report = json.loads(out.read_text())
        return {"family": name, "real_shapes": self.plan.real_shapes, "size": report.get("size"), "steps": report.get("steps"),
                "runtimes": report.get("runtimes")}

    def lora(self, timeout: float, probe: dict[str, Any] | None) -> dict[str, Any]:
        """LoRA on a refittable TensorRT engine of a one-layer, full-width real-shape Z-Image:
        benchmarks/lora.py's base, steady, switch (refit seconds) and two-adapter figures."""
        runs = [f for f, r in ((probe or {}).get("flavors") or {}).items() if r and r.get("runs")]
        if self.tiny or not runs:
            raise _Skip("--tiny: no TensorRT refit on a CPU" if self.tiny else "no TensorRT runs on this GPU (see probe): nothing to refit")
        deadline = time.monotonic() + timeout
        model_dir, engine_dir, out, size = self.work / "lora-model", self.work / "lora-engines", self.work / "lora.json", self.plan.bench_size
        try:
            self.run(["-c", "import sys; from pathlib import Path; from omni_trt.demo.z_image import build_real_shapes; "
                      "build_real_shapes(Path(sys.argv[1]), 'fp16', overrides={'n_layers': 1, 'n_refiner_layers': 1})", str(model_dir)],
                     deadline - time.monotonic(), "lora-model")
            self.run(["-m", "omni_trt", "build-engine", str(model_dir), "--engine-dir", str(engine_dir), "--components", "transformer,vae_decoder",
                      "--dtype", "fp16", "--min-size", size, "--opt-size", size, "--max-size", size, "--refittable",
                      "--target", "tensorrt" if "tensorrt" in runs else "tensorrt-rtx"], deadline - time.monotonic(), "lora-engines")
            self.run([str(ROOT / "benchmarks" / "lora.py"), "--model", str(model_dir), "--engine-dir", str(engine_dir), "--runtimes", "tensorrt",
                      "--device", "cuda", "--dtype", "fp16", "--size", size, "--steps", str(self.plan.bench_steps), "--repeats", "3",
                      "--no-memory", "--out", str(out)], deadline - time.monotonic(), "lora")
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(engine_dir, ignore_errors=True)
        return json.loads(out.read_text())

    def cache(self, timeout: float, model_dir: str, engine_dir: str | None, name: str = "z-image") -> dict[str, Any]:
        """The step cache on a real-shape model: `omni calibrate-cache`'s table as JSON (20 and 50
        steps at the bench size; --tiny: 2 and 4 steps)."""
        out = self.work / f"cache-{name}.json"
        steps = ["2", "4"] if self.tiny else ["20", "50"]
        where = ["--engine-dir", engine_dir] if engine_dir else []
        self.run(["-m", "omni_trt", "calibrate-cache", model_dir, *where, "--size", self.plan.bench_size, "--steps", *steps,
                  "--thresholds", "0.06", "0.12", "0.24", "--out", str(out)], timeout, f"cache-{name}")
        return json.loads(out.read_text())

    # ---- the whole ----

    def main(self) -> dict[str, Any]:
        probe = self.step("probe", self.probe)
        model = self.step("model", self.model)
        if model is not None:
            engines = self.step("engines", lambda t: self.engines(t, model["dir"], probe))
            engine_dir = engines["dir"] if engines else None
            record = self.report["steps"]["engines"]
            engines_why = record.get("skipped") or record.get("error")
            self.step("bench", lambda t: self.bench(t, model["dir"], engine_dir, engines_why))
            self.step("concurrency", lambda t: self.concurrency(t, model["dir"]))
            if self.with_cache:
                self.step("cache", lambda t: self.cache(t, model["dir"], engine_dir))
        for name in self.families:
            self.step(f"family {name}", lambda t, name=name: self.family(t, name))
        if self.with_lora:
            self.step("lora", lambda t: self.lora(t, probe))
        self.report["figures"] = figures(self.report["steps"])
        self.write()
        return self.report


class _Skip(Exception):
    """A step that has nothing to do here; not a failure."""


def figures(steps: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, from the steps that produced them: per-runtime latency and speedup
    (end to end), the compile warm-up, the probe's block, the concurrency gain."""
    out: dict[str, Any] = {}
    bench = steps.get("bench") or {}
    ran = {name: e for name, e in (bench.get("runtimes") or {}).items() if "stages" in e}
    if ran:
        out["bench_total_ms"] = {name: e["stages"]["total"]["median_ms"] for name, e in ran.items()}
        out["bench_denoise_per_step_ms"] = {name: e["denoise_per_step_ms"] for name, e in ran.items()}
        out["bench_vae_decode_ms"] = {name: e["stages"]["vae_decode"]["median_ms"] for name, e in ran.items() if "vae_decode" in e["stages"]}
    baseline = bench.get("baseline")
    if bench.get(f"speedup_vs_{baseline}"):
        out[f"speedup_vs_{baseline}"] = {name: r["total"] for name, r in bench[f"speedup_vs_{baseline}"].items()}
    if "compile_warmup_s" in ran.get("torch-compile", {}):
        out["torch_compile_warmup_s"] = ran["torch-compile"]["compile_warmup_s"]
    probes = {f: r for f, r in (((steps.get("probe") or {}).get("flavors")) or {}).items() if r and r.get("runs")}
    if probes:
        out["probe_block_ms"] = {f: r["run"]["ms"] for f, r in probes.items()}
        out["probe_speedup_vs_eager"] = {f: r["run"]["speedup_vs_eager"] for f, r in probes.items()}
    for name, step in steps.items():  # the opt-in family steps: torch end to end at their own default steps
        torch_run = ((step or {}).get("runtimes") or {}).get("torch") or {}
        if name.startswith("family ") and "stages" in torch_run:
            out.setdefault("family_torch_total_ms", {})[step["family"]] = torch_run["stages"]["total"]["median_ms"]
    conc = steps.get("concurrency") or {}
    if "speedup" in conc:
        out["concurrency"] = {k: conc[k] for k in ("serial_s", "concurrent_s", "speedup")}
    return out


def machine() -> dict[str, Any]:
    """GPU (from nvidia-smi: this process never initialises CUDA) and package versions."""
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            line = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if line:
                name, cc, driver, memory = (p.strip() for p in line[0].split(","))
                gpu = {"name": name, "compute_capability": cc, "driver": driver, "memory": memory}
        except (OSError, subprocess.SubprocessError, ValueError):
            gpu = None
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    providers = None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return {"gpu": gpu, "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "versions": versions, "onnxruntime_providers": providers}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def _kill(proc: subprocess.Popen) -> None:
    """Terminate the process group, then kill what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:].strip() or "(no output)"


def _pipeline_calls(client: Any) -> int:
    """Pipeline calls the server has made so far (its omni_batch_images histogram's count)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("omni_batch_images_count"):
            return int(float(line.split()[-1]))
    raise StepError("/metrics has no omni_batch_images_count")


def _wait_ready(client: Any, proc: subprocess.Popen, deadline: float, log_path: Path) -> None:
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepError(f"omni serve exited ({proc.returncode}); output ends: {_tail(log_path)}")
        try:
            if client.get("/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise StepError(f"omni serve was not ready in time; output ends: {_tail(log_path)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the suite's JSON (rewritten after every step)")
    ap.add_argument("--tiny", action="store_true", help="the same steps on the tiny demo model on CPU, in about a minute")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default: 480, --tiny: 300)")
    ap.add_argument("--family", action="append", default=[], help="also bench this family's real-shape pipeline on torch (repeatable)")
    ap.add_argument("--lora", action="store_true", help="also measure LoRA adapters refit into a refittable TensorRT engine")
    ap.add_argument("--cache", action="store_true", help="also measure the step cache (omni calibrate-cache) on the real-shape models")
    ap.add_argument("--work", default=None, help="where the model, engines and logs go (default: a temporary folder, removed after)")
    args = ap.parse_args()
    plan = TINY if args.tiny else GPU
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="omni-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = Suite(plan, args.tiny, args.budget or (300.0 if args.tiny else 480.0), Path(args.out), work, tuple(args.family), args.lora,
                       args.cache).main()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, v in report["steps"].items() if not v.get("ok")]
    print(json.dumps(report["figures"], indent=2))
    print(f"gpu_suite: {report['wall_s']:.0f} s, {len(report['steps'])} steps, failed: {', '.join(failed) or 'none'}; JSON in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
