"""Merging replicas' Prometheus text into one /metrics (the Ray app's), a pure function."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from omni_trt.server.metrics import Metrics, merge_replica_metrics, own_metrics


def replica_text(images: int, cancelled: int, waits: list[float]) -> str:
    m = Metrics()
    m.images.inc(images)
    m.requests.labels(route="/v1/images/generations", status="200").inc(7)  # an ingress series
    m.cancelled.labels(reason="disconnect", where="running").inc(cancelled)
    for w in waits:
        m.queue_wait.observe(w)
    return m.render().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_each_replica_is_labelled_and_all_is_their_sum():
    got = samples(merge_replica_metrics({"a": replica_text(3, 1, [0.02, 3.0]), "b": replica_text(5, 2, [0.02])}))
    for replica, want in (("a", 3), ("b", 5), ("all", 8)):
        assert got[("omni_images_generated_total", (("replica", replica),))] == want
    key = ("omni_requests_cancelled_total", (("reason", "disconnect"), ("replica", "all"), ("where", "running")))
    assert got[key] == 3  # a replica's family whose name starts like the ingress's own
    assert got[("omni_queue_wait_seconds_count", (("replica", "all"),))] == 3
    assert got[("omni_queue_wait_seconds_bucket", (("le", "0.025"), ("replica", "all")))] == 2
    assert got[("omni_queue_wait_seconds_bucket", (("le", "5.0"), ("replica", "all")))] == 3
    # HTTP counters are the ingress's: a replica's (empty under Ray) would count requests twice.
    assert not any(name == "omni_requests_total" for name, _ in got)


def test_the_ingress_renders_only_its_http_counters():
    m = Metrics()
    m.requests.labels(route="/v1/images/edits", status="200").inc()
    m.images.inc(4)
    got = samples(own_metrics(m).decode())
    assert got == {("omni_requests_total", (("route", "/v1/images/edits"), ("status", "200"))): 1.0}


def test_no_replicas_no_text():
    assert merge_replica_metrics({}) == ""
