"""The Ray client: the serving contract over a Ray Serve handle to the model replicas. It
validates nothing itself, so every rule and message is the replicas' own; the request calls it
forwards are read off the contract (REQUEST_CALLS, STREAM_CALLS), so a new endpoint cannot be
forgotten on this path."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Callable

from ...errors import Cancelled, OmniError
from ..admission import CLIENT_LEFT, internal_error
from ..contract import DRAINING, REQUEST_CALLS, STREAM_CALLS, Answer, Caller, ServerOptions, Stream, never
from ..metrics import Metrics, merge_replica_metrics, own_metrics
from ..protocol import HealthResponse, ModelList
from ..streaming import event_stream
from .replica import HUB, Refused, answered

log = logging.getLogger(__name__)

READY_POLL_S = 1.0


def unwrap(e: BaseException) -> BaseException:
    """What a replica call raised, as the app should answer it."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    cause = getattr(e, "cause", None)
    if isinstance(e, rex.RayTaskError) and isinstance(cause, answered()):
        return cause  # a refusal made by the replica's serving object
    if isinstance(e, answered()):
        return e
    if isinstance(e, BackPressureError):
        return OmniError("every replica is busy and Ray Serve's queue is full; retry later", status=429, headers={"Retry-After": "5"})
    if isinstance(e, RequestCancelledError):
        return Cancelled(CLIENT_LEFT, status=499)
    if isinstance(e, (rex.ActorDiedError, rex.RayActorError, rex.ActorUnavailableError, DeploymentUnavailableError)):
        return OmniError("the replica serving this request died or is restarting; retry (another replica takes it)",
                         status=503, headers={"Retry-After": "2"})
    log.error("replica call failed", exc_info=e)
    return internal_error("ray")


# A request with no adapters carries no model id: every replica holds the base model, and
# pinning base traffic to the replicas that last served it would leave the others idle (Ray
# routes a model id only to replicas holding it until they are full).
BASE_ID = ""


def routing_id(args: tuple[Any, ...], served: tuple[str, ...] = ()) -> str:
    """A request's adapter set, canonicalized (sorted by name, zero scales dropped), as Ray
    Serve's multiplexed model id, so it goes to a replica that already holds that set (pure).
    `model` naming something other than the served names may be an adapter (vLLM's convention):
    it joins the id. A `lora` the replica will refuse routes as the base model (BASE_ID)."""
    from ...lora.request import adapter_set, describe, parse_lora

    for a in args:
        if not hasattr(a, "lora"):
            continue
        try:
            names = describe(adapter_set(parse_lora(a.lora, max_per_request=1 << 16)))
        except Exception:  # noqa: BLE001 - the replica refuses it, with its own message
            return BASE_ID
        model = getattr(a, "model", None)
        if isinstance(model, str) and model and model not in served and model not in names.split(","):
            names = model if names == "none" else f"{names},{model}"
        return BASE_ID if names == "none" else names
    return BASE_ID


def proxy_caller(request: Any) -> Caller:
    """A request that came through Ray Serve's HTTP proxy: the proxy's request id (the one it
    puts in X-Request-Id), and no disconnect to await: the proxy cancels the request's task."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - an older or newer Ray: the replica makes its own
        request_id = None
    return Caller(request_id, never)


class RemoteServing:
    """The contract's Serving over `handle` (the ModelReplica deployment).

    behind_proxy: the app runs as Ray Serve's ingress deployment (a cluster, KubeRay), whose proxy
    sets X-Request-Id itself; otherwise it runs under `omni serve`'s own uvicorn, one Ray hop from
    the replicas instead of three."""

    def __init__(self, options: ServerOptions, handle: Any = None, behind_proxy: bool = False,
                 connect: Callable[[], Any] | None = None) -> None:
        self.options = options
        self.handle = handle
        self._connect = connect  # no handle yet: load() gets it (starts the cluster, deploys the replicas)
        self.behind_proxy = behind_proxy
        self.metrics = Metrics()  # the HTTP counters; the replicas keep the rest
        self.created = int(time.time())
        # multiplexed routing by adapter set; OMNI_RAY_ROUTE_BY_ADAPTERS=0 turns it off (benchmarks/ray_scale.py compares)
        self.route_by_adapters = os.environ.get("OMNI_RAY_ROUTE_BY_ADAPTERS", "1") != "0"
        self.draining: str | None = None
        self.load_error: str | None = None
        self.ongoing = 0
        self._ready = False
        self._open: set[Any] = set()  # replica calls under way, cancelled if the app stops first
        self._hub: Any = None

    @property
    def loaded(self) -> bool:
        return self._ready

    def load(self) -> None:
        """Connect if need be, then wait until a replica answers (Ray routes only to replicas that
        loaded their model). Until then every call is a 503, as while a single process loads."""
        if self.handle is None and self._connect is not None:
            try:
                self.handle = self._connect()
            except BaseException as e:  # noqa: BLE001 - reported to the operator; the server stops
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("the replicas could not be deployed: %s", self.load_error)
                return
        while not self._ready:
            try:
                self.handle.health.remote().result(timeout_s=30)
                self._ready = True
            except Exception as e:  # noqa: BLE001 - still starting; Ray replaces replicas that fail
                log.info("waiting for a replica: %s", type(e).__name__)
                time.sleep(READY_POLL_S)

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new work (503) and let the requests under way finish, up to `timeout`; then Ray
        Serve's shutdown drains the replicas."""
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        self.draining = DRAINING
        deadline = time.monotonic() + timeout
        while self.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for call in list(self._open):  # nobody will read them: the replicas drop the work
            call.cancel()

    def _check_ready(self) -> None:
        if not self._ready:
            why = f"the replicas failed to start: {self.load_error}" if self.load_error else "the replicas are starting"
            raise OmniError(f"Model not initialized ({why})", status=503, headers={"Retry-After": "5"})

    async def health(self) -> HealthResponse:
        self._check_ready()
        return await self._ask(self.handle.health.remote())

    async def models(self) -> ModelList:
        if not self._ready:  # as a loading single process answers: the card, not ready
            return ModelList.one(self.options.served_model_name, self.created, ready=False)
        return await self._ask(self.handle.models.remote())

    async def render_metrics(self) -> bytes:
        import ray

        try:
            self._hub = self._hub or ray.get_actor(HUB, namespace="serve")
            replicas = await self._hub.collect.remote()
        except Exception:  # noqa: BLE001 - no hub (yet): the app's own series alone
            replicas = {}
        return own_metrics(self.metrics) + merge_replica_metrics(replicas).encode()

    # ---- calls to a replica ----

    async def _ask(self, response: Any, caller: Caller = Caller()) -> Any:
        """A replica's answer; a client that leaves cancels the call, and the replica its work."""
        self.ongoing += 1
        self._open.add(response)
        try:
            out = await caller.race(response)
        except (asyncio.CancelledError, Cancelled):
            response.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - mapped to what the client sees
            raise unwrap(e) from None
        finally:
            self.ongoing -= 1
            self._open.discard(response)
        if isinstance(out, Refused):
            raise out.error
        return out

    async def _call(self, method: str, caller: Caller, *args: Any) -> Answer:
        self._check_ready()
        out, headers = await self._ask(self._routed(args).call.remote(method, caller.request_id, *args), caller)
        return out, self._headers(headers)

    async def _stream(self, method: str, caller: Caller, *args: Any) -> Stream:
        """The replica's admission answers before the stream starts (a refusal stays a JSON 4xx);
        then its events are relayed."""
        self._check_ready()
        gen = self._routed(args).options(stream=True).stream.remote(method, caller.request_id, *args)
        headers = await self._ask(_first(gen), caller)
        events = event_stream(self._relay(gen), caller, self.options.keepalive_s, lambda _: gen.cancel())
        return events, self._headers(headers)

    async def _relay(self, gen: Any) -> AsyncIterator[str]:
        self.ongoing += 1
        self._open.add(gen)
        try:
            while True:
                try:
                    event = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 - the replica died mid-stream: an error event says so
                    raise unwrap(e) from None
                yield event
        finally:
            self.ongoing -= 1
            self._open.discard(gen)

    def _routed(self, args: tuple[Any, ...]) -> Any:
        """The handle, asking Ray Serve for a replica that holds the request's adapter set."""
        if not self.route_by_adapters:
            return self.handle
        served = (self.options.served_model_name, *self.options.aliases)
        model_id = routing_id(args, served)
        return self.handle.options(multiplexed_model_id=model_id) if model_id else self.handle

    def _headers(self, headers: dict[str, str]) -> dict[str, str]:
        """Behind Ray's proxy, which sets X-Request-Id itself (to the same id): one header, not two."""
        return {k: v for k, v in headers.items() if k.lower() != "x-request-id"} if self.behind_proxy else headers


class _first:
    """Awaits a streaming response's first item (cancelling the awaitable cancels the stream)."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def __await__(self) -> Any:
        return self.gen.__anext__().__await__()

    def cancel(self) -> None:
        self.gen.cancel()


def _forward(method: str, streamed: bool) -> Callable[..., Any]:
    async def forward(self: RemoteServing, caller: Caller, *args: Any) -> Any:
        return await (self._stream if streamed else self._call)(method, caller, *args)

    forward.__name__ = forward.__qualname__ = method
    forward.__doc__ = f"The contract's {method}, answered by a replica."
    return forward


for _name in REQUEST_CALLS:
    setattr(RemoteServing, _name, _forward(_name, streamed=False))
for _name in STREAM_CALLS:
    setattr(RemoteServing, _name, _forward(_name, streamed=True))
