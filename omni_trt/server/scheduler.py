"""A bounded queue and one worker thread that batches compatible requests.

One worker because one GPU: the pipeline is not re-entrant, and batching compatible requests
into one call is where the throughput comes from, not concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import OmniError
from ..runtime.pipeline import BatchResult
from ..runtime.request import GenerationRequest

log = logging.getLogger(__name__)


class QueueFull(OmniError):
    status = 429


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


@dataclass
class JobResult:
    images: list[Any]
    stages: dict[str, float]
    queue_wait: float
    batch_images: int


class Scheduler:
    """submit() from the event loop; the worker thread runs `run_batch` on groups of jobs with
    the same batch key, up to `max_batch_images` images per call."""

    def __init__(
        self,
        run_batch: Callable[[list[GenerationRequest]], BatchResult],
        max_queue: int = 64,
        max_batch_images: int = 4,
        on_batch: Callable[[list[Job], BatchResult | None, float], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_queue = max_queue
        self.max_batch_images = max_batch_images
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.in_flight = 0  # requests in the batch the worker is running now
        self._thread = threading.Thread(target=self._worker, name="omni-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.resolve(error=RuntimeError("server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def depth(self) -> int:
        with self._cond:
            return sum(not j.cancelled for j in self._queue)

    def submit(self, request: GenerationRequest) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future())
        with self._cond:
            if self._stopped:
                raise RuntimeError("server is shutting down")
            if sum(not j.cancelled for j in self._queue) >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started; True if it was still queued."""
        with self._cond:
            if job in self._queue:
                job.cancelled = True
                self._queue.remove(job)
                return True
        return False

    def _take_batch(self) -> list[Job]:
        """First waiting job, plus later jobs with its key while the images fit."""
        first = self._queue.popleft()
        batch, images = [first], first.request.n
        key = first.request.batch_key()
        for job in list(self._queue):
            if images >= self.max_batch_images:
                break
            if job.request.batch_key() == key and images + job.request.n <= self.max_batch_images:
                self._queue.remove(job)
                batch.append(job)
                images += job.request.n
        return batch

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                batch = self._take_batch()
                self.in_flight = len(batch)
            started = time.perf_counter()
            try:
                result = self.run_batch([j.request for j in batch])
            except Exception as e:  # a fault in one batch must not stop the worker
                self.in_flight = 0
                log.exception("batch of %d request(s) failed", len(batch))
                for job in batch:
                    job.resolve(error=e)
                if self.on_batch:
                    self.on_batch(batch, None, started)
                continue
            self.in_flight = 0
            n_images = sum(j.request.n for j in batch)
            for job, images in zip(batch, result.images):
                job.resolve(JobResult(images, result.stages, started - job.enqueued, n_images))
            if self.on_batch:
                self.on_batch(batch, result, started)
