"""Can this machine build, deserialize and run a TensorRT engine through omni-trt's own build
(compiler.compile) and runtime (runtime.engines) code, and how fast is a DiT block there?

    python benchmarks/trt_probe.py --flavor tensorrt-rtx --out probe.json [--tiny]

One single-stream DiT block of the Z-Image shape (RMSNorm, attention with qk-norm, SwiGLU;
--tiny: width 64) is exported to ONNX, built with the flavour (TensorRT-RTX: for the current GPU,
or the library's default targets without one), deserialized and run on torch's stream, and
compared with PyTorch eager. Each step records its error text and the later steps are skipped,
so a failure is the finding: the JSON is written and the exit status is 0 either way. One flavour
per process (polygraphy binds one), so the GPU suite runs this once per installed flavour.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import write_result  # noqa: E402
from torch import nn  # noqa: E402

from omni_trt.enginedir import trt_flavor  # noqa: E402

REAL = dict(dim=3840, heads=30, tokens=4128)  # Z-Image-Turbo at 1024x1024: 4096 image + 32 text tokens
TINY = dict(dim=64, heads=2, tokens=64)


class DiTBlock(nn.Module):
    """Pre-norm attention with RMS-normed queries and keys, then a SwiGLU feed-forward."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head = dim // heads
        self.attn_norm, self.ffn_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.q_norm, self.k_norm = nn.RMSNorm(head, eps=1e-5), nn.RMSNorm(head, eps=1e-5)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        hidden = dim * 8 // 3
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.to_qkv(self.attn_norm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        x = x + self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def median_ms(fn: Callable[[], Any], cuda: bool, iters: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def probe(flavor_name: str, shape: dict[str, int], opt_level: int, work: Path) -> dict[str, Any]:
    from omni_trt.compiler.compile import compile_engine
    from omni_trt.compiler.plan import DEFAULT_OPSET
    from omni_trt.runtime.engines import TensorRTEngine

    gpu = trt_flavor.gpu()
    out: dict[str, Any] = {"flavor": flavor_name, "gpu": gpu, "block": shape, "torch": torch.__version__, "runs": False}
    flavor = trt_flavor.FLAVORS[flavor_name]
    if not flavor.installed():
        out["skipped"] = f"{flavor.module} is not installed (pip install 'omni-trt[{flavor.extra}]')"
        return out

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            value = fn()
            out[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}
            return value
        except Exception as e:  # the failure text is the finding
            out[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 3), "error": f"{type(e).__name__}: {e}"[-2000:],
                         "traceback": traceback.format_exc()[-3000:]}
            raise _Stop from e

    try:
        trt = step("import", flavor.import_module)
        out["version"] = flavor.version()
        if flavor.rtx:
            out["supported_compute_capabilities"] = trt_flavor.supported_compute_capabilities(flavor)
        device = "cuda" if gpu else "cpu"
        dtype = torch.float16 if gpu else torch.float32  # strongly typed: the ONNX dtype is the engine's
        torch.manual_seed(0)
        block = DiTBlock(shape["dim"], shape["heads"]).to(device, dtype).eval()
        x = torch.randn(1, shape["tokens"], shape["dim"], device=device, dtype=dtype)
        onnx_path, plan_path = work / "block.onnx", work / "block.plan"

        def export() -> None:
            with torch.no_grad():
                torch.onnx.export(block, (x,), dynamo=True, optimize=True, opset_version=DEFAULT_OPSET, input_names=["x"],
                                  output_names=["y"]).save(str(onnx_path))

        step("export", export)
        # With a GPU, TensorRT-RTX is asked to build for it (the library's own verdict on this GPU);
        # without one, for its default targets, as build-engine does ahead of time.
        ccs = [trt_flavor.CURRENT] if gpu and flavor.rtx else None
        dims = tuple(x.shape)
        result = step("build", lambda: compile_engine(onnx_path, plan_path, {"x": (dims, dims, dims)}, flavor, opt_level=opt_level,
                                                      compute_capabilities=ccs, label="probe"))
        out["build"].update(targets=result.compute_capabilities, opt_level=opt_level, plan_mb=round(plan_path.stat().st_size / 1e6, 2))
        if not gpu:
            out["deserialize"] = out["run"] = {"skipped": "no CUDA GPU: engines deserialize and run only on one"}
            return out
        engine = step("deserialize", lambda: TensorRTEngine(plan_path, trt, "cuda"))
        with torch.inference_mode():
            want = block(x)
            got = step("run", lambda: engine({"x": x})["y"])
            torch.cuda.synchronize()
            trt_ms = median_ms(lambda: engine({"x": x}), cuda=True)
            eager_ms = median_ms(lambda: block(x), cuda=True)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        out["run"].update(ms=round(trt_ms, 3), torch_eager_ms=round(eager_ms, 3), speedup_vs_eager=round(eager_ms / trt_ms, 3),
                          rel_error_vs_torch=rel)
        out["runs"] = True
    except _Stop:
        pass
    return out


class _Stop(Exception):
    """A probe step failed; its error is recorded and the later steps are skipped."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", choices=sorted(trt_flavor.FLAVORS), default=trt_flavor.TENSORRT_RTX.target)
    ap.add_argument("--tiny", action="store_true", help=f"a block of width {TINY['dim']} (CPU-sized) instead of Z-Image's {REAL['dim']}")
    ap.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level (default: 3, --tiny: 0)")
    ap.add_argument("--out", default=None, help="write the JSON here (it is printed too)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = probe(args.flavor, TINY if args.tiny else REAL, args.opt_level if args.opt_level is not None else (0 if args.tiny else 3), Path(tmp))
    result.update(python=platform.python_version(), seconds=round(time.perf_counter() - t0, 3))
    return write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
