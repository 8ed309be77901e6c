"""The model replica: one runtime and its admission, serving the contract's calls that the Ray
client forwards; and the hub the replicas push their metrics to."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ...errors import OmniError
from ...runtime.pipeline import LoadOptions
from ..contract import REQUEST_CALLS, STREAM_CALLS, Answer, Caller, ServerOptions
from ..serving import ImageServing


def multiplexed(max_num_models_per_replica: int) -> Any:
    """serve.multiplexed, imported when Ray is (this module is imported without Ray too)."""
    def wrap(fn: Any) -> Any:
        try:
            from ray import serve
        except ModuleNotFoundError:
            return fn
        return serve.multiplexed(max_num_models_per_replica=max_num_models_per_replica)(fn)
    return wrap

REPLICA_HEADER = "X-Omni-Replica"
MULTIPLEXED_SETS = 4  # adapter sets a replica is routed as holding (Ray Serve's LRU of model ids)
HUB = "omni-metrics"  # the named actor replicas push their metrics to
PUSH_EVERY_S = 1.0
STALE_AFTER_S = 10.0  # a replica silent this long (dead, or replaced) drops out of /metrics


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to load and serve (picklable: it travels to every replica).
    model and engine_dir as given: each replica resolves them where it runs (on a cluster the
    engine dir is a volume of the replicas' pods, which the head that builds the app may lack)."""

    model: str | None
    engine_dir: str | None = None
    runtime: str = "auto"
    load: LoadOptions = field(default_factory=LoadOptions)
    options: ServerOptions = field(default_factory=lambda: ServerOptions(served_model_name="omni-trt"))
    threads: int | None = None  # torch threads per replica (CPU replicas share the machine's cores)


@dataclass
class Refused:
    """A refusal a replica made (4xx, 429, 504 ...), returned rather than raised: Ray Serve logs
    every exception out of a replica method as a failed request, traceback and all, and a
    client's mistake is not the replica's."""

    error: BaseException


def answered() -> tuple[type[BaseException], ...]:
    """What the app's exception handlers turn into responses."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    return (OmniError, RequestValidationError, HTTPException)


class MetricsHub:
    """The replicas' latest Prometheus text, by replica (a Ray actor)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.latest[replica] = (time.time(), text)

    def collect(self) -> dict[str, str]:
        now = time.time()
        return {r: text for r, (t, text) in self.latest.items() if now - t < STALE_AFTER_S}


def start_metrics_hub() -> None:
    """The replicas push their metrics to it; it lives as long as the app (a restarted ingress
    finds the same one)."""
    import ray

    ray.remote(MetricsHub).options(name=HUB, namespace="serve", get_if_exists=True, lifetime="detached", num_cpus=0).remote()


class ModelReplica:
    """One runtime and its scheduler, loaded when Ray starts the replica (a replica that cannot
    load fails, and Ray says so)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        from ...runtime.loader import load_runtime, resolve_model

        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.serving = ImageServing(spec.options, lambda: load_runtime(resolve_model(spec.model, spec.engine_dir), runtime=spec.runtime,
                                                                       options=spec.load))
        self.serving.load()
        if self.serving.load_error:
            raise RuntimeError(f"the model failed to load: {self.serving.load_error}")
        self._pushing = threading.Thread(target=self._push_metrics, name="omni-metrics-push", daemon=True)
        self._pushing.start()

    def _push_metrics(self) -> None:
        import ray

        hub = None
        while True:
            try:
                hub = hub or ray.get_actor(HUB, namespace="serve")
                hub.push.remote(self.replica, self.serving.metrics.render().decode())
            except Exception:  # noqa: BLE001 - the hub may not be up yet, or be restarting
                hub = None
            time.sleep(PUSH_EVERY_S)

    async def health(self) -> Any:
        return await self.serving.health()

    async def models(self) -> Any:
        return await self.serving.models()

    async def call(self, method: str, request_id: str | None, *args: Any) -> Answer | Refused:
        """One of the contract's request calls (REQUEST_CALLS), as the local server answers it.
        A client that leaves reaches the replica as a Ray cancellation of this call."""
        await self._hold_adapters()
        try:
            out, headers = await self._serving_call(method, REQUEST_CALLS)(Caller(request_id), *args)
        except answered() as e:
            return Refused(e)
        return out, {**headers, REPLICA_HEADER: self.replica}

    async def stream(self, method: str, request_id: str | None, *args: Any) -> AsyncIterator[Any]:
        """One of the streamed calls (STREAM_CALLS): admission first (a refusal is the only item),
        then the headers, then the SSE text as the local server makes it."""
        await self._hold_adapters()
        try:
            events, headers = await self._serving_call(method, STREAM_CALLS)(Caller(request_id), *args)
        except answered() as e:
            yield Refused(e)
            return
        yield {**headers, REPLICA_HEADER: self.replica}
        async for event in events:
            yield event

    async def _hold_adapters(self) -> None:
        """Tell Ray Serve's router this replica now holds the request's adapter set (the client's
        multiplexed model id), so later requests with that set come here where it is free. The
        adapters themselves are already loaded (--lora-modules) or load on first use; the runtime
        switches between batches."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._adapter_set(model_id)

    @multiplexed(max_num_models_per_replica=MULTIPLEXED_SETS)
    async def _adapter_set(self, model_id: str) -> str:
        return model_id

    def _serving_call(self, method: str, allowed: tuple[str, ...]) -> Any:
        if method not in allowed:  # only what the contract lists travels over the handle
            raise ValueError(f"{method} is not one of the serving contract's calls {allowed}")
        return getattr(self.serving, method)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose worker died is replaced."""
        scheduler = self.serving.scheduler
        if scheduler is None or not scheduler.alive():
            raise RuntimeError("the replica's worker thread is not running")
