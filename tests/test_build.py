"""build-engine end to end on each family's tiny pipeline: ONNX export + validation, TensorRT-RTX
engines built ahead of time on this CPU-only machine, the manifest, and what reruns redo.

Engines are built once per family per session (opt level 0, small profile) and copied where a
test changes them. A TensorRT-RTX engine can only be deserialized on a GPU, so without one the
engine's I/O and profile are checked through the TensorRT network parsed from the same ONNX and
the builder inputs the manifest records; test_engine_deserializes_on_gpu covers the plan itself.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from omni_trt.cli import main as omni_main
from omni_trt.compiler.execute import build_engines
from omni_trt.compiler.plan import fit_profile
from omni_trt.enginedir import Manifest, onnx_relpath, plan_relpath
from omni_trt.models import FAMILIES
from omni_trt.models.base import Point

pytestmark = pytest.mark.slow

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
# The session's engine builds (the `built` fixture) and their arguments live in conftest.py,
# shared with the serving tests.
from conftest import BUILD_ARGS  # noqa: E402


def _copy(built, tmp_path: Path, name: str = "z-image") -> tuple[Path, Path]:
    model, engine_dir, _ = built(name)
    dst = tmp_path / "engines"
    shutil.copytree(engine_dir, dst)
    return model, dst


def _stamps(engine_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: a rewrite (atomic replace or in place) changes one of them."""
    return {
        p.relative_to(engine_dir).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(engine_dir.rglob("*"))
        if p.is_file()
    }


# ---- every family: ONNX, engines, manifest ----


@pytest.mark.parametrize("name", list(FAMILIES))
def test_build_writes_onnx_engines_manifest(built, name):
    model, engine_dir, report = built(name)
    family = FAMILIES[name]
    m = Manifest.read(engine_dir).to_json()
    assert report.wrote
    assert m["model"]["family"] == name and m["model"]["id"] == str(Path(model).resolve())
    # transformer, VAE decoder and VAE encoder, by default
    assert set(m["components"]) == set(family.components) == {"transformer", "vae_decoder", "vae_encoder"}
    assert Manifest.read(engine_dir).verify(engine_dir) == []
    for comp_name, comp in m["components"].items():
        spec = family.components[comp_name]
        onnx_path = engine_dir / comp["onnx"]["path"]
        plan = engine_dir / comp["engine"]["path"]
        assert onnx_path.stat().st_size > 0 and plan.stat().st_size > 0
        # the dynamic dims really are dynamic in the ONNX
        onnx_inputs = {t["name"]: t["shape"] for t in comp["inputs"]}
        assert tuple(onnx_inputs) == spec.input_names
        assert tuple(t["name"] for t in comp["outputs"]) == spec.output_names
        for t in spec.inputs:
            for axis, dim in t.dynamic.items():
                assert onnx_inputs[t.name][axis] == dim, (comp_name, t.name, axis)
        # validated against diffusers at two shapes, within tolerance
        val = comp["onnx"]["validation"]
        assert val["skipped"] is None and len(val["errors"]) >= 2 and max(val["errors"].values()) < 1e-4
        # the profile is the spec's at the recorded points, static dims from the ONNX
        points = [Point(**comp["points"][k]) for k in ("min", "opt", "max")]
        want = fit_profile(spec, spec.profile(*points), onnx_inputs)
        assert {k: (v["min"], v["opt"], v["max"]) for k, v in comp["profile"].items()} == {
            k: tuple(list(s) for s in v) for k, v in want.items()
        }
        assert comp["engine"]["flavor"] == "tensorrt-rtx" and comp["engine"]["opt_level"] == 0
        assert comp["engine"]["onnx_sha256"] == m["files"][comp["onnx"]["path"]]["sha256"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_profile_covers_requested_range(built, name):
    """max = --max-size at --max-batch images (CFG-doubled transformer batch where the family
    batches CFG); min = --min-size at one image."""
    _, engine_dir, _ = built(name)
    family = FAMILIES[name]
    m = Manifest.read(engine_dir).to_json()
    for comp_name, comp in m["components"].items():
        lo, hi = comp["points"]["min"], comp["points"]["max"]
        assert (lo["width"], lo["height"], lo["batch"]) == (64, 64, 1)
        assert (hi["width"], hi["height"]) == (128, 128)
        want_batch = family.transformer_batch(2, float("inf")) if comp_name == "transformer" else 2
        assert hi["batch"] == want_batch
        if comp_name == "transformer":
            assert (lo["text_len"], hi["text_len"]) == (family.text_len[0], family.text_len[2])


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_network_matches_manifest(built, name):
    """Without a GPU the plan cannot be deserialized: parse the same ONNX with TensorRT-RTX's own
    parser (not polygraphy) and check the network the engine was built from against the manifest:
    I/O names and dtypes, -1 exactly on the dynamic axes, profile static dims equal the network's."""
    from omni_trt.enginedir import trt_flavor

    trt = trt_flavor.TENSORRT_RTX.import_module()
    _, engine_dir, _ = built(name)
    family = FAMILIES[name]
    m = Manifest.read(engine_dir).to_json()
    for comp_name, comp in m["components"].items():
        spec = family.components[comp_name]
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(engine_dir / comp["onnx"]["path"])), comp_name
        ins = {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}
        outs = [network.get_output(i).name for i in range(network.num_outputs)]
        assert tuple(ins) == spec.input_names and tuple(outs) == spec.output_names
        recorded = {t["name"]: t["shape"] for t in comp["engine"]["io"]["inputs"]}
        assert recorded == ins
        for t in spec.inputs:
            dynamic_axes = {a for a, d in enumerate(ins[t.name]) if d == -1}
            assert dynamic_axes == set(t.dynamic), (comp_name, t.name)
            prof = comp["profile"][t.name]
            for axis, d in enumerate(ins[t.name]):
                if d != -1:
                    assert prof["min"][axis] == prof["opt"][axis] == prof["max"][axis] == d


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not (_has_cuda() and HAS_RTX), reason="deserializing a TensorRT-RTX engine needs a CUDA GPU")
def test_engine_deserializes_on_gpu(built, tmp_path):
    """On an RTX-capable GPU: the plan's own I/O names and profile equal the manifest's."""
    from omni_trt.enginedir import trt_flavor

    trt = trt_flavor.TENSORRT_RTX.import_module()
    gpu = trt_flavor.gpu()
    if gpu["compute_capability"] not in trt_flavor.supported_compute_capabilities(trt_flavor.TENSORRT_RTX):
        pytest.skip(f"TensorRT-RTX cannot run on compute capability {gpu['compute_capability']}")
    _, engine_dir, _ = built("z-image")
    m = Manifest.read(engine_dir).to_json()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    for comp in m["components"].values():
        engine = runtime.deserialize_cuda_engine((engine_dir / comp["engine"]["path"]).read_bytes())
        assert engine is not None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert set(names) == {t["name"] for t in comp["inputs"] + comp["outputs"]}
        for name, p in comp["profile"].items():
            got = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
            assert got == [p["min"], p["opt"], p["max"]]


# ---- reruns ----


def test_second_run_is_a_noop(built, tmp_path):
    model, engine_dir = _copy(built, tmp_path)
    before = _stamps(engine_dir)
    report = build_engines(str(model), engine_dir, **BUILD_ARGS)
    assert not report.wrote
    assert all(a.up_to_date for a in report.actions.values())
    assert _stamps(engine_dir) == before


def test_changed_profile_rebuilds_engines_not_onnx(built, tmp_path):
    model, engine_dir = _copy(built, tmp_path)
    before = _stamps(engine_dir)
    report = build_engines(str(model), engine_dir, **{**BUILD_ARGS, "max_size": "192x128"})
    after = _stamps(engine_dir)
    for name, action in report.actions.items():
        assert action.build and not action.export, (name, action)
        assert after[onnx_relpath(name)] == before[onnx_relpath(name)]
        assert after[plan_relpath(name)] != before[plan_relpath(name)]
    m = Manifest.read(engine_dir).to_json()
    assert m["components"]["vae_decoder"]["points"]["max"]["width"] == 192
    assert m["components"]["vae_decoder"]["profile"]["latent"]["max"][-1] == 192 // 8
    assert Manifest.read(engine_dir).verify(engine_dir) == []


def test_missing_engine_rebuilds_only_it(built, tmp_path):
    model, engine_dir = _copy(built, tmp_path)
    (engine_dir / plan_relpath("transformer")).unlink()
    before = _stamps(engine_dir)
    report = build_engines(str(model), engine_dir, **BUILD_ARGS)
    assert report.actions["transformer"].build and not report.actions["transformer"].export
    assert report.actions["vae_decoder"].up_to_date
    after = _stamps(engine_dir)
    assert after[plan_relpath("vae_decoder")] == before[plan_relpath("vae_decoder")]
    assert Manifest.read(engine_dir).verify(engine_dir) == []


def test_corrupted_file_is_detected(built, tmp_path, capsys):
    _, engine_dir = _copy(built, tmp_path)
    plan = engine_dir / plan_relpath("vae_decoder")
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    plan.write_bytes(bytes(data))
    problems = Manifest.read(engine_dir).verify(engine_dir)
    assert len(problems) == 1 and "vae_decoder.plan" in problems[0] and "sha256" in problems[0]

    rc = _run_cli(["inspect", str(engine_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "vae_decoder.plan" in err and "--force" in err


def test_force_rebuilds_and_keeps_other_components(built, tmp_path):
    model, engine_dir = _copy(built, tmp_path)
    before = _stamps(engine_dir)
    report = build_engines(str(model), engine_dir, **{**BUILD_ARGS, "components": "vae_decoder", "force": True})
    assert list(report.actions) == ["vae_decoder"]
    assert report.actions["vae_decoder"].export and report.actions["vae_decoder"].build
    after = _stamps(engine_dir)
    for rel in (onnx_relpath("vae_decoder"), plan_relpath("vae_decoder")):
        assert after[rel] != before[rel]
    for name in ("transformer", "vae_encoder"):  # the encoder replaces `vae` too, and is kept all the same
        for rel in (onnx_relpath(name), plan_relpath(name)):
            assert after[rel] == before[rel]
    m = Manifest.read(engine_dir).to_json()
    assert set(m["components"]) == {"transformer", "vae_decoder", "vae_encoder"}
    assert Manifest.read(engine_dir).verify(engine_dir) == []


def test_failed_validation_fails_the_build(tiny_dir, tmp_path, monkeypatch, capsys):
    """The gate: an ONNX that disagrees with diffusers is not kept, and the error has the numbers.
    Export and ONNX Runtime are faked; the gate's logic is what is under test."""
    from omni_trt.compiler import export
    from omni_trt.compiler.export import ExportResult

    def fake_export(family, component, module, out_path, dtype=None, opset=None):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(b"not really onnx")
        return ExportResult(out_path, 0.0, {"latent": ["batch", 16, "latent_height", "latent_width"]})

    monkeypatch.setattr(export, "export_component", fake_export)
    monkeypatch.setattr(export, "validate_onnx", lambda *a, **k: {"image@2x64x96:96": 3e-2, "image@3x80x112:128": 1e-6})
    engine_dir = tmp_path / "e"
    argv = ["build-engine", str(tiny_dir("z-image")), "--engine-dir", str(engine_dir), "--components", "vae_decoder", "--onnx-only"]
    assert _run_cli(argv) == 1
    err = capsys.readouterr().err
    assert "3.00e-02" in err and "must be < 0.0001" in err
    assert not (engine_dir / onnx_relpath("vae_decoder")).exists()
    # Nothing was built: no manifest claims anything (a fresh dir had none to keep).
    assert Manifest.read_or_none(engine_dir) is None


# ---- CLI ----


def _run_cli(argv: list[str]) -> int:
    """The `omni` command in this process, errors mapped to exit codes as the real one does."""
    return omni_main(argv)


def test_inspect_prints_manifest(built, capsys):
    _, engine_dir, _ = built("z-image")
    assert _run_cli(["inspect", str(engine_dir)]) == 0
    out = capsys.readouterr()
    assert all(f"[{c}]" in out.out for c in ("transformer", "vae_decoder", "vae_encoder")) and "tensorrt-rtx" in out.out
    assert "match their sha256" in out.err
    assert _run_cli(["inspect", str(engine_dir), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["family"] == "z-image"


def test_external_data_export_builds_and_runs(tiny_dir, tmp_path, monkeypatch):
    """Models over 2 GB export their weights to one side file: ONNX Runtime, the TensorRT-RTX
    parser and the manifest must all follow it. Forced here with a zero threshold."""
    import torch

    from omni_trt.compiler import export
    from omni_trt.runtime.engines import OnnxRuntimeEngine

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    engine_dir = tmp_path / "e"
    build_engines(str(tiny_dir("z-image")), engine_dir, **{**BUILD_ARGS, "components": "vae_decoder"})
    m = Manifest.read(engine_dir).to_json()
    files = m["components"]["vae_decoder"]["onnx"]["files"]
    assert files == ["onnx/vae_decoder.onnx", "onnx/vae_decoder.onnx.data"], files
    assert (engine_dir / files[1]).stat().st_size > 100_000, "the conv weights should be in the side file"
    assert max(m["components"]["vae_decoder"]["onnx"]["validation"]["errors"].values()) < 1e-4  # ORT read the side file
    assert set(files) <= set(m["files"]) and Manifest.read(engine_dir).verify(engine_dir) == []
    assert (engine_dir / m["components"]["vae_decoder"]["engine"]["path"]).stat().st_size > 0
    out = OnnxRuntimeEngine(engine_dir / files[0])({"latent": torch.randn(1, 16, 8, 8)})["image"]
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
