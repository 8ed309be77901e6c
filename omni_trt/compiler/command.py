"""`omni build-engine`: the argparse subcommand omni_trt.cli registers."""

from __future__ import annotations

import argparse
from typing import Any

from .plan import DEFAULT_OPSET, DEFAULT_OPT_LEVEL  # light: no torch import for `omni --help`


def add_parsers(subparsers: Any) -> None:
    """Register build-engine on the `omni` command's subparsers."""

    p = subparsers.add_parser(
        "build-engine",
        help="export a pipeline's transformer, VAE decoder and VAE encoder to ONNX and compile TensorRT engines",
        description=(
            "Export the denoiser (transformer), VAE decoder and VAE encoder (used by image edits only) of a diffusers "
            "text-to-image pipeline to ONNX, "
            "check each export against the original diffusers forward, and compile TensorRT engines with one "
            "optimization profile covering the sizes and batches given here. A second run with the same inputs "
            "does nothing; a changed input redoes only what it affects. The engine dir's manifest.json records "
            "what was built, and `omni serve --engine-dir DIR` uses it."
        ),
    )
    p.add_argument("model", nargs="?", default=None, help="hub id (org/name) or local diffusers pipeline folder; omitted "
                   "(or omni-trt/demo-z-image, the demo's served name): the embedded demo model")
    p.add_argument("--engine-dir", default=None, help="output folder (default: engines/<model-slug>/)")
    p.add_argument(
        "--components", default=None,
        help="comma-separated components to build: transformer, vae_decoder, vae_encoder (default: all three; "
        "transformer,vae_decoder serves generations but not edits)",
    )
    p.add_argument("--onnx-only", action="store_true", help="export and validate ONNX only; needs no TensorRT")
    p.add_argument("--force", action="store_true", help="redo everything even if the manifest says it is up to date")
    p.add_argument(
        "--target", choices=("auto", "tensorrt", "tensorrt-rtx"), default="auto",
        help="TensorRT flavour: tensorrt (datacenter GPUs; builds need a GPU) or tensorrt-rtx (RTX GPUs; builds "
        "ahead of time without a GPU). auto (default): tensorrt on a GPU machine when installed, else tensorrt-rtx",
    )
    p.add_argument(
        "--compute-capability", default=None, metavar="CC[,CC...]",
        help="tensorrt-rtx only: GPU compute capabilities the engines run on, e.g. 8.6,8.9, or 'current' "
        "(default: the current GPU if there is one, else the library's default set)",
    )
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None,
        help="export precision; networks are strongly typed, so this is the engine precision too. VAEs that are "
        "inaccurate in fp16 stay fp32 (default: bf16 with a GPU, fp32 without)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET}; 18-20 work, 23 does not build on TensorRT-RTX)")
    p.add_argument("--min-size", default=None, metavar="WxH", help="smallest image the engines accept (default: the family's minimum side, square)")
    p.add_argument("--opt-size", default=None, metavar="WxH", help="image size TensorRT tunes for (default: the family's default size)")
    p.add_argument("--max-size", default=None, metavar="WxH", help="largest image the engines accept (default: the family's default size)")
    p.add_argument(
        "--max-batch", type=int, default=1,
        help="most images per pipeline call (default: 1); the transformer profile doubles it where the family runs "
        "CFG as one batch",
    )
    p.add_argument(
        "--text-len", default=None, metavar="MIN,OPT,MAX",
        help="text tokens the transformer sees (default: the family's range)",
    )
    p.add_argument(
        "--static", action="store_true",
        help="one fixed shape (the opt size, --max-batch images, the opt text length) instead of a range: "
        "faster to build, and requests must match it (refused for a model whose pipeline resizes its input images "
        "itself, Qwen-Image-Edit: no one shape holds them)",
    )
    p.add_argument(
        "--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6), metavar="0-5",
        help=f"TensorRT builder optimization level (default: {DEFAULT_OPT_LEVEL}): lower builds faster, higher may run faster",
    )
    p.add_argument(
        "--refittable", action="store_true",
        help="build the transformer engine refittable, so `omni serve --lora-modules` can switch LoRA adapters into its "
        "weights in place (the manifest records it)",
    )
    p.add_argument(
        "--no-validate", action="store_true",
        help="skip the ONNX Runtime check against diffusers (it runs on CPU and holds the fp32 model twice)",
    )
    p.add_argument(
        "--sign-key", default=None, metavar="PEM",
        help="sign the manifest with this Ed25519 private key (manifest.json.sig), so `omni serve --trust-key` can check who "
        "built the dir; needs pip install 'omni-trt[sign]'",
    )
    p.set_defaults(func=cmd_build_engine)


def cmd_build_engine(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .execute import build_engines

    key = None
    if args.sign_key:
        from ..enginedir.signature import signing_key

        key = signing_key(args.sign_key)  # a bad key fails before the build
    text_len = None
    if args.text_len:
        try:
            text_len = [int(x) for x in args.text_len.split(",")]
        except ValueError:
            raise UsageError(f"--text-len takes MIN,OPT,MAX integers, got {args.text_len!r}", "--text-len") from None
    from ..demo import demo_source  # the embedded demo model's folder for no model or its served name

    report = build_engines(
        demo_source(args.model),
        engine_dir=args.engine_dir,
        components=args.components,
        dtype=args.dtype,
        opset=args.opset,
        min_size=args.min_size,
        opt_size=args.opt_size,
        max_size=args.max_size,
        max_batch=args.max_batch,
        text_len=text_len,
        static=args.static,
        target=args.target,
        compute_capability=args.compute_capability,
        onnx_only=args.onnx_only,
        force=args.force,
        opt_level=args.opt_level,
        validate=not args.no_validate,
        refittable=args.refittable,
    )
    if key is not None:
        from ..enginedir.signature import sign_engine_dir

        sign_engine_dir(report.engine_dir, key)
    print(report.engine_dir)
    return 0
