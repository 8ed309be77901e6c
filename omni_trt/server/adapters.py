"""LoRA on the HTTP side: a request's `lora` field (and a `model` naming an adapter) -> the adapter
set its batch runs with; the adapters' model cards; and vLLM's load/unload routes, which answer
404 unless `omni serve --enable-lora-loading` (as vLLM's do without VLLM_ALLOW_RUNTIME_LORA_UPDATING).

Those two routes are off by default, so they are left out of /openapi.json (the README documents
them); every refusal is a 4xx naming `lora` (or `lora_name` / `lora_path` on the routes)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import OmniError, RequestError
from ..lora import AdapterSet, parse_lora, with_model
from ..lora.request import check_name, refuse

STRICT = ConfigDict(strict=True, extra="forbid")


def runtime_adapters(runtime: Any) -> Any:
    """The runtime's TorchAdapters, or None where it serves none."""
    return getattr(runtime, "adapters", None)


def adapter_names(runtime: Any) -> frozenset[str]:
    adapters = runtime_adapters(runtime)
    return adapters.registry.names() if adapters is not None else frozenset()


async def request_adapters(runtime: Any, raw: Any, model: str | None, pool: Executor) -> AdapterSet:
    """The adapter set a request asks for: its `lora` field plus `model` where that names an
    adapter. Paths are loaded (first use) off the event loop."""
    adapters = runtime_adapters(runtime)
    if adapters is None:
        if raw is not None and raw != [] and raw != "":
            raise refuse("this server serves no LoRA adapters (start it with --lora-modules NAME=PATH or --lora-dir DIR)")
        return ()
    refs = with_model(parse_lora(raw, adapters.max_per_request), model, adapters.registry.names())
    if len(refs) > adapters.max_per_request:
        raise refuse(f"lora and model name {len(refs)} adapters together; this server applies at most {adapters.max_per_request} per request")
    if any(r.path is not None for r in refs):
        return await asyncio.get_running_loop().run_in_executor(pool, adapters.registry.resolve, refs)
    return adapters.registry.resolve(refs)


def adapter_cards(runtime: Any, parent: str) -> list[dict[str, Any]]:
    """One /v1/models card per adapter: vLLM's id/parent/root, plus rank and layers; no path."""
    adapters = runtime_adapters(runtime)
    if adapters is None:
        return []
    out = []
    for a in adapters.registry.adapters():
        card = a.card()
        out.append({"id": a.name, "parent": parent, "root": parent, "lora_rank": card["rank"], "lora_target_layers": card["target_layers"]})
    return out


# ---- the load / unload routes ----


class LoadLoraBody(BaseModel):
    model_config = STRICT

    lora_name: str = Field(description="The name requests will use (`lora` or `model`).")
    lora_path: str = Field(description="A .safetensors file or a folder holding pytorch_lora_weights.safetensors, inside --lora-dir.")


class UnloadLoraBody(BaseModel):
    model_config = STRICT

    lora_name: str = Field(description="A loaded adapter's name.")
    lora_int_id: int | None = Field(None, description="vLLM's; accepted, not used.")


class LoraAdapterResponse(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    id: str
    parent: str
    lora_rank: int | None = None
    lora_target_layers: int | None = None
    deleted: bool = False


def _loading(request: Request) -> tuple[Any, Any]:
    """(serving, the runtime's adapters) where runtime loading is on; 404 otherwise, as if the
    route did not exist (vLLM's behaviour without runtime updating)."""
    serving = request.app.state.omni
    adapters = runtime_adapters(getattr(serving, "runtime", None))
    if adapters is None or not adapters.loading:
        raise OmniError("Not Found: adapter loading is off (omni serve --enable-lora-loading --lora-dir DIR turns it on)", status=404)
    return serving, adapters


def _named(e: RequestError, param: str) -> RequestError:
    e.param = param
    return e


router = APIRouter(prefix="/v1", include_in_schema=False)


@router.post("/load_lora_adapter", response_model=LoraAdapterResponse)
async def load_lora_adapter(body: LoadLoraBody, found: tuple[Any, Any] = Depends(_loading)) -> Any:
    serving, adapters = found
    try:
        name = check_name(body.lora_name, "lora_name")
    except RequestError as e:
        raise _named(e, "lora_name") from None
    loop = asyncio.get_running_loop()
    try:
        adapter = await loop.run_in_executor(serving.encode_pool, adapters.registry.load, name, body.lora_path)
    except RequestError as e:
        raise _named(e, "lora_path" if "already" not in e.message else "lora_name") from None
    card = adapter.card()
    return LoraAdapterResponse(id=name, parent=serving.options.served_model_name, lora_rank=card["rank"], lora_target_layers=card["target_layers"])


@router.post("/unload_lora_adapter", response_model=LoraAdapterResponse)
async def unload_lora_adapter(body: UnloadLoraBody, found: tuple[Any, Any] = Depends(_loading)) -> Any:
    serving, adapters = found
    try:
        adapters.registry.remove(body.lora_name)
    except RequestError as e:
        raise _named(e, "lora_name") from None
    return LoraAdapterResponse(id=body.lora_name, parent=serving.options.served_model_name, deleted=True)
