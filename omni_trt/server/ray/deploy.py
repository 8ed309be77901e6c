"""The Ray Serve applications and `omni serve --replicas`'s launcher.

Two ways to serve: `run` (one machine, `omni serve --replicas N`) deploys the model replicas and
serves the HTTP app in this process under its own uvicorn, calling the replicas through a handle;
`build_app`/`app_builder` (a cluster's HTTP proxy, deploy/kuberay) put the same app in front of
the replicas as Ray's ingress deployment."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from ...errors import UsageError
from ..app import create_app
from ..contract import MAX_BATCH_SIZE, MAX_QUEUE, ServerOptions
from .client import RemoteServing, proxy_caller
from .replica import ModelReplica, ReplicaSpec, start_metrics_hub

log = logging.getLogger(__name__)

APP_NAME = "omni"
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


class Ingress:
    """The HTTP side on a cluster: `omni serve`'s own app (routes, guard, errors, playground) over
    RemoteServing, behind Ray's proxy."""

    def __init__(self, model: Any, options: ServerOptions, api_key_env: str | None = None) -> None:
        if api_key_env:  # read where the ingress runs (a cluster's pods carry the secret), not where the app was built
            options = replace(options, api_key=os.environ.get(api_key_env) or None)
        self.model, self.options = model, options
        start_metrics_hub()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(RemoteServing(self.options, self.model, behind_proxy=True), caller=proxy_caller)


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
        max_queue=int(args.get("max_queue", MAX_QUEUE)),
        max_batch_size=int(args.get("max_batch_size", MAX_BATCH_SIZE)),
    )
    spec = ReplicaSpec(model=args.get("model"), engine_dir=args.get("engine_dir"), runtime=args.get("runtime", "auto"), options=options)
    return build_app(spec, int(args.get("replicas", 1)), args.get("min_replicas"), args.get("max_replicas"),
                     gpus_per_replica=float(args.get("gpus_per_replica", 1)), api_key_env=args.get("api_key_env"))


def run(spec: ReplicaSpec, net: Any, replicas: int, min_replicas: int | None = None, max_replicas: int | None = None,
        address: str | None = None) -> int:
    """`omni serve --replicas`: serve the HTTP app here under uvicorn at once (its limits, drain
    and request ids as without Ray; 503 until a replica is ready), while a thread of its own
    starts (or joins) a Ray cluster and deploys the model replicas, called through a handle. On
    SIGINT/SIGTERM: the app drains (new requests 503, those under way finish, up to
    --drain-timeout), then Ray Serve drains the replicas."""
    from ..run import make_server

    replica_options(spec.options, replicas, min_replicas, max_replicas)  # bad flags are refused before a cluster starts
    deployed: Future = Future()
    stop = threading.Event()
    owner = threading.Thread(target=_hold_cluster, args=(spec, (replicas, min_replicas, max_replicas), address, deployed, stop),
                             name="omni-ray", daemon=True)
    owner.start()
    serving = RemoteServing(spec.options, connect=deployed.result)
    log.info("serving %s on http://%s:%d: 503 until %d replica(s) on Ray are ready", spec.options.served_model_name, net.host, net.port,
             replicas)
    # uvicorn re-raises the signal that stopped it once it is down; SIGTERM's default action
    # would end this process there, before the replicas and the local cluster are shut down.
    signal.signal(signal.SIGTERM, _exit_143)
    try:
        server = make_server(create_app(serving), net)
        server.run()
        return 1 if serving.load_error else server.exit_status()
    finally:
        stop.set()
        owner.join(timeout=spec.options.drain_timeout_s + 60)


def _hold_cluster(spec: ReplicaSpec, scale: tuple[int, int | None, int | None], address: str | None, deployed: Future,
                  stop: threading.Event) -> None:
    """Start (or join) the cluster and deploy the replicas (the handle goes to `deployed`), hold
    it until `stop`, then shut it down. One thread does all three: the local cluster's processes
    are killed when the thread that started them ends (Linux's parent-death signal), so it must
    not be a thread that returns while the server runs."""
    import ray
    from ray import serve

    replicas, min_replicas, max_replicas = scale
    t0 = time.perf_counter()
    try:
        ray.init(address=address, namespace="serve", include_dashboard=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": max(os.cpu_count() or 1, replicas + 1)}))
        serve.start(proxy_location="Disabled")  # the HTTP side is this process's
        start_metrics_hub()
        deployed.set_result(serve.run(model_app(spec, replicas, min_replicas, max_replicas), name=APP_NAME, route_prefix=None))
        log.info("%d replica(s) deployed on Ray (%.1f s)", replicas, time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - the app reports it (load_error) and stops
        deployed.set_exception(e)
    stop.wait()
    if not ray.is_initialized():
        return
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


__all__ = ["APP_NAME", "ReplicaSpec", "app_builder", "build_app", "model_app", "replica_options", "run"]
