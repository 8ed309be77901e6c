"""`omni serve --replicas N`: the same HTTP API on Ray Serve, one model replica per GPU.

Two deployments:
- `ModelReplica` (N of them, or autoscaled): each loads one runtime (engines included) and runs
  the single-process server's own ImageServing over it (bounded queue, batching scheduler,
  validation, streaming, cancellation), without HTTP.
- `Ingress` (one): the very FastAPI app of `omni serve` (routes, protocol, guard, error shapes,
  playground) over a RemoteServing, which hands each request to a replica through a Ray Serve
  handle. A client that leaves cancels its Ray request, which cancels the replica's work; a
  replica that dies under a request answers 503; a replica whose queue is full answers 429, and
  so does Ray's own queue in front of the replicas once it is full.

Metrics: each replica pushes its Prometheus text to a small named actor (`omni-metrics`); the
ingress's /metrics shows its own HTTP counters, every replica's series with a `replica` label,
and their sums with `replica="all"`. Ray Serve's own metrics (ray_serve_*) are on Ray's metrics
port as usual.

Only imported with --replicas: without it, Ray is never imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..errors import Cancelled, OmniError, UsageError
from ..runtime.pipeline import LoadOptions
from .metrics import Metrics, merge_replica_metrics, own_metrics
from .serving import ImageServing, ServerOptions, client_gone, internal_error

log = logging.getLogger(__name__)

APP_NAME = "omni"
REPLICA_HEADER = "X-Omni-Replica"
HUB = "omni-metrics"  # the named actor replicas push their metrics to
PUSH_EVERY_S = 1.0
STALE_AFTER_S = 10.0  # a replica silent this long (dead, or replaced) drops out of /metrics


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to load and serve (picklable: it travels to every replica)."""

    model: str | None
    engine_dir: str | None = None
    runtime: str = "auto"
    load: LoadOptions = field(default_factory=LoadOptions)
    options: ServerOptions = field(default_factory=lambda: ServerOptions(served_model_name="omni-trt"))
    threads: int | None = None  # torch threads per replica (CPU replicas share the machine's cores)


class RemoteRequest:
    """What a replica knows of the HTTP request: the id Ray Serve's proxy gave it (so the
    replica's logs and errors name the id the client sees). A client that leaves reaches the
    replica as a Ray cancellation, not through this."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id

    async def is_disconnected(self) -> bool:
        return False


@dataclass
class Refused:
    """A refusal a replica made (4xx, 429, 504 ...), returned rather than raised: Ray Serve logs
    every exception out of a replica method as a failed request, traceback and all, and a
    client's mistake is not the replica's."""

    error: BaseException


def _answered() -> tuple[type[BaseException], ...]:
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


class ModelReplica:
    """One runtime and its scheduler. Its methods are what RemoteServing calls."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        from ..runtime.loader import load_runtime

        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        model = spec.model
        if model is None and spec.engine_dir is None:
            from ..demo import ensure_demo_model

            model = str(ensure_demo_model())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.serving = ImageServing(spec.options, lambda: None)
        self.serving.start(load_runtime(model, spec.engine_dir, spec.runtime, spec.load))
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

    async def _answer(self, call: Any) -> Any:
        try:
            out, headers = await call
        except _answered() as e:
            return Refused(e)
        return out, {**headers, REPLICA_HEADER: self.replica}

    async def _stream(self, call: Any) -> AsyncIterator[Any]:
        """Admission first (a refusal is the only item), then the headers, then the SSE text
        as ImageServing makes it."""
        try:
            events, headers = await call
        except _answered() as e:
            yield Refused(e)
            return
        yield {**headers, REPLICA_HEADER: self.replica}
        async for event in events:
            yield event

    async def health(self) -> Any:
        return await self.serving.health()

    async def list_models(self) -> Any:
        return await self.serving.list_models()

    async def create_images(self, body: Any, request_id: str | None = None) -> tuple[Any, dict[str, str]]:
        return await self._answer(self.serving.create_images(RemoteRequest(request_id), body))

    async def create_chat(self, body: Any, request_id: str | None = None) -> tuple[Any, dict[str, str]]:
        return await self._answer(self.serving.create_chat(RemoteRequest(request_id), body))

    async def create_edit(self, form: Any, files: list[tuple[str, bytes]], mask: bytes | None,
                          request_id: str | None = None) -> tuple[Any, dict[str, str]]:
        return await self._answer(self.serving.create_edit(RemoteRequest(request_id), form, files, mask))

    async def stream_images(self, body: Any, request_id: str | None = None) -> AsyncIterator[Any]:
        async for item in self._stream(self.serving.stream_images(RemoteRequest(request_id), body)):
            yield item

    async def stream_edit(self, form: Any, files: list[tuple[str, bytes]], mask: bytes | None,
                          request_id: str | None = None) -> AsyncIterator[Any]:
        async for item in self._stream(self.serving.stream_edit(RemoteRequest(request_id), form, files, mask)):
            yield item

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose worker died is replaced."""
        scheduler = self.serving.scheduler
        if scheduler is None or not scheduler._thread.is_alive():
            raise RuntimeError("the replica's worker thread is not running")


def _ray_request_id() -> str | None:
    """The id Ray Serve's proxy gave this request (and puts in the response's X-Request-Id)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - an older or newer Ray: the replica makes its own
        return None


def _drop_request_id(headers: dict[str, str]) -> dict[str, str]:
    """Ray Serve's proxy sets X-Request-Id itself (to the same id): one header, not two."""
    return {k: v for k, v in headers.items() if k.lower() != "x-request-id"}


def _unwrap(e: BaseException) -> BaseException:
    """What a replica raised, as the ingress should answer it."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    answered = _answered()
    cause = getattr(e, "cause", None)
    if isinstance(e, rex.RayTaskError) and isinstance(cause, answered):
        return cause  # a refusal (4xx, 429, 504 ...) made by the replica's ImageServing
    if isinstance(e, answered):
        return e
    if isinstance(e, BackPressureError):
        return OmniError("every replica is busy and Ray Serve's queue is full; retry later", status=429, headers={"Retry-After": "5"})
    if isinstance(e, RequestCancelledError):
        return Cancelled("the client disconnected", status=499)
    if isinstance(e, (rex.ActorDiedError, rex.RayActorError, rex.ActorUnavailableError, DeploymentUnavailableError)):
        return OmniError("the replica serving this request died or is restarting; retry (another replica takes it)",
                         status=503, headers={"Retry-After": "2"})
    log.error("replica call failed", exc_info=e)
    return internal_error("ray")


class RemoteServing:
    """ImageServing's interface for the routes, over a Ray Serve handle to the model replicas:
    it validates nothing itself, so every rule and message is the replicas' own.

    behind_proxy: the app runs as Ray Serve's ingress deployment (a cluster, KubeRay): Ray's
    proxy owns the connection, sets X-Request-Id and cancels a request whose client leaves.
    Otherwise it runs under `omni serve`'s own uvicorn (`--replicas` on one machine), which
    does those itself, one Ray hop from the replicas instead of three."""

    def __init__(self, options: ServerOptions, handle: Any, behind_proxy: bool) -> None:
        self.options = options
        self.handle = handle
        self.behind_proxy = behind_proxy
        self.metrics = Metrics()  # the HTTP counters; the replicas keep the rest
        self.draining: str | None = None
        self.runtime = handle  # what uvicorn's drain asks for: the runtimes are behind it
        self.ongoing = 0
        self._hub: Any = None

    # ---- what the app's lifespan and shutdown call ----

    def load_in_background(self) -> None:
        pass  # the replicas load their runtimes; Ray Serve routes only to ready ones

    def stop(self) -> None:
        pass

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new work (503) and let the requests under way finish, up to `timeout`;
        then Ray Serve's shutdown drains the replicas."""
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        self.draining = "the server is shutting down; retry on another replica or later"
        deadline = time.monotonic() + timeout
        while self.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- the routes' calls ----

    async def health(self) -> Any:
        return await self._call(None, "health")

    async def list_models(self) -> Any:
        return await self._call(None, "list_models")

    async def create_images(self, http_request: Any, body: Any) -> tuple[Any, dict[str, str]]:
        return await self._call(http_request, "create_images", body)

    async def create_chat(self, http_request: Any, body: Any) -> tuple[Any, dict[str, str]]:
        return await self._call(http_request, "create_chat", body)

    async def create_edit(self, http_request: Any, form: Any, files: list[tuple[str, bytes]], mask: bytes | None) -> tuple[Any, dict[str, str]]:
        return await self._call(http_request, "create_edit", form, files, mask)

    async def stream_images(self, http_request: Any, body: Any) -> tuple[AsyncIterator[str], dict[str, str]]:
        return await self._stream(http_request, "stream_images", body)

    async def stream_edit(self, http_request: Any, form: Any, files: list[tuple[str, bytes]], mask: bytes | None) -> tuple[AsyncIterator[str], dict[str, str]]:
        return await self._stream(http_request, "stream_edit", form, files, mask)

    async def render_metrics(self) -> bytes:
        import ray

        try:
            self._hub = self._hub or ray.get_actor(HUB, namespace="serve")
            replicas = await self._hub.collect.remote()
        except Exception:  # noqa: BLE001 - no hub (yet): the ingress's own series alone
            replicas = {}
        return own_metrics(self.metrics) + merge_replica_metrics(replicas).encode()

    # ---- calls to a replica ----

    # A client that leaves: behind Ray's proxy, the proxy cancels this request's task
    # (asyncio.CancelledError here; waiting on receive() would cost the proxy round trips).
    # Under uvicorn, its http.disconnect is awaited. Either way the replica's call is
    # cancelled, and its ImageServing drops the job.

    def _request_id(self) -> dict[str, Any]:
        return {"request_id": _ray_request_id()} if self.behind_proxy else {}  # else the replica makes one

    def _headers(self, headers: dict[str, str]) -> dict[str, str]:
        return _drop_request_id(headers) if self.behind_proxy else headers

    async def _until_done_or_gone(self, awaitable: Any, http_request: Any) -> Any:
        if self.behind_proxy or http_request is None:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(client_gone(http_request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise Cancelled("the client disconnected", status=499)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody reads it now

    async def _call(self, http_request: Any, method: str, *args: Any) -> Any:
        response = getattr(self.handle, method).remote(*args, **(self._request_id() if http_request is not None else {}))
        self.ongoing += 1
        try:
            out = await self._until_done_or_gone(response, http_request)
        except (asyncio.CancelledError, Cancelled):
            response.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - mapped to what the client sees
            raise _unwrap(e) from None
        finally:
            self.ongoing -= 1
        if isinstance(out, Refused):
            raise out.error
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out[0], self._headers(out[1])
        return out

    async def _stream(self, http_request: Any, method: str, *args: Any) -> tuple[AsyncIterator[str], dict[str, str]]:
        """The replica's admission answers before the stream starts (a refusal stays a JSON 4xx);
        then its events are relayed."""
        gen = getattr(self.handle.options(stream=True), method).remote(*args, **self._request_id())
        try:
            headers = await self._until_done_or_gone(gen.__anext__(), http_request)
        except (asyncio.CancelledError, Cancelled):
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            raise _unwrap(e) from None
        if isinstance(headers, Refused):
            raise headers.error
        return self._relay(gen, http_request), self._headers(headers)

    async def _relay(self, gen: Any, http_request: Any) -> AsyncIterator[str]:
        from .protocol import error_body
        from .serving import sse

        finished = False
        self.ongoing += 1
        try:
            while True:
                try:
                    event = await self._until_done_or_gone(gen.__anext__(), http_request)
                except StopAsyncIteration:
                    finished = True
                    return
                except Cancelled:  # the client left: the `finally` cancels the replica's stream
                    return
                except Exception as e:  # noqa: BLE001 - the replica died mid-stream: say so, in the error shape
                    finished = True
                    err = _unwrap(e)
                    if isinstance(err, OmniError) and err.status != 499:
                        yield sse("error", error_body(err.status, err.message))
                    return
                yield event
        finally:
            self.ongoing -= 1
            if not finished:
                gen.cancel()


def start_metrics_hub() -> None:
    """The replicas push their metrics to it; it lives as long as the app (a restarted
    ingress finds the same one)."""
    import ray

    ray.remote(MetricsHub).options(name=HUB, namespace="serve", get_if_exists=True, lifetime="detached", num_cpus=0).remote()


class Ingress:
    """The HTTP side: `omni serve`'s own app (routes, guard, errors, playground) over RemoteServing."""

    def __init__(self, model: Any, options: ServerOptions, api_key_env: str | None = None) -> None:
        if api_key_env:  # read where the ingress runs (a cluster's pods carry the secret), not where the app was built
            from dataclasses import replace

            options = replace(options, api_key=os.environ.get(api_key_env) or None)
        self.model, self.options = model, options
        start_metrics_hub()

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.options, None, serving=RemoteServing(self.options, self.model, behind_proxy=True))


# Our deployments' methods never block their event loop (a replica's pipeline runs on its
# scheduler's thread), so Ray Serve need not run them on a second loop in a thread of their own:
# that hop cost a replica ~90 ms a request here, and GIL time off the denoise loop.
SAME_LOOP = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


def replica_options(options: ServerOptions, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                    gpus_per_replica: float = 0.0) -> dict[str, Any]:
    """serve.deployment's options for the model replicas (pure)."""
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise UsageError(f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}", "--min-replicas")
    actor: dict[str, Any] = {"num_gpus": gpus_per_replica} if gpus_per_replica else {"num_cpus": 1}
    actor["runtime_env"] = SAME_LOOP
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max_replicas if max_replicas is not None else max(lo, replicas)
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, min(replicas, hi)),
                                          "target_ongoing_requests": max(1, options.max_batch_size)}}
    # A replica takes its own queue and batch (so its bounded queue and 429 hold); Ray's queue in
    # front of the replicas is bounded as well (as deep as all the replicas' queues: requests wait
    # there a moment while the router picks a replica), and answers 429 through the app once full.
    return {"ray_actor_options": actor, "max_ongoing_requests": options.max_queue + options.max_batch_size,
            "max_queued_requests": options.max_queue * max(replicas, max_replicas or 1),
            "graceful_shutdown_timeout_s": options.drain_timeout_s, "health_check_period_s": 5, **scaling}


def model_app(spec: ReplicaSpec, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              gpus_per_replica: float | None = None) -> Any:
    """The model replicas as a Ray Serve application. One GPU per replica where this machine
    has CUDA, else one CPU."""
    from ray import serve

    if gpus_per_replica is None:
        import torch

        gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    opts = replica_options(spec.options, replicas, min_replicas, max_replicas, gpus_per_replica)
    return serve.deployment(ModelReplica, name="ModelReplica", **opts).bind(spec)


def build_app(spec: ReplicaSpec, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              gpus_per_replica: float | None = None, api_key_env: str | None = None) -> Any:
    """The app for a Ray cluster's own HTTP proxy (deploy/kuberay's serveConfigV2 imports it
    through `app_builder`): the HTTP app as an ingress deployment over the model replicas."""
    from ray import serve

    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", ray_actor_options={"num_cpus": 0, "runtime_env": SAME_LOOP},
                               max_ongoing_requests=10_000)
    return ingress.bind(model_app(spec, replicas, min_replicas, max_replicas, gpus_per_replica), spec.options, api_key_env)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder for config files (deploy/kuberay/rayservice.yaml):
    args are `model`, `engine_dir`, `runtime`, `served_model_name`, `replicas`, `max_queue`,
    `max_batch_size`, `min_replicas`, `max_replicas`, `gpus_per_replica` (default 1: the app is
    built on the head, which need not have the GPUs the replicas get) and `api_key_env` (the
    variable holding the key)."""
    names = args.get("served_model_name") or args.get("model") or "omni-trt"
    options = ServerOptions(
        served_model_name=names if isinstance(names, str) else names[0],
        aliases=() if isinstance(names, str) else tuple(names[1:]),
        max_queue=int(args.get("max_queue", 64)),
        max_batch_size=int(args.get("max_batch_size", 4)),
    )
    spec = ReplicaSpec(model=args.get("model"), engine_dir=args.get("engine_dir"), runtime=args.get("runtime", "auto"), options=options)
    return build_app(spec, int(args.get("replicas", 1)), args.get("min_replicas"), args.get("max_replicas"),
                     gpus_per_replica=float(args.get("gpus_per_replica", 1)), api_key_env=args.get("api_key_env"))


def run(spec: ReplicaSpec, net: Any, replicas: int, min_replicas: int | None = None, max_replicas: int | None = None,
        address: str | None = None) -> int:
    """`omni serve --replicas`: start (or join) a Ray cluster, deploy the model replicas, and
    serve the HTTP app here under uvicorn (its limits, drain and request ids as without Ray),
    calling the replicas through a handle. On SIGINT/SIGTERM: the app drains (new requests
    503, those under way finish, up to --drain-timeout), then Ray Serve drains the replicas."""
    import ray
    from ray import serve

    from .app import create_app
    from .run import make_server

    replica_options(spec.options, replicas, min_replicas, max_replicas)  # bad flags are refused before a cluster starts
    t0 = time.perf_counter()
    ray.init(address=address, namespace="serve", include_dashboard=False, logging_level=logging.WARNING,
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, replicas + 1)}))
    try:
        serve.start(proxy_location="Disabled")  # the HTTP side is this process's
        start_metrics_hub()
        handle = serve.run(model_app(spec, replicas, min_replicas, max_replicas), name=APP_NAME, route_prefix=None)
        app = create_app(spec.options, None, serving=RemoteServing(spec.options, handle, behind_proxy=False))
        log.info("serving %s on http://%s:%d with %d replica(s) on Ray (started in %.1f s)", spec.options.served_model_name,
                 net.host, net.port, replicas, time.perf_counter() - t0)
        # uvicorn re-raises the signal that stopped it once it is down; SIGTERM's default action
        # would end this process there, before the replicas and the local cluster are shut down.
        signal.signal(signal.SIGTERM, _exit_143)
        make_server(app, net).run()
        return 0
    finally:
        log.info("shutting down: Ray Serve drains the replicas (up to %.0f s)", spec.options.drain_timeout_s)
        try:
            if address:
                serve.delete(APP_NAME)  # a shared cluster: only this app goes
            else:
                serve.shutdown()
        finally:
            ray.shutdown()


def _exit_143(*_: Any) -> None:
    raise SystemExit(128 + signal.SIGTERM)


__all__ = ["APP_NAME", "REPLICA_HEADER", "ReplicaSpec", "app_builder", "build_app", "model_app", "run"]
