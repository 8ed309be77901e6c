"""omni_trt.lora's pure parts, tested directly: the request field, which files may be opened, the
shape check and the merge maths (against PEFT's own fuse)."""

from __future__ import annotations

import math
import os

import pytest

from omni_trt.errors import RequestError
from omni_trt.lora import MAX_SCALE, LoraRef, adapter_set, inside, parse_lora, with_model
from omni_trt.lora.files import adapter_file
from omni_trt.lora.request import describe


def refused(fn, *args, **kw) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args, **kw)
    assert e.value.param == "lora", e.value.param
    assert 400 <= e.value.status < 500
    return e.value


# ---- the request field ----


def test_parse_lora_takes_objects_lists_aliases_names_and_json_text():
    assert parse_lora(None) == () and parse_lora([]) == () and parse_lora("") == () and parse_lora("  ") == ()
    assert parse_lora({"name": "a"}) == (LoraRef("a", 1.0),)
    assert parse_lora({"lora_name": "a", "lora_scale": 0.5}) == (LoraRef("a", 0.5),)
    assert parse_lora([{"adapter": "a", "scale": 2}, "b"]) == (LoraRef("a", 2.0), LoraRef("b", 1.0))
    assert parse_lora({"name": "a", "lora_local_path": "x/y"}) == (LoraRef("a", 1.0, "x/y"),)
    for key in ("path", "lora_path", "local_path"):
        assert parse_lora({"name": "a", key: "p"})[0].path == "p"
    assert parse_lora("bare-name") == (LoraRef("bare-name"),)  # an edits form field with a bare name
    assert parse_lora('[{"name": "a", "scale": -1}]') == (LoraRef("a", -1.0),)  # ... or JSON text


@pytest.mark.parametrize("value, words", [
    ({"name": "a", "scale": math.nan}, "finite"),
    ({"name": "a", "scale": math.inf}, "finite"),
    ({"name": "a", "scale": "1"}, "number"),
    ({"name": "a", "scale": True}, "number"),
    ({"name": "a", "scale": MAX_SCALE + 0.5}, "between"),
    ({"name": "a", "scale": -MAX_SCALE - 0.5}, "between"),
    ({"scale": 1}, "name"),
    ({"name": ""}, "name"),
    ({"name": 3}, "name"),
    ({"name": "../x"}, "slashes"),
    ({"name": "a", "name_typo": 1}, "unknown"),
    ({"name": "a", "lora_name": "b"}, "both"),
    ([{"name": "a"}, {"name": "a"}], "twice"),
    ([1], "object"),
    (7, "object"),
    ('{"name": ', "JSON"),
    ({"name": "a", "path": ""}, "path"),
])
def test_parse_lora_refuses_with_the_reason(value, words):
    assert words in refused(parse_lora, value).message


def test_too_many_adapters_is_refused_at_the_limit():
    four = [{"name": f"a{i}"} for i in range(4)]
    assert len(parse_lora(four, max_per_request=4)) == 4
    assert "at most 3" in refused(parse_lora, four, max_per_request=3).message


def test_adapter_set_ignores_order_and_drops_zero_scales():
    one = adapter_set(parse_lora([{"name": "b", "scale": 0.5}, {"name": "a"}]))
    two = adapter_set(parse_lora([{"name": "a"}, {"name": "b", "scale": 0.5}]))
    assert one == two == (("a", 1.0), ("b", 0.5))
    assert adapter_set(parse_lora({"name": "a", "scale": 0})) == ()  # the base model: batches with plain requests
    assert describe(one) == "a:1,b:0.5" and describe(()) == "none"


def test_model_naming_an_adapter_adds_it_once():
    known = frozenset({"a", "b"})
    assert with_model((), "a", known) == (LoraRef("a"),)
    assert with_model((LoraRef("a", 0.3),), "a", known) == (LoraRef("a", 0.3),)  # the list's scale wins
    assert with_model((), "tiny-z", known) == ()  # the served model, not an adapter


# ---- files ----


def test_paths_stay_inside_the_lora_dir_symlinks_resolved(tmp_path):
    root = tmp_path / "loras"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert inside("ok", root) == (root / "ok").resolve()
    assert inside(root / "ok", root) == (root / "ok").resolve()
    for bad in ("../secret", str(outside), "link", "ok/../../secret"):
        assert "outside" in refused(inside, bad, root).message


def test_only_safetensors_under_the_size_limit_are_opened(tmp_path):
    for name in ("a.bin", "a.pt", "a.ckpt", "a.pth"):
        (tmp_path / name).write_bytes(b"not read")
        assert "pickle" in refused(adapter_file, tmp_path / name).message
    (tmp_path / "a.txt").write_text("x")
    assert "not a .safetensors" in refused(adapter_file, tmp_path / "a.txt").message
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"0" * 2048)
    assert adapter_file(big, max_bytes=4096) == big
    assert "over this server's limit" in refused(adapter_file, big, max_bytes=1024).message
    assert "does not exist" in refused(adapter_file, tmp_path / "none.safetensors").message
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_lora_weights.bin").write_bytes(b"x")
    assert "pickles" in refused(adapter_file, pickles).message
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert adapter_file(folder) == folder / "pytorch_lora_weights.safetensors"


# ---- shapes and merge maths ----


def test_read_factors_names_the_first_key_at_fault():
    import torch

    from omni_trt.lora.registry import read_factors

    shapes = {"l.to_q.weight": (8, 6), "l.to_k.weight": (8, 6)}
    good = {"transformer.l.to_q.lora_A.weight": torch.zeros(2, 6), "transformer.l.to_q.lora_B.weight": torch.zeros(8, 2)}
    layers = read_factors("x", good, {"transformer.r": 2, "transformer.lora_alpha": 4}, None, shapes)
    assert list(layers) == ["l.to_q.weight"] and layers["l.to_q.weight"].scaling == 2.0
    bad = {**good, "transformer.l.to_k.lora_A.weight": torch.zeros(2, 5), "transformer.l.to_k.lora_B.weight": torch.zeros(8, 2)}
    assert "'transformer.l.to_k.lora_A.weight'" in refused(read_factors, "x", bad, None, None, shapes).message
    unknown = {**good, "transformer.l.to_v.lora_A.weight": torch.zeros(2, 6), "transformer.l.to_v.lora_B.weight": torch.zeros(8, 2)}
    assert "to_v.lora_A" in refused(read_factors, "x", unknown, None, None, shapes).message
    text = {**good, "text_encoder.q.lora_A.weight": torch.zeros(2, 6)}
    assert "no LoRA weights" in refused(read_factors, "x", {"x": torch.zeros(2)}, None, None, shapes).message
    assert "outside the transformer" in refused(read_factors, "x", text, None, None, shapes).message
    assert "no LoRA weights" in refused(read_factors, "x", {}, None, None, shapes).message


def test_merged_weight_is_w_plus_scaled_b_a():
    import torch

    from omni_trt.lora.merge import merged_weight

    g = torch.Generator().manual_seed(0)
    w, a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((8, 6), (2, 6), (8, 2), (3, 6), (8, 3)))
    got = merged_weight(w, [(0.5, a1, b1, 2.0), (-1.0, a2, b2, 1.0)])
    torch.testing.assert_close(got, w + 0.5 * 2.0 * b1 @ a1 - b2 @ a2)
    assert torch.equal(merged_weight(w, []), w) and got is not w


def test_registry_merge_matches_peft_fuse(tiny_dir, tmp_path):
    """The registry's factors and scaling (read through diffusers' loader) merged by lora.merge
    equal PEFT's own fused weights for the same adapters and scales (fp32, same ops: to rounding)."""
    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.demo.lora import make_adapter
    from omni_trt.lora import Registry
    from omni_trt.lora.merge import merged_weights

    pipe = DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32)
    a = make_adapter(DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32), tmp_path / "a", seed=1, rank=4, alpha=8)
    b = make_adapter(DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32), tmp_path / "b", seed=2, rank=2, alpha=2,
                     targets=("to_q", "w1"))
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    reg = Registry(type(pipe), {n: tuple(p.shape) for n, p in base.items()}, tmp_path)
    reg.load("a", "a")
    reg.load("b", "b")
    ours = merged_weights((("a", 0.7), ("b", -1.5)), reg.get, base.__getitem__)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, -1.5])
    pipe.fuse_lora(adapter_names=["a", "b"])
    fused = {n.replace("base_layer.", ""): p for n, p in pipe.transformer.named_parameters()}
    assert set(ours) == {n for n in fused if n in base and not torch.equal(fused[n], base[n])}
    for name, w in ours.items():
        torch.testing.assert_close(w, fused[name], rtol=1e-6, atol=1e-6)  # fp32 epsilon-scale: one rounding per op
    assert reg.get("a").card() == {"rank": 4, "target_layers": 16} and reg.get("b").card() == {"rank": 2, "target_layers": 8}


def kohya_copy(peft_file, out, only: str = "layers."):
    """A kohya-style file (lora_unet_ names, lora_down/lora_up, alpha) of a PEFT adapter's `only` layers,
    as community trainers write them: diffusers' Z-Image converter reads these."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(peft_file))
    out_sd = {}
    for key, a in sd.items():
        if ".lora_A." not in key or not key.startswith(f"transformer.{only}"):
            continue
        module = key[len("transformer."):].split(".lora_A.")[0]
        name = "lora_unet_" + module.replace(".", "_")
        out_sd[f"{name}.lora_down.weight"] = a
        out_sd[f"{name}.lora_up.weight"] = sd[key.replace(".lora_A.", ".lora_B.")]
        out_sd[f"{name}.alpha"] = torch.tensor(float(2 * a.shape[0]))  # make_adapter's alpha: 2 x rank
    save_file(out_sd, str(out))
    return out


def test_a_kohya_file_reads_as_the_same_adapter(tiny_dir, tmp_path):
    """diffusers' converter (through the family pipeline's lora_state_dict) turns kohya names and
    alphas into PEFT keys; the registry's deltas (scaling x B @ A) equal the PEFT file's."""
    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.demo.lora import make_adapter
    from omni_trt.lora import Registry

    pipe = DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32)
    reg = Registry(type(pipe), {n: tuple(p.shape) for n, p in pipe.transformer.named_parameters()}, tmp_path)  # before PEFT wraps layers
    peft = make_adapter(pipe, tmp_path / "peft", seed=3, rank=4, alpha=8)
    kohya_copy(peft / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors")
    ours, theirs = reg.load("peft", "peft"), reg.load("kohya", "kohya.safetensors")
    assert theirs.layers and set(theirs.layers) == {k for k in ours.layers if k.startswith("layers.")}
    for name, f in theirs.layers.items():
        g = ours.layers[name]
        torch.testing.assert_close(f.scaling * f.b @ f.a, g.scaling * g.b @ g.a, rtol=1e-5, atol=1e-6)  # fp32: alpha folded in differently
