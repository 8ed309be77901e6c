"""Pure parts of build-engine: size parsing, profile points, dtypes, flavour and compute-capability
resolution, the up-to-date decision, fingerprints, verify/inspect on a hand-made engine dir, and
the CLI's errors. Fast: nothing here exports or builds."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from omni_trt import enginedir as ed
from omni_trt.cli import main as omni_main
from omni_trt.compiler.compile import check_profile
from omni_trt.compiler.plan import (
    component_dtype,
    fit_profile,
    model_slug,
    profile_points,
    resolve_components,
    resolve_sizes,
)
from omni_trt.enginedir import Manifest, trt_flavor
from omni_trt.errors import ManifestError
from omni_trt.models import FAMILIES, parse_size
from omni_trt.models.base import Point

ZI = FAMILIES["z-image"]


# ---- sizes and points ----


def test_parse_size_is_the_api_grammar_for_the_build_flags_too():
    assert parse_size("1024x768", "--max-size") == (1024, 768)
    assert parse_size(" 512x256 ", "--max-size") == (512, 256)
    # One grammar everywhere (the API's): the build's old '640' and '512 X 256' forms are gone.
    for bad in ("", "x512", "12x", "1024x768x3", "-5x5", "axb", "640", "512 X 256"):
        with pytest.raises(ValueError, match="--max-size.*WxH"):
            parse_size(bad, "--max-size")


def test_resolve_sizes_defaults_and_checks():
    d = (ZI.defaults.width, ZI.defaults.height)
    m = ZI.size.min_side
    assert resolve_sizes(ZI, None, None, None) == ((m, m), d, d)
    # a smaller max alone pulls the default opt down to it
    assert resolve_sizes(ZI, None, None, "512x256") == ((m, m), (512, 256), (512, 256))
    # a larger opt alone raises the default max to it
    assert resolve_sizes(ZI, None, "1536x1536", None)[2] == (1536, 1536)
    with pytest.raises(ValueError, match="multiples of 16"):
        resolve_sizes(ZI, None, "1000x1000", None)
    with pytest.raises(ValueError, match="within"):
        resolve_sizes(ZI, "16x16", None, None)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        resolve_sizes(ZI, "512x512", "256x256", "1024x1024")


def test_profile_points_batches():
    sizes = ((64, 64), (512, 512), (1024, 768))
    text = (32, 128, 512)
    # Z-Image batches CFG: max doubles, min assumes guidance 0, opt follows the default (0: no CFG)
    lo, opt, hi = profile_points(ZI, "transformer", sizes, 3, text)
    assert lo == Point(1, 64, 64, 32)
    assert opt == Point(1, 512, 512, 128)
    assert hi == Point(6, 768, 1024, 512)
    # the VAE decodes images only
    assert profile_points(ZI, "vae_decoder", sizes, 3, text)[2].batch == 3
    # true CFG as a second call (Qwen-Image): no doubling
    assert profile_points(FAMILIES["qwen-image"], "transformer", sizes, 3, text)[2].batch == 3
    # SD3: default guidance 3.5 > 1 runs CFG, so opt is a CFG pair
    assert profile_points(FAMILIES["sd3"], "transformer", sizes, 3, text)[1].batch == 2
    # static: one shape
    lo, opt, hi = profile_points(ZI, "transformer", sizes, 2, text, static=True)
    assert lo == opt == hi == Point(2, 512, 512, 128)
    with pytest.raises(ValueError, match="max-batch"):
        profile_points(ZI, "vae_decoder", sizes, 0, text)


def test_component_dtype_keeps_vae_out_of_fp16():
    vae = ZI.components["vae_decoder"]
    assert not vae.allow_fp16
    dtype, note = component_dtype(vae, "fp16")
    assert dtype == "fp32" and "fp16" in note
    assert component_dtype(vae, "bf16") == ("bf16", None)
    assert component_dtype(ZI.components["transformer"], "fp16") == ("fp16", None)
    with pytest.raises(ValueError):
        component_dtype(vae, "int8")


def test_resolve_components():
    # Every family builds the VAE encoder (edits) by default; a text-to-image build names the two others.
    for family in FAMILIES.values():
        assert resolve_components(family, None) == ["transformer", "vae_decoder", "vae_encoder"]
    assert resolve_components(ZI, "transformer,vae_decoder") == ["transformer", "vae_decoder"]
    assert resolve_components(ZI, "vae_decoder") == ["vae_decoder"]
    assert resolve_components(ZI, "vae_encoder, transformer") == ["transformer", "vae_encoder"]
    with pytest.raises(ValueError, match="choose from: transformer, vae_decoder, vae_encoder"):
        resolve_components(ZI, "unet")


def test_encoder_profile_is_the_decoders_in_pixels():
    """The encoder takes images at the request size and gives the decoder's latents; batch in images."""
    sizes, text = ((64, 64), (128, 96), (256, 192)), (32, 128, 512)
    enc, dec = ZI.components["vae_encoder"], ZI.components["vae_decoder"]
    points = profile_points(ZI, "vae_encoder", sizes, 3, text)
    assert points == profile_points(ZI, "vae_decoder", sizes, 3, text)
    assert enc.profile(*points)["image"] == ((1, 3, 64, 64), (1, 3, 96, 128), (3, 3, 192, 256))
    for p in points:
        assert {t.name: t.shape(p) for t in enc.outputs} == {"mean": dec.shapes(p)["latent"], "logvar": dec.shapes(p)["latent"]}


def test_model_slug(tmp_path):
    assert model_slug("Tongyi-MAI/Z-Image-Turbo") == "Tongyi-MAI--Z-Image-Turbo"
    (tmp_path / "my model").mkdir()
    assert model_slug(str(tmp_path / "my model")) == "my-model"


def test_fit_profile_takes_static_dims_from_onnx():
    spec = ZI.components["vae_decoder"]
    points = (Point(1, 64, 64, 1), Point(1, 128, 128, 1), Point(2, 256, 256, 1))
    profile = spec.profile(*points)
    fitted = fit_profile(spec, profile, {"latent": ["batch", 4, "latent_height", "latent_width"]})
    assert fitted["latent"] == ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 32, 32))


def test_check_profile():
    inputs = [{"name": "x", "shape": [-1, 4, -1]}]
    assert check_profile(inputs, {"x": ((1, 4, 2), (1, 4, 8), (2, 4, 16))}) == []
    assert "axis 1 is 4" in check_profile(inputs, {"x": ((1, 8, 2), (1, 8, 8), (2, 8, 16))})[0]
    assert "min <= opt <= max" in check_profile(inputs, {"x": ((2, 4, 2), (1, 4, 8), (2, 4, 16))})[0]
    assert "no profile" in check_profile(inputs, {})[0]
    assert "not a network input" in check_profile(inputs, {"x": ((1, 4, 2),) * 3, "y": ((1,),) * 3})[0]


# ---- flavours and compute capabilities ----


def test_parse_compute_capabilities():
    assert trt_flavor.parse_compute_capabilities("8.9, 8.6,8.6") == ["8.6", "8.9"]
    assert trt_flavor.parse_compute_capabilities("12.0,8.0") == ["8.0", "12.0"]
    assert trt_flavor.parse_compute_capabilities("current") == ["current"]
    assert trt_flavor.parse_compute_capabilities(None) is None
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        trt_flavor.parse_compute_capabilities("sm86")
    with pytest.raises(ValueError, match="cannot be combined"):
        trt_flavor.parse_compute_capabilities("current,8.6")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_resolve_compute_capabilities_rtx():
    rtx = trt_flavor.TENSORRT_RTX
    assert "8.6" in trt_flavor.supported_compute_capabilities(rtx)
    assert trt_flavor.resolve_compute_capabilities(rtx, None, None) is None  # library defaults
    assert trt_flavor.resolve_compute_capabilities(rtx, None, "8.9") == ["8.9"]  # the current GPU
    assert trt_flavor.resolve_compute_capabilities(rtx, ["current"], "8.6") == ["8.6"]
    assert trt_flavor.resolve_compute_capabilities(rtx, ["8.6", "12.0"], None) == ["8.6", "12.0"]
    with pytest.raises(ValueError, match="cannot target compute capability 9.0"):
        trt_flavor.resolve_compute_capabilities(rtx, ["9.0"], None)
    with pytest.raises(ValueError, match="needs a GPU"):
        trt_flavor.resolve_compute_capabilities(rtx, ["current"], None)
    with pytest.raises(ValueError, match="tensorrt-rtx only"):
        trt_flavor.resolve_compute_capabilities(trt_flavor.TENSORRT, ["8.6"], None)


def test_resolve_flavor(monkeypatch):
    installed = {"tensorrt": False, "tensorrt_rtx": True}
    monkeypatch.setattr(trt_flavor.Flavor, "installed", lambda self: installed[self.module])
    assert trt_flavor.resolve("auto", has_gpu=False) is trt_flavor.TENSORRT_RTX
    assert trt_flavor.resolve("auto", has_gpu=True) is trt_flavor.TENSORRT_RTX
    with pytest.raises(trt_flavor.TensorRTNotInstalled, match=r"omni-trt\[tensorrt\]"):
        trt_flavor.resolve("tensorrt", has_gpu=True)
    installed["tensorrt"] = True
    assert trt_flavor.resolve("auto", has_gpu=True) is trt_flavor.TENSORRT
    with pytest.raises(trt_flavor.TensorRTNotInstalled, match="only on a machine with a GPU"):
        trt_flavor.resolve("tensorrt", has_gpu=False)
    installed.update(tensorrt=False, tensorrt_rtx=False)
    with pytest.raises(trt_flavor.TensorRTNotInstalled, match="--onnx-only needs neither"):
        trt_flavor.resolve("auto", has_gpu=True)


# ---- the up-to-date decision ----

ONNX_KEY = {"fingerprint": "f1", "dtype": "fp32", "opset": 20, "torch": "2.13"}
ENGINE_KEY = {"profile": {"x": {"min": [1], "opt": [2], "max": [4]}}, "flavor": "tensorrt-rtx", "version": "1.7", "targets": "default", "opt_level": 3}


SHA_ONNX, SHA_PLAN = "a" * 64, "d" * 64


def _old(engine_sha: str = SHA_ONNX) -> Manifest:
    m = _manifest_json()
    c = m["components"]["vae_decoder"]
    c["onnx"]["key"] = dict(ONNX_KEY)
    c["engine"]["key"] = copy.deepcopy(ENGINE_KEY)
    c["engine"]["onnx_sha256"] = engine_sha
    m["files"] = {"onnx/vae_decoder.onnx": {"sha256": SHA_ONNX, "size": 10}, "vae_decoder.plan": {"sha256": SHA_PLAN, "size": 20}}
    return Manifest.model_validate(m)


SIZES = {"onnx/vae_decoder.onnx": 10, "vae_decoder.plan": 20}


def test_decide_up_to_date_and_first_build():
    assert ed.decide(_old(), "vae_decoder", ONNX_KEY, ENGINE_KEY, SIZES).up_to_date
    first = ed.decide(None, "vae_decoder", ONNX_KEY, ENGINE_KEY, {})
    assert first.export and first.build
    assert ed.decide(_old(), "transformer", ONNX_KEY, ENGINE_KEY, {}).export


def test_decide_engine_inputs_rebuild_only_the_engine():
    for change in ({"profile": {"x": {"min": [1], "opt": [2], "max": [8]}}}, {"version": "1.8"}, {"targets": ["8.6"]}, {"opt_level": 5}, {"flavor": "tensorrt"}):
        a = ed.decide(_old(), "vae_decoder", ONNX_KEY, {**ENGINE_KEY, **change}, SIZES)
        assert a.build and not a.export, change
        assert any(next(iter(change)) in r for r in a.reasons)


def test_decide_onnx_inputs_reexport_and_rebuild():
    for change in ({"opset": 18}, {"dtype": "bf16"}, {"fingerprint": "f2"}, {"torch": "2.14"}):
        a = ed.decide(_old(), "vae_decoder", {**ONNX_KEY, **change}, ENGINE_KEY, SIZES)
        assert a.export and a.build, change
    assert ed.decide(_old(), "vae_decoder", {**ONNX_KEY, "opset": 18}, ENGINE_KEY, SIZES).reasons == ("opset: 20 -> 18",)


def test_decide_files():
    a = ed.decide(_old(), "vae_decoder", ONNX_KEY, ENGINE_KEY, {**SIZES, "vae_decoder.plan": None})
    assert a.build and not a.export and "vae_decoder.plan missing" in a.reasons
    a = ed.decide(_old(), "vae_decoder", ONNX_KEY, ENGINE_KEY, {**SIZES, "onnx/vae_decoder.onnx": 11})
    assert a.export and a.build
    assert ed.decide(_old(engine_sha="b" * 64), "vae_decoder", ONNX_KEY, ENGINE_KEY, SIZES).build


def test_decide_force_and_onnx_only():
    a = ed.decide(_old(), "vae_decoder", ONNX_KEY, ENGINE_KEY, SIZES, force=True)
    assert a.export and a.build and a.reasons == ("--force",)
    # --onnx-only: the existing engine stays while its ONNX does, and goes when the ONNX changes
    assert ed.decide(_old(), "vae_decoder", ONNX_KEY, None, SIZES).up_to_date
    a = ed.decide(_old(), "vae_decoder", {**ONNX_KEY, "dtype": "bf16"}, None, SIZES)
    assert a.export and not a.build and a.drop_engine


# ---- fingerprints ----


def _fake_model(root: Path) -> Path:
    (root / "vae").mkdir(parents=True)
    (root / "transformer").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline", "vae": ["diffusers", "AutoencoderKL"], "transformer": ["diffusers", "ZImageTransformer2DModel"]}))
    (root / "vae" / "config.json").write_text('{"latent_channels": 16}')
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 100)
    (root / "transformer" / "config.json").write_text('{"dim": 64}')
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 200)
    return root


def test_fingerprints_follow_configs_and_weight_sizes(tmp_path):
    root = _fake_model(tmp_path / "m")
    vae, tr, whole = ed.model_fingerprint(root, ["vae"]), ed.model_fingerprint(root, ["transformer"]), ed.model_fingerprint(root)
    (root / "vae" / "config.json").write_text('{"latent_channels": 4}')
    assert ed.model_fingerprint(root, ["vae"]) != vae
    assert ed.model_fingerprint(root, ["transformer"]) == tr  # the other component is unaffected
    assert ed.model_fingerprint(root) != whole
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 201)
    assert ed.model_fingerprint(root, ["transformer"]) != tr


# ---- verify / inspect on a hand-made engine dir ----


def _manifest_json(files: dict | None = None) -> dict:
    """A whole, valid manifest (one component) as JSON."""
    return {
        "format": ed.FORMAT,
        "model": {"id": "org/name", "family": "z-image", "pipeline_class": "ZImagePipeline", "fingerprint": "f" * 64},
        "versions": {"torch": "2.13"},
        "gpu": None,
        "built_at": ed.now(),
        "components": {
            "vae_decoder": {
                "pipeline_attr": "vae",
                "dtype": "fp32",
                "points": {k: {"batch": 1, "height": 64, "width": 64, "text_len": 1} for k in ("min", "opt", "max")},
                "profile": {"latent": {"min": [1, 16, 8, 8], "opt": [1, 16, 8, 8], "max": [1, 16, 8, 8]}},
                "inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 16, "latent_height", "latent_width"]}],
                "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}],
                "onnx": {"path": "onnx/vae_decoder.onnx", "files": ["onnx/vae_decoder.onnx"], "config_fingerprint": "c" * 64,
                         "opset": 20, "exporter": "x", "seconds": 1.0, "exported_at": ed.now(),
                         "validation": {"dtype": "fp32", "tolerance": 1e-4, "errors": {"image@1": 1e-6}, "skipped": None}, "key": {}},
                "engine": {"path": "vae_decoder.plan", "flavor": "tensorrt-rtx", "module": "tensorrt_rtx", "version": "1.7",
                           "compute_capabilities": None, "compute_capabilities_source": "library default", "gpu": None,
                           "opt_level": 0, "io": {"inputs": [], "outputs": []}, "onnx_sha256": "a" * 64, "seconds": 1.0,
                           "built_at": ed.now(), "key": {}},
            }
        },
        "files": files or {},
    }


def _fake_engine_dir(root: Path) -> Path:
    from omni_trt.files import sha256_file

    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "vae_decoder.onnx").write_bytes(b"onnx-bytes")
    (root / "vae_decoder.plan").write_bytes(b"plan-bytes")
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in ("onnx/vae_decoder.onnx", "vae_decoder.plan")}
    Manifest.model_validate(_manifest_json(files)).write(root)
    return root


def _cli(argv: list[str]) -> int:
    """The `omni` command in this process, errors mapped to exit codes as the real one does."""
    return omni_main(argv)


def test_verify_and_inspect(tmp_path, capsys):
    d = _fake_engine_dir(tmp_path / "e")
    m = Manifest.read(d)
    assert m.verify(d) == []
    assert _cli(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "org/name" in out and "[vae_decoder]" in out and "library default" in out
    c = m.components["vae_decoder"]
    assert m.model.id == "org/name" and m.model.family == "z-image"
    assert c.engine.path == "vae_decoder.plan" and c.onnx.path == "onnx/vae_decoder.onnx"
    assert c.points.max.point == Point(1, 64, 64, 1) and c.shape_ranges()["latent"][2] == (1, 16, 8, 8)
    assert c.engine.flavor == "tensorrt-rtx" and c.input_names == ("latent",)
    assert Manifest.model_validate(m.to_json()) == m  # one JSON form, read back equal

    (d / "vae_decoder.plan").write_bytes(b"plan-bytez")  # same size, other bytes
    (d / "onnx" / "vae_decoder.onnx").unlink()
    problems = m.verify(d)
    assert any("vae_decoder.plan: sha256" in p for p in problems)
    assert any("onnx/vae_decoder.onnx: missing" in p for p in problems)
    assert _cli(["inspect", str(d)]) == 1
    assert "omni build-engine org/name" in capsys.readouterr().err


def test_add_command_builds_a_component_as_another_was_built(tmp_path):
    """What an engine dir without the VAE encoder tells the operator to run: the decoder's dtype,
    sizes, batch and TensorRT flavour, so the range the dir serves does not change."""
    data = _manifest_json()
    data["components"]["vae_decoder"]["points"] = {
        "min": {"batch": 1, "height": 64, "width": 64, "text_len": 1},
        "opt": {"batch": 1, "height": 96, "width": 128, "text_len": 1},
        "max": {"batch": 2, "height": 256, "width": 192, "text_len": 1},
    }
    m = Manifest.model_validate(data)
    assert m.add_command("E", "vae_encoder", like="vae_decoder") == (
        "omni build-engine org/name --engine-dir E --target tensorrt-rtx --components vae_encoder --dtype fp32 "
        "--min-size 64x64 --opt-size 128x96 --max-size 192x256 --max-batch 2 --opt-level 0"
    )
    engine = data["components"]["vae_decoder"]["engine"]
    engine.update(compute_capabilities=["8.6", "8.9"], compute_capabilities_source="requested")
    assert Manifest.model_validate(data).add_command("E", "vae_encoder", "vae_decoder").endswith("--max-batch 2 --opt-level 0 --compute-capability 8.6,8.9")
    data["components"]["vae_decoder"]["engine"] = None
    assert Manifest.model_validate(data).add_command("E", "vae_encoder", "vae_decoder") == (
        "omni build-engine org/name --engine-dir E --components vae_encoder --dtype fp32 "
        "--min-size 64x64 --opt-size 128x96 --max-size 192x256 --max-batch 2 --onnx-only"
    )


def test_read_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path)
    assert _cli(["inspect", str(tmp_path)]) == 2


# ---- CLI errors (nothing is exported) ----


def test_build_engine_cli_errors(tmp_path, capsys):
    assert _cli(["build-engine", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err

    other = tmp_path / "sd15"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert _cli(["build-engine", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "ZImagePipeline" in err

    zi = _fake_model(tmp_path / "zi")
    assert _cli(["build-engine", str(zi), "--max-size", "1000x1000"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert _cli(["build-engine", str(zi), "--components", "unet"]) == 2
    assert "choose from" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is None:
        assert _cli(["build-engine", str(zi), "--target", "tensorrt"]) == 2
        err = capsys.readouterr().err
        assert "pip install 'omni-trt[tensorrt]'" in err and "--onnx-only" in err


def test_cli_help_lists_flags():
    from omni_trt.compiler.command import add_parsers

    parser = argparse.ArgumentParser(prog="omni")
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    text = sub.choices["build-engine"].format_help()
    for flag in ("--engine-dir", "--components", "--onnx-only", "--force", "--target", "--compute-capability", "--dtype",
                 "--opset", "--min-size", "--opt-size", "--max-size", "--max-batch", "--static", "--opt-level"):
        assert flag in text
    args = parser.parse_args(["build-engine", "org/name", "--components", "transformer", "--max-batch", "4", "--static"])
    assert args.components == "transformer" and args.max_batch == 4 and args.static and callable(args.func)


def test_registered_in_omni_cli():
    from omni_trt.cli import build_parser

    args = build_parser().parse_args(["inspect", "some/dir"])
    assert args.engine_dir == "some/dir" and callable(args.func)


def test_rebuild_command(tmp_path):
    m = Manifest.read(_fake_engine_dir(tmp_path / "e"))
    assert m.rebuild_command("engines/x").startswith("omni build-engine org/name --engine-dir engines/x")


def test_cli_default_opset_is_the_exporters():
    from omni_trt.compiler import export, plan

    assert plan.DEFAULT_OPSET == export.DEFAULT_OPSET


def test_config_fingerprint_ignores_weights_but_not_configs(tiny_dir, tmp_path):
    """What serve compares for a hub model, whose replaced weights it never downloads."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_dir("z-image"), model)
    configs = ed.model_fingerprint(model, ["vae"], configs_only=True)
    full = ed.model_fingerprint(model, ["vae"])
    weights = next((model / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert ed.model_fingerprint(model, ["vae"], configs_only=True) == configs
    assert ed.model_fingerprint(model, ["vae"]) != full
    cfg = model / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace("0.3611", "0.5"))
    assert ed.model_fingerprint(model, ["vae"], configs_only=True) != configs
