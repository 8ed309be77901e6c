"""The `omni` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import flags, logs
from .demo import DEMO_FAMILY
from .errors import OmniError, UsageError
from .models import FAMILIES
from .server.contract import MAX_BATCH_SIZE, MAX_QUEUE

log = logging.getLogger("omni_trt")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


API_KEY_ENV = "OMNI_TRT_API_KEY"


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $OMNI_TRT_API_KEY (a key given on
    the command line is visible to every user of the machine in `ps`)."""
    import os

    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
            key = lines[0].strip() if lines else ""
        except OSError as e:
            raise UsageError(f"--api-key-file {args.api_key_file}: {e.strerror}", "--api-key-file") from None
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file} is empty", "--api-key-file")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="hub id (org/name) or local diffusers pipeline folder; "
                   f"omitted: the embedded demo model ({DEMO_FAMILY}, trained to draw 'a red circle on a blue background' and the like)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--vae-use-slicing", action="store_true", help="decode a batch one image at a time (less memory)")
    p.add_argument("--vae-use-tiling", action="store_true", help="decode large images in tiles (less memory)")
    p.add_argument("--engine-dir", default=None, help="an engine dir made by `omni build-engine`: its engines replace the "
                   "transformer and VAE decoder; the model comes from its manifest (MODEL, if given, must match)")
    flags.add_cache_args(p)
    p.add_argument("--runtime", choices=("auto", "tensorrt", "onnxruntime", "torch", "torch-compile"), default="auto", help=(
        "what runs the transformer and VAE decoder. With --engine-dir: auto (TensorRT when the plans match this GPU and the "
        "installed TensorRT, else ONNX Runtime over the exported ONNX), tensorrt, onnxruntime, or torch (ignore the "
        "engines). torch-compile: PyTorch with torch.compile (the transformer's repeated blocks and the VAE decoder), "
        "compiled and warmed up at load; it runs no engines and refuses --engine-dir (default: auto)"))


def load_options(args: argparse.Namespace, warmup_size: str | None = None) -> Any:
    """The LoadOptions the load flags say (warmup_size: what torch-compile compiles at load;
    None: the family's default size)."""
    from .runtime.pipeline import LoadOptions
    from .runtime.stepcache import parse_cache_config

    return LoadOptions(device=args.device, dtype=args.dtype, vae_slicing=args.vae_use_slicing, vae_tiling=args.vae_use_tiling,
                       warmup_size=warmup_size, preview_decoder=getattr(args, "preview_decoder", "full"),  # full: no map to fit where nothing streams
                       cache=parse_cache_config(args.cache_backend, args.cache_config),
                       prompt_cache_size=_prompt_cache_size(getattr(args, "prompt_cache_size", 0)))


def _prompt_cache_size(n: int) -> int:
    if n < 0:
        raise UsageError(f"--prompt-cache-size must be 0 (off) or more, got {n}", "--prompt-cache-size")
    return n


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    """Calibrate the step cache: record the ratios uncached, store them with the model, print the
    table of thresholds (steps reused, speed-up measured, PSNR/SSIM against uncached)."""
    from .runtime.calibration import PROMPTS, calibrate, evaluate, format_table, store_calibration
    from .models import parse_size
    from .runtime.loader import load_runtime, resolve_model
    from .runtime.stepcache import CacheConfig

    size = parse_size(args.size, "--size") if args.size else None
    prompts = PROMPTS
    if args.prompts:
        prompts = tuple(line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip())
        if not prompts:
            raise UsageError(f"--prompts {args.prompts} has no prompt (one a line)", "--prompts")
    options = load_options(args, args.size)
    runtime = load_runtime(resolve_model(args.model, args.engine_dir), runtime=args.runtime,
                           options=dataclasses.replace(options, cache=CacheConfig()))  # calibrated here, not at load
    steps = args.steps or [runtime.family.defaults.steps]
    entry = calibrate(runtime, steps, prompts, size)
    where = store_calibration(runtime, entry, manifest=True)
    print(f"calibrated {', '.join(map(str, steps))} steps on {len(prompts)} prompts at {entry.size} in {entry.seconds:.1f} s; kept in {where}")
    report: dict[str, Any] = {"runtime": runtime.kind, "family": runtime.family.name, "size": entry.size, "prompts": len(prompts),
                              "calibration_s": entry.seconds, "kept_in": where, "by_steps": {}}
    for n in steps:
        rows = evaluate(runtime, entry, n, prompts, args.thresholds, size, base=options.cache.settings)
        print(f"\n{n} steps ({entry.size}, mean over {len(prompts)} prompts; PSNR/SSIM against the uncached images):")
        print(format_table(rows, n))
        report["by_steps"][str(n)] = [{k: (None if v == float("inf") else v) for k, v in r.items() if k != "images"} for r in rows]
    if args.out:
        from .files import atomic_write

        atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    return 0


def server_options(args: argparse.Namespace, names: list[str]) -> Any:
    """The ServerOptions serve's flags say; names: the served model names, the first reported."""
    from .server.contract import MB, ServerOptions

    return ServerOptions(
        served_model_name=names[0], aliases=tuple(names[1:]), max_queue=args.max_queue, max_batch_size=args.max_batch_size,
        api_key=api_key(args), max_body_bytes=int(args.max_body_mb * MB), body_timeout_s=args.body_timeout,
        body_total_timeout_s=args.body_total_timeout,
        max_prompt_tokens=args.max_prompt_tokens, max_megapixel_steps=args.max_megapixel_steps, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout, max_input_pixels=int(args.max_input_megapixels * 1e6),
        allowed_image_hosts=tuple(args.allow_image_host),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .runtime.loader import check_runtime, load_runtime, resolve_model
    from .server.app import create_app
    from .server.run import make_server
    from .server.serving import ImageServing

    check_runtime(args.runtime, args.engine_dir)
    if args.warmup_size is not None:
        from .models import parse_size

        parse_size(args.warmup_size, "--warmup-size")
    if args.trust_key:
        if not args.engine_dir:
            raise UsageError("--trust-key checks an engine dir's signature: give --engine-dir", "--trust-key")
        from .enginedir.signature import check_signature

        log.info("%s is signed by %s", args.engine_dir, check_signature(args.engine_dir, args.trust_key))
    model = resolve_model(args.model, args.engine_dir)  # fail before listening: a wrong path is not a 503
    options = server_options(args, args.served_model_name or [model.name])
    opts = dataclasses.replace(load_options(args, args.warmup_size), lora=lora_options(args))
    if args.replicas or args.min_replicas or args.max_replicas:
        return _serve_on_ray(args, options, opts)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serving = ImageServing(options, lambda: load_runtime(model, runtime=args.runtime, options=opts))
    server = make_server(create_app(serving), _net_options(args))
    log.info("serving %s on http://%s:%d (loading the model in the background; /health says when ready)", options.served_model_name,
             args.host, args.port)
    server.run()
    if serving.load_error:
        print(f"error: the model failed to load: {serving.load_error}", file=sys.stderr)
        return 1
    return server.exit_status()


def _net_options(args: argparse.Namespace) -> Any:
    from .server.run import NetOptions

    return NetOptions(args.host, args.port, args.max_connections, args.keep_alive, args.header_timeout, int(args.max_header_kb * 1024),
                      args.log_level.lower())


def _serve_on_ray(args: argparse.Namespace, options: Any, opts: Any) -> int:
    """--replicas: Ray Serve runs the model replicas behind the same app (Ray is imported here only)."""
    try:
        from .server.ray.deploy import ReplicaSpec, run
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "ray":
            raise UsageError("--replicas needs Ray Serve: pip install 'omni-trt[ray]'", "--replicas") from None
        raise
    spec = ReplicaSpec(model=args.model, engine_dir=args.engine_dir, runtime=args.runtime, load=opts, options=options, threads=args.threads)
    return run(spec, _net_options(args), args.replicas or args.min_replicas or 1, args.min_replicas, args.max_replicas, args.ray_address)


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.loader import load_runtime, resolve_model
    from .runtime.request import ImageAsk, resolve
    from .server.encoding import encode_image

    # torch-compile compiles the size it makes
    runtime = load_runtime(resolve_model(args.model, args.engine_dir), runtime=args.runtime, options=load_options(args, args.size))
    ask = ImageAsk(args.prompt, size=args.size, n=args.n, steps=args.steps, guidance_scale=args.guidance_scale,
                   true_cfg_scale=args.true_cfg_scale, negative_prompt=args.negative_prompt, seed=args.seed)
    req = resolve(runtime.family, ask, limits=runtime.limits, cache=runtime.cache_settings)
    result = runtime.generate([req])
    out = Path(args.output)
    paths = [out] if req.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(req.n)]
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
    for path, image in zip(paths, result.images[0]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(image, fmt))
        print(path)
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.stages.items())
    reused = f" ({result.steps[1]} reused by the step cache)" if result.steps[1] else ""
    print(f"seed {req.seed}, {req.width}x{req.height}, {req.steps} steps{reused}: {stages}", file=sys.stderr)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo import build_demo_model, copy_trained_demo

    if args.trained:
        if args.real_shapes or args.family != DEMO_FAMILY:
            raise UsageError(f"--trained is the {DEMO_FAMILY} demo model as trained: drop --family and --real-shapes", "--trained")
        print(copy_trained_demo(Path(args.dir)))
        return 0
    print(build_demo_model(Path(args.dir), args.family, real_shapes=args.real_shapes, dtype=args.dtype))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .enginedir import Manifest, format_manifest

    m = Manifest.read(args.engine_dir)
    print(json.dumps(m.to_json(), indent=2) if args.json else format_manifest(m))
    if args.no_verify:
        return 0
    problems = m.verify(args.engine_dir)
    if problems:
        print(f"\n{len(problems)} problem(s) in {args.engine_dir}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(f"rebuild with: {m.rebuild_command(args.engine_dir)} --force", file=sys.stderr)
        return 1
    print(f"\nall {len(m.files)} files match their sha256", file=sys.stderr)
    return 0


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible image API", description=(
        "Serve /v1/images/generations and /v1/chat/completions (image output) for a diffusers pipeline. "
        "The server listens at once and answers 503 until the model is loaded."))
    _add_load_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME", help=(
        "the model names clients may send; the first is the one reported (default: the model id). "
        "vLLM's convention: e.g. --served-model-name my-model default"))
    p.add_argument("--max-queue", type=positive_int, default=MAX_QUEUE, help=f"requests that may wait; more get 429 (default: {MAX_QUEUE})")
    p.add_argument("--max-batch-size", type=positive_int, default=MAX_BATCH_SIZE, help="most images per pipeline call: compatible requests "
                   f"are batched up to it, larger requests run in chunks of it (default: {MAX_BATCH_SIZE})")
    g = p.add_argument_group("access")
    g.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* (checked before the body is read). "
                   f"Visible in `ps`: prefer --api-key-file or ${API_KEY_ENV}")
    g.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file's first line")
    g.add_argument("--trust-key", action="append", default=[], metavar="PEM", help="serve --engine-dir only if its manifest is "
                   "signed (omni build-engine --sign-key) by this Ed25519 public key; repeatable. The manifest's sha256s prove "
                   "integrity, not who built it. Needs pip install 'omni-trt[sign]'")
    g = p.add_argument_group("limits", "what one request may cost; every refusal is a 4xx naming the field")
    g.add_argument("--max-body-mb", type=positive_float, default=32, help="largest request body in MB; larger ones get 413 before they are read (default: 32)")
    g.add_argument("--body-timeout", type=positive_float, default=30, metavar="S", help="a request body that stalls this long gets 408 (default: 30)")
    g.add_argument("--body-total-timeout", type=positive_float, default=120, metavar="S", help="a request body not whole after S seconds "
                   "gets 408, however it trickles (default: 120)")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=None, help="longest prompt in the model's tokens; longer gets 400 "
                   "(default: all the model reads, e.g. 512 for Z-Image). Prompts over 32 characters per allowed token are refused untokenized")
    g.add_argument("--max-megapixel-steps", type=positive_float, default=256, metavar="MPS", help="most width x height x n x steps / 1e6 "
                   "per request, e.g. 4 images of 1024x1024 at 50 steps = 210 (default: 256)")
    g.add_argument("--max-input-megapixels", type=positive_float, default=16.8, metavar="MP", help="largest edit input image "
                   "(and mask), read from its header before any pixel is decoded; larger gets 400 (default: 16.8, 4096x4096)")
    g.add_argument("--allow-image-host", action="append", default=[], metavar="HOST", help="a host chat image_url parts may name "
                   "with http(s); repeatable. Default: none, only data: URLs (a server that fetches any URL can be aimed anywhere)")
    g.add_argument("--request-timeout", type=positive_float, default=300, metavar="S", help="seconds from arrival to answer; past it the "
                   "request gets 504 and its work stops at the next step (default: 300)")
    g = p.add_argument_group("connections and shutdown")
    g.add_argument("--max-connections", type=positive_int, default=1000, help="open connections and requests uvicorn takes. At the "
                   "cap a new connection closes the oldest idle one (no request under way); past it in busy ones, 503 (default: 1000)")
    g.add_argument("--header-timeout", type=positive_float, default=10, metavar="S", help="a request's headers must arrive whole within "
                   "S seconds of the connection (or, kept alive, of the request's first byte); else 408 and the connection closes (default: 10)")
    g.add_argument("--max-header-kb", type=positive_float, default=64, metavar="KB", help="a request's headers over KB kilobytes get 431 "
                   "before anything else is checked, the API key included (default: 64)")
    g.add_argument("--keep-alive", type=positive_float, default=5, metavar="S", help="idle keep-alive connections close after S seconds (default: 5)")
    g.add_argument("--drain-timeout", type=positive_float, default=30, metavar="S", help="on SIGINT/SIGTERM: new requests get 503 and the "
                   "backlog may finish for S seconds; what is left then gets 503 (default: 30). A second signal skips the wait: "
                   "what is still waiting gets that 503 at once")
    g = p.add_argument_group("scale out (Ray Serve)", "the same API served by N model replicas, one GPU each (one CPU each "
                             "without CUDA); pip install 'omni-trt[ray]'")
    g.add_argument("--replicas", type=positive_int, default=None, metavar="N", help="model replicas (default: none, one process, Ray not used)")
    g.add_argument("--min-replicas", type=positive_int, default=None, metavar="N", help="autoscale on ongoing requests, from N replicas")
    g.add_argument("--max-replicas", type=positive_int, default=None, metavar="N", help="... up to N replicas")
    g.add_argument("--ray-address", default=None, metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto); "
                   "default: start a local one")
    g.add_argument("--threads", type=positive_int, default=None, metavar="T", help="torch CPU threads (per replica with --replicas; default: torch's)")
    p.add_argument("--preview-decoder", choices=("mlp", "linear", "full"), default="mlp", help=(
        "what makes streamed partial images: mlp (a small per-pixel network from the latent channels to RGB) or linear (a "
        "latent-to-RGB linear map), either fitted to the VAE decoder at load and cached under $OMNI_TRT_CACHE/previews, "
        "previews at most 512 px on the long side, for a small fraction of a decode; or full (a full VAE decode per preview, "
        "at the image's size). The final image is the full decoder's either way (default: mlp)"))
    g = p.add_argument_group("torch-compile")
    g.add_argument("--warmup-size", default=None, metavar="WxH", help=(
        "--runtime torch-compile: the image size compiled and warmed up before /health says ready (default: the family's "
        "default size). Other sizes, batches and longer prompts compile once, on their first request"))
    from .runtime.promptcache import DEFAULT_SIZE

    p.add_argument("--prompt-cache-size", type=int, default=DEFAULT_SIZE, metavar="N", help=(
        "text-encoder outputs kept for repeated prompts (least recently used dropped; a hit gives the same image bit for bit; "
        f"kept on the model's device: Qwen-Image's are ~3.7 MB each; 0: off) (default: {DEFAULT_SIZE})"))
    _add_lora_args(p)
    p.set_defaults(func=cmd_serve)


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    from .lora import MAX_LORAS_PER_REQUEST
    from .runtime.adapters import MAX_LORA_SESSIONS

    g = p.add_argument_group("LoRA adapters", "requests name adapters in `lora` (or as `model`); served on torch (PEFT layers), "
                             "torch-compile (merged in place), onnxruntime (merged weights) and tensorrt engines built with --refittable (refit)")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help=(
        "adapters loaded and checked at start: PATH is a .safetensors file or a folder with pytorch_lora_weights.safetensors, "
        "in any format diffusers' load_lora_weights reads for the family"))
    g.add_argument("--lora-dir", default=None, metavar="DIR", help=(
        "requests (and the load route) may name adapter paths inside DIR only (symlinks resolved); default: none, only "
        "registered adapters"))
    g.add_argument("--enable-lora-loading", action="store_true", help=(
        "turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (404 without it; paths inside --lora-dir; "
        "refused with --replicas)"))
    g.add_argument("--max-loras-per-request", type=positive_int, default=MAX_LORAS_PER_REQUEST, metavar="N", help=(
        f"most adapters one request applies (default: {MAX_LORAS_PER_REQUEST})"))
    g.add_argument("--max-lora-sessions", type=positive_int, default=MAX_LORA_SESSIONS, metavar="N", help=(
        "--runtime onnxruntime: sessions with merged adapter weights kept, by adapter set, least recently used dropped; each "
        f"holds a copy of the transformer's weights (default: {MAX_LORA_SESSIONS}, besides the base session)"))


def lora_options(args: argparse.Namespace) -> Any:
    """serve's LoraOptions, or None when no adapter flag is given (no `lora` field then)."""
    from .runtime.adapters import parse_modules
    from .runtime.pipeline import LoraOptions

    if args.enable_lora_loading and not args.lora_dir:
        raise UsageError("--enable-lora-loading loads adapters from --lora-dir: give --lora-dir DIR", "--enable-lora-loading")
    if args.enable_lora_loading and (args.replicas or args.min_replicas or args.max_replicas):
        raise UsageError("--enable-lora-loading is refused with --replicas: a load would reach one replica only; register "
                         "adapters with --lora-modules (every replica loads them) or let requests name paths in --lora-dir",
                         "--enable-lora-loading")
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: not a folder", "--lora-dir")
    modules = parse_modules(args.lora_modules)
    if not modules and not args.lora_dir:
        return None
    return LoraOptions(tuple(modules.items()), args.lora_dir, args.max_loras_per_request, args.enable_lora_loading, args.max_lora_sessions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="TensorRT-accelerated serving of diffusers text-to-image pipelines.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    parser.add_argument("--log-format", default="text", choices=logs.FORMATS, help="text lines, or one JSON object per line (default: text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve_parser(sub)

    p = sub.add_parser("generate", help="make one image without a server", description="Generate images with the same defaults and validation as the API.")
    _add_load_args(p)
    p.add_argument("--prompt", "-p", required=True, help="text prompt")
    p.add_argument("--size", default=None, help="WxH, e.g. 1024x1024 (default: the family's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the family's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--true-cfg-scale", type=float, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("-n", type=int, default=1, help="number of images (files get -0, -1, ... suffixes)")
    p.add_argument("--output", "-o", default="out.png", help="output file; .png, .jpg or .webp (default: out.png)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo-model", help="write a tiny random-weight pipeline of a family, or the trained demo model", description=(
        "Write a tiny random-weight pipeline (real diffusers classes) loadable with DiffusionPipeline.from_pretrained(DIR); "
        "--trained: the embedded demo model instead (what `omni serve` serves without a model)."))
    p.add_argument("dir", help="output folder")
    p.add_argument("--family", choices=sorted(FAMILIES), default=DEMO_FAMILY)
    p.add_argument("--real-shapes", action="store_true", help=(
        "the published transformer and VAE architectures (e.g. Z-Image-Turbo's 6B transformer) with random weights and a "
        "one-layer text encoder of the right width: for GPU benchmarks without downloadable weights. Needs the model's "
        "size in memory and on disk"))
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights dtype with --real-shapes (default: bf16)")
    p.add_argument("--trained", action="store_true", help=(
        f"a copy of the trained {DEMO_FAMILY} demo model (draws 'a red circle on a blue background' and the like; "
        "python -m omni_trt.demo.train retrains it) instead of random weights"))
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("inspect", help="show what an engine dir holds and verify its files",
                       description="Print an engine dir's manifest readably and check every file's sha256; exits 1 on a mismatch.")
    p.add_argument("engine_dir", metavar="DIR", help="engine dir written by build-engine")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.add_argument("--no-verify", action="store_true", help="skip hashing the files (fast for large engines)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("calibrate-cache", help="calibrate the step cache (MagCache) and print a table to choose a threshold from",
                       description=(
        "Run uncached generations, record the transformer output's magnitude ratio step to step, and keep the ratios with the "
        "model: in the engine dir's manifest (--engine-dir), else under $OMNI_TRT_CACHE/step-cache. Then, for each "
        "threshold, print the steps computed and reused, the speed-up measured and PSNR/SSIM against the uncached images "
        "of the same prompts and seeds. `omni serve --cache-backend mag_cache` reads what this stores."))
    _add_load_args(p)
    p.add_argument("--steps", type=positive_int, nargs="+", default=None, metavar="N",
                   help="step counts to calibrate (default: the family's); others are interpolated from the longest")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one a line (default: four of the demo's)")
    p.add_argument("--size", default=None, metavar="WxH", help="image size (default: the family's)")
    p.add_argument("--thresholds", type=positive_float, nargs="+", default=[0.06, 0.12, 0.24, 0.5], metavar="T",
                   help="mag_threshold values in the table (default: 0.06 0.12 0.24 0.5)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the table as JSON")
    p.set_defaults(func=cmd_calibrate_cache)

    from . import bench
    from .compiler import command

    command.add_parsers(sub)
    bench.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except OmniError as e:  # the one place an error becomes an exit code
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
