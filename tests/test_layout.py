"""The layout's promises: arrows point one way (server -> runtime -> enginedir <- compiler, models
at the bottom, the demo builders off to the side), no import circle, small functions and server
modules a newcomer can read, and the HTTP API documents every response and error in /openapi.json.

The import rules are read off the source (ast), so they hold for every module, also the ones no
test imports; the subprocess checks below prove the same of what really gets loaded."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omni_trt"

MAX_FUNCTION_LINES = 80  # a def's end_lineno - lineno + 1, decorators not counted
MAX_PARAMETERS = 10  # self and cls not counted
MAX_SERVER_MODULE_LINES = 400
# The model definitions (omni_trt/models/) follow diffusers' own code, function for function,
# so they are left out of the size rules.
SIZE_RULES_SKIP = ("omni_trt.models",)

# (importer, imported): the imports of the demo builders allowed outside demo/ itself, and why.
# Each must stay inside a function: the module that holds it must load without omni_trt.demo.
DEMO_ALLOWED = {
    ("omni_trt.runtime.loader", "omni_trt.demo"): "the demo-model fallback: `omni serve` without a model serves the embedded "
                                                  "demo model (the trained pipeline shipped as package data)",
    ("omni_trt.compiler.command", "omni_trt.demo"): "`omni build-engine` without a model (or with the demo's served name) "
                                                    "builds the embedded demo model's engines",
}
# Where the command line may import the demo builders at module level or lazily: it is the top.
DEMO_IMPORTERS = ("omni_trt.cli", "omni_trt.__main__")

# Layer -> the layers it must never import (everything may import models and the top-level
# helpers: errors, dtypes, files, hub, logs, ort).
FORBIDDEN = {
    "models": {"compiler", "runtime", "server", "demo", "enginedir"},
    "enginedir": {"runtime", "server", "compiler"},
    "runtime": {"server", "compiler"},
    "compiler": {"server", "runtime"},
    "server": {"compiler"},
}
ENTRY_POINTS = ("omni_trt.cli", "omni_trt.bench", "omni_trt.__main__")  # imported by nothing inside the layers


# ---- reading the source ----


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_of(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    path = _modules()[module]
    return ast.parse(path.read_text(), filename=str(path))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


ON_IMPORT, IN_FUNCTION, TYPING = "on import", "in a function", "TYPE_CHECKING"


@dataclass(frozen=True)
class Import:
    target: str  # an omni_trt module (a file of the package)
    line: int
    when: str  # ON_IMPORT: runs when the importer is imported; IN_FUNCTION: when that function runs; TYPING: never


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The omni_trt modules an import statement names: `from pkg import name` is pkg.name when
    that is a module, else pkg."""
    known = _modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        package = module if _modules()[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if not base.startswith("omni_trt"):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.append(sub)
        elif base in known:
            out.append(base)
    return sorted(set(out))


@lru_cache(maxsize=None)
def _imports(module: str) -> tuple[Import, ...]:
    return _imports_in(module, _tree(module))


def _imports_in(module: str, tree: ast.Module) -> tuple[Import, ...]:
    found: list[Import] = []

    def visit(node: ast.AST, when: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(t, child.lineno, when) for t in _targets(module, child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, TYPING if when == TYPING else IN_FUNCTION)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(ast.Module(body=child.body, type_ignores=[]), TYPING)
                visit(ast.Module(body=child.orelse, type_ignores=[]), when)
            else:  # a class body, try/if/with: runs when its surroundings do
                visit(child, when)

    visit(tree, ON_IMPORT)
    return tuple(found)


def _layer(module: str) -> str | None:
    """The subpackage a module belongs to (models, runtime, server, ...); None for the top-level
    modules (cli, bench, errors, hub, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def _where(module: str, line: int) -> str:
    return f"{_modules()[module].relative_to(PACKAGE.parent)}:{line}"


# ---- imports ----


def test_the_import_reader_sees_every_kind_of_import():
    """The rules below are only as good as this reader: relative, absolute, `from . import x`,
    lazy and TYPE_CHECKING imports, checked on modules whose imports are known."""
    assert len(_modules()) > 40 and "omni_trt.server.scheduler" in _modules() and "omni_trt.models" in _modules()
    loader = {i.target: i for i in _imports("omni_trt.runtime.loader")}
    assert "omni_trt.errors" in loader and loader["omni_trt.errors"].when == ON_IMPORT
    models = {i.target for i in _imports("omni_trt.models") if i.when == ON_IMPORT}
    assert {"omni_trt.errors", "omni_trt.hub", "omni_trt.models.base", "omni_trt.models.sizes", "omni_trt.models.flux"} <= models
    assert any(i.when == IN_FUNCTION for m in _modules() for i in _imports(m)), "no function-level import found: the reader misses them"
    fake = ast.parse("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .request import A\n"
                     "else:\n    from . import engines\nclass C:\n    from .. import errors\ndef f():\n    import omni_trt.hub\n"
                     "    from ..models import sizes, parse_size\n")
    got = sorted((i.target, i.when) for i in _imports_in("omni_trt.runtime.loader", fake))
    assert got == [("omni_trt.errors", ON_IMPORT), ("omni_trt.hub", IN_FUNCTION), ("omni_trt.models", IN_FUNCTION),
                   ("omni_trt.models.sizes", IN_FUNCTION), ("omni_trt.runtime.engines", ON_IMPORT), ("omni_trt.runtime.request", TYPING)]
    assert _layer("omni_trt.server.scheduler") == "server" and _layer("omni_trt.models") == "models"
    assert _layer("omni_trt.cli") is None and _layer("omni_trt") is None


def _cycle() -> list[str] | None:
    """One circle of imports that run (on import or in a function), if there is any (depth-first search)."""
    graph = {m: sorted({i.target for i in _imports(m) if i.when != TYPING and i.target != m}) for m in _modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    """No two modules need each other: imports that run, on import or inside a function (a lazy
    import that only dodges the circle at load time is still one: runtime/pipeline.py imported
    runtime/edits.py in a function while edits imported pipeline), form no circle; only
    TYPE_CHECKING imports are left out. Each module can be read after the ones it imports."""
    circle = _cycle()
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle(monkeypatch):
    fake = {"omni_trt.a": (Import("omni_trt.b", 1, ON_IMPORT),), "omni_trt.b": (Import("omni_trt.c", 1, ON_IMPORT),),
            "omni_trt.c": (Import("omni_trt.a", 1, IN_FUNCTION),)}
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: dict.fromkeys(fake))
    monkeypatch.setattr(sys.modules[__name__], "_imports", lambda m: fake[m])
    assert _cycle() == ["omni_trt.a", "omni_trt.b", "omni_trt.c", "omni_trt.a"]  # a lazy import closes it too
    fake["omni_trt.c"] = (Import("omni_trt.a", 1, TYPING),)  # for annotations only: no circle
    assert _cycle() is None


def _against_the_layers() -> list[str]:
    wrong = []
    for module in _modules():
        layer = _layer(module)
        for imp in _imports(module):
            target = _layer(imp.target)
            if layer is not None and target in FORBIDDEN.get(layer, ()):
                wrong.append(f"{_where(module, imp.line)}: {layer} imports {imp.target}")
            if layer is not None and imp.target in ENTRY_POINTS:
                wrong.append(f"{_where(module, imp.line)}: {layer} imports the entry point {imp.target}")
            if target == "demo" and layer != "demo" and module not in DEMO_IMPORTERS:
                allowed = (module, "omni_trt.demo") in DEMO_ALLOWED or (module, imp.target) in DEMO_ALLOWED
                if not allowed:
                    wrong.append(f"{_where(module, imp.line)}: {module} imports the demo builders ({imp.target})")
                elif imp.when == ON_IMPORT:
                    wrong.append(f"{_where(module, imp.line)}: {module} imports the demo builders on import; only lazily "
                                 f"(in the function that needs them): {DEMO_ALLOWED.get((module, 'omni_trt.demo'))}")
    return wrong


def test_no_upward_import():
    """Every import, lazy ones included: server -> runtime -> enginedir <- compiler, everything ->
    models (and the top-level helpers), models -> nothing of ours above it; the demo builders are
    imported only by the command line and the one fallback in DEMO_ALLOWED (lazily)."""
    wrong = _against_the_layers()
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_layer_check_catches_each_kind(monkeypatch):
    fake = {
        "omni_trt.models.base": (Import("omni_trt.runtime.request", 3, IN_FUNCTION), Import("omni_trt.errors", 4, ON_IMPORT)),
        "omni_trt.enginedir.layout": (Import("omni_trt.runtime.engines", 5, TYPING),),
        "omni_trt.runtime.loader": (Import("omni_trt.demo", 6, ON_IMPORT), Import("omni_trt.models", 7, ON_IMPORT)),
        "omni_trt.server.routes": (Import("omni_trt.cli", 8, IN_FUNCTION), Import("omni_trt.runtime.pipeline", 9, ON_IMPORT)),
        "omni_trt.compiler.plan": (Import("omni_trt.enginedir", 10, ON_IMPORT), Import("omni_trt.demo.flux", 11, IN_FUNCTION)),
        "omni_trt.cli": (Import("omni_trt.demo", 12, ON_IMPORT), Import("omni_trt.server.app", 13, IN_FUNCTION)),
    }
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: {m: PACKAGE / (m.split(".", 1)[1].replace(".", "/") + ".py") for m in fake})
    monkeypatch.setattr(sys.modules[__name__], "_imports", lambda m: fake[m])
    got = [w.split(": ", 1)[1] for w in _against_the_layers()]
    assert got == [
        "models imports omni_trt.runtime.request",
        "enginedir imports omni_trt.runtime.engines",  # for annotations only, still upward
        "omni_trt.runtime.loader imports the demo builders on import; only lazily (in the function that needs them): "
        + DEMO_ALLOWED[("omni_trt.runtime.loader", "omni_trt.demo")],
        "server imports the entry point omni_trt.cli",
        "omni_trt.compiler.plan imports the demo builders (omni_trt.demo.flux)",
    ], got


def test_every_allowed_demo_import_is_still_there():
    """An allow-list entry nobody needs any more is removed, not kept as a standing exception."""
    for (module, target), reason in DEMO_ALLOWED.items():
        assert reason
        found = module in _modules() and any(i.target.startswith(target) for i in _imports(module))
        assert found, f"{module} does not import {target}: DEMO_ALLOWED lists only imports that exist"


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


# ---- sizes ----


def _functions(module: str):
    for node in ast.walk(_tree(module)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_no_function_over_80_lines_or_10_parameters():
    """Outside models/: a function a reader takes in at once (each def's own lines, nested defs
    included in their parent's), with at most 10 parameters (self/cls not counted; *args and
    **kwargs count one each)."""
    long, wide = [], []
    for module in _modules():
        if module.startswith(SIZE_RULES_SKIP):
            continue
        for fn in _functions(module):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{_where(module, fn.lineno)} {fn.name}: {lines} lines")
            params = _parameters(fn)
            if len(params) > MAX_PARAMETERS:
                wide.append(f"{_where(module, fn.lineno)} {fn.name}: {len(params)} parameters")
    report = ([f"functions over {MAX_FUNCTION_LINES} lines:", *long] if long else []) + \
             ([f"functions over {MAX_PARAMETERS} parameters:", *wide] if wide else [])
    assert not report, "\n".join(report)


def test_the_size_rules_count_what_they_say():
    fn = ast.parse("def f(self, a, /, b, *c, d, e=1, **f):\n    x = 1\n\n    return x\n").body[0]
    assert _parameters(fn) == ["a", "b", "d", "e", "c", "f"] and fn.end_lineno - fn.lineno + 1 == 4


def test_no_server_module_over_400_lines():
    """server/ (its subpackages too) is read by everyone who adds an endpoint or a field."""
    big = []
    for module, path in _modules().items():
        if module.startswith("omni_trt.server"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_SERVER_MODULE_LINES:
                big.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert not big, f"server modules over {MAX_SERVER_MODULE_LINES} lines:\n" + "\n".join(big)


# ---- the HTTP API's schema ----


def test_openapi_documents_every_response_and_error():
    from omni_trt.server.app import create_app
    from omni_trt.server.contract import ServerOptions
    from omni_trt.server.serving import ImageServing

    schema = create_app(ImageServing(ServerOptions(served_model_name="x"), lambda: None)).openapi()
    paths = schema["paths"]
    routes = {
        ("/v1/images/generations", "post"): {"200", "400", "401", "422", "429", "500", "503"},
        ("/v1/images/edits", "post"): {"200", "400", "401", "413", "422", "429", "500", "501", "503"},
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
    for path in ("/v1/images/generations", "/v1/images/edits"):
        ok = paths[path]["post"]["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith("ImagesResponse"), path
        assert "text/event-stream" in ok, path  # stream: true
    assert "multipart/form-data" in paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    for body in ("ImageGenerationBody", "ImageEditForm", "ChatBody"):
        undocumented = [k for k, v in schemas[body]["properties"].items() if not v.get("description")]
        assert not undocumented, (body, undocumented)
    # The chat's image parameters are validated inside the route (they may sit in extra_body).
    from omni_trt.server.protocol import ChatImageParams

    assert not [k for k, f in ChatImageParams.model_fields.items() if not f.description]
