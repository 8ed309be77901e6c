"""The model replicas' Ray Serve options, a pure function (no cluster needed)."""

from __future__ import annotations

import pytest

from omni_trt.errors import UsageError
from omni_trt.server.contract import ServerOptions
from omni_trt.server.ray.deploy import replica_options

OPTIONS = ServerOptions(served_model_name="m", max_queue=6, max_batch_size=2, drain_timeout_s=12)


def test_fixed_replicas_one_gpu_each_with_their_queues():
    o = replica_options(OPTIONS, replicas=3, gpus_per_replica=1.0)
    assert o["num_replicas"] == 3 and "autoscaling_config" not in o
    assert o["ray_actor_options"]["num_gpus"] == 1.0 and "num_cpus" not in o["ray_actor_options"]
    assert o["max_ongoing_requests"] == 6 + 2  # a replica's own queue and a batch
    assert o["max_queued_requests"] == 6 * 3
    assert o["graceful_shutdown_timeout_s"] == 12


def test_one_cpu_each_without_cuda():
    assert replica_options(OPTIONS, replicas=2)["ray_actor_options"]["num_cpus"] == 1


def test_autoscaling_on_ongoing_requests():
    o = replica_options(OPTIONS, replicas=1, min_replicas=1, max_replicas=8)
    assert "num_replicas" not in o
    assert o["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "initial_replicas": 1, "target_ongoing_requests": 2}
    assert o["max_queued_requests"] == 6 * 8  # as deep as the most replicas' queues
    assert replica_options(OPTIONS, replicas=1, max_replicas=4)["autoscaling_config"]["min_replicas"] == 1


def test_min_above_max_is_refused_naming_the_flag():
    with pytest.raises(UsageError, match="--min-replicas 5 is more than --max-replicas 2"):
        replica_options(OPTIONS, replicas=5, min_replicas=5, max_replicas=2)
