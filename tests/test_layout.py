"""The layout's promises: arrows point one way (a server needs no compiler code), and the HTTP
API documents every response and error in /openapi.json."""

from __future__ import annotations

import json
import subprocess
import sys

from omni_trt.server.app import ServerOptions, create_app


def _imported_by(*modules: str) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print(__import__('json').dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {m for m in json.loads(r.stdout) if m.startswith("omni_trt")}


def test_serving_imports_neither_the_compiler_nor_the_demo_builders():
    loaded = _imported_by("omni_trt.server.app", "omni_trt.runtime.loader")
    assert "omni_trt.enginedir" in loaded and "omni_trt.runtime.engines" in loaded
    assert not {m for m in loaded if m.startswith(("omni_trt.compiler", "omni_trt.demo"))}, loaded


def test_models_are_the_bottom_layer():
    loaded = _imported_by("omni_trt.models")
    assert not {m for m in loaded if m.startswith(("omni_trt.compiler", "omni_trt.runtime", "omni_trt.server", "omni_trt.demo", "omni_trt.enginedir"))}, loaded


def test_openapi_documents_every_response_and_error():
    schema = create_app(ServerOptions(served_model_name="x"), lambda: None).openapi()
    paths = schema["paths"]
    routes = {
        ("/v1/images/generations", "post"): {"200", "400", "401", "422", "429", "500", "503"},
        ("/v1/chat/completions", "post"): {"200", "400", "401", "422", "429", "500", "503"},
        ("/v1/models", "get"): {"200", "401"},
        ("/health", "get"): {"200", "503"},
    }
    for (path, method), statuses in routes.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            want = "ErrorResponse" if status != "200" else None
            assert ref.startswith("#/components/schemas/") and (want is None or ref.endswith(want)), (path, status, ref)
    schemas = schema["components"]["schemas"]
    assert paths["/v1/images/generations"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ImagesResponse")
    for body in ("ImageGenerationBody", "ChatBody"):
        undocumented = [k for k, v in schemas[body]["properties"].items() if not v.get("description")]
        assert not undocumented, (body, undocumented)
    # The chat's image parameters are validated inside the route (they may sit in extra_body).
    from omni_trt.server.protocol import ChatImageParams

    assert not [k for k, f in ChatImageParams.model_fields.items() if not f.description]
