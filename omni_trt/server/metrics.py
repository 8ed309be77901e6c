"""Prometheus metrics, in a registry per app so tests can run several servers in one process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # *_created series double the output and say nothing useful here

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
KNOWN_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omni_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_depth = Gauge("omni_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_wait = Histogram("omni_queue_wait_seconds", "Time from enqueue to batch start", buckets=STAGE_BUCKETS, registry=r)
        self.stage = Histogram("omni_stage_seconds", "Time per stage of a batch", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.batch_images = Histogram("omni_batch_images", "Images per pipeline call", buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.images = Counter("omni_images_generated", "Images generated", registry=r)
        self.dropped = Counter("omni_requests_dropped", "Queued requests dropped because the client left", registry=r)
        self.cancelled = Counter("omni_requests_cancelled", "Requests abandoned before their answer, by reason (disconnect, "
                                 "deadline) and where they were (queued, running)", ["reason", "where"], registry=r)
        # LoRA: a switch is an adapter-set change between batches (set_adapters, a session swap or a refit).
        self.lora_switches = Counter("omni_lora_switches", "Adapter-set changes between batches", registry=r)
        self.lora_switch_seconds = Histogram("omni_lora_switch_seconds", "Time per adapter-set change", buckets=STAGE_BUCKETS, registry=r)
        self.lora_requests = Counter("omni_lora_requests", "Requests run with a LoRA adapter, by adapter", ["adapter"], registry=r)
        # The step cache: each request's denoising steps, computed (the transformer ran) or reused (its last output).
        self.denoise_steps = Counter("omni_denoise_steps", "Denoising steps of requests, computed or reused (step cache), by route",
                                     ["outcome", "route"], registry=r)
        self.prompt_cache = Counter("omni_prompt_cache", "Text-encoder calls answered by the prompt cache (hit) or run (miss)",
                                    ["result"], registry=r)

    def observe_request(self, path: str, status: int) -> None:
        self.requests.labels(route=path if path in KNOWN_ROUTES else "other", status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from routes)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status[0])


# Series only the ingress has (HTTP), left out of what the replicas report.
INGRESS_ONLY = frozenset({"omni_requests"})  # by exact name: omni_requests_cancelled is a replica's


def own_metrics(metrics: Metrics) -> bytes:
    """An ingress's own series: its HTTP counters (the rest of its registry stays empty)."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class Only:
        def collect(self):
            return [f for f in metrics.registry.collect() if f.name in INGRESS_ONLY]

    registry = CollectorRegistry()
    registry.register(Only())
    return generate_latest(registry)


def merge_replica_metrics(replicas: dict[str, str]) -> str:
    """Prometheus text of several replicas as one: each sample with a `replica` label, and the
    sum over replicas with replica="all" (counters, gauges and histogram parts all add up)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple, float], list[tuple[str, dict[str, str], float]]]] = {}
    for replica, text in sorted(replicas.items()):
        for fam in text_string_to_metric_families(text):
            if fam.name in INGRESS_ONLY:
                continue
            _, _, totals, samples = families.setdefault(fam.name, (fam.type, fam.documentation, {}, []))
            for s in fam.samples:
                samples.append((s.name, {**s.labels, "replica": replica}, s.value))
                key = (s.name, tuple(sorted(s.labels.items())))
                totals[key] = totals.get(key, 0.0) + s.value
    lines = []
    for name, (kind, doc, totals, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for sample, labels, value in samples:
            lines.append(_sample(sample, labels, value))
        for (sample, labels), value in totals.items():
            lines.append(_sample(sample, {**dict(labels), "replica": "all"}, value))
    return "\n".join(lines) + ("\n" if lines else "")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value!r}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
