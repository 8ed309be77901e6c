"""A bounded queue and one worker thread that batches compatible requests.

One worker because one GPU: the pipeline is not re-entrant, and batching compatible requests
into one call is where the throughput comes from, not concurrency.

A job's future always gets an Outcome (never an exception set on it), so a job nobody waits for
any more leaves no "exception was never retrieved" behind. A batch that fails is run again job by
job, so only the request at fault gets the error. A job can be cancelled at any time: still
queued, it is dropped; running, the pipeline stops at its next step once every job of the batch is
cancelled, and otherwise its images are dropped when the batch ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Cancelled, OmniError
from ..runtime.pipeline import BatchResult
from ..runtime.request import GenerationRequest

log = logging.getLogger(__name__)

# run_batch(requests, should_stop, on_preview): see PipelineRuntime.generate.
RunBatch = Callable[[list[GenerationRequest], Callable[[], Cancelled | None], Callable[[int, int, int, Any], None]], BatchResult]


class QueueFull(OmniError):
    status = 429


class ShuttingDown(OmniError):
    status = 503


@dataclass(frozen=True)
class Outcome:
    """What a job's future resolves to: its images, or the error for this job alone."""

    images: list[Any] | None = None
    error: BaseException | None = None


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: Cancelled | None = None  # why it was abandoned, once it is
    previews: asyncio.Queue | None = None  # (image index, partial index, PIL image), for streams
    steps: tuple[int, int] | None = None  # denoising steps (computed, reused), once run
    _sent: set = field(default_factory=set)  # a batch retried per request makes its previews again

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass

    def preview(self, image: int, partial: int, picture: Any) -> None:
        if self.previews is not None and not self.cancelled and (image, partial) not in self._sent:
            self._sent.add((image, partial))
            self._soon(self.previews.put_nowait, (image, partial, picture))

    def settle(self, outcome: Outcome) -> None:
        def settle() -> None:
            if not self.future.done():
                self.future.set_result(outcome)

        self._soon(settle)


class Scheduler:
    """submit() from the event loop; the worker thread runs `run_batch` on groups of jobs with
    the same batch key, up to `max_batch_images` images per call."""

    def __init__(
        self,
        run_batch: RunBatch,
        max_queue: int,
        max_batch_images: int,
        on_batch: Callable[[list[Job], BatchResult | None, float], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_queue = max_queue
        self.max_batch_images = max_batch_images
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._closed: str | None = None  # why submit() refuses (draining), None while open
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._worker, name="omni-worker", daemon=True)

    @property
    def in_flight(self) -> int:
        """Requests in the batch the worker is running now."""
        return len(self._running)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """The worker thread runs (a health check's question)."""
        return self._thread.is_alive()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def submit(self, request: GenerationRequest, stream: bool = False) -> Job:
        """Queue a request; stream: its partial images go to job.previews as they are made."""
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future(), previews=asyncio.Queue() if stream else None)
        with self._cond:
            if self._closed or self._stopped:
                raise ShuttingDown(self._closed or "server is shutting down", headers={"Retry-After": "5"})
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: Cancelled) -> bool:
        """Abandon a job: dropped if still queued (True), else stopped or dropped where it runs."""
        with self._cond:
            job.cancelled = job.cancelled or reason
            if job in self._queue:
                self._queue.remove(job)
                job.settle(Outcome(error=reason))
                return True
        return False

    def close(self, reason: str) -> None:
        """Take no new jobs (draining); queued and running ones go on."""
        with self._cond:
            self._closed = reason

    def refuse_backlog(self, reason: Cancelled) -> int:
        """Answer every queued job with `reason` and cancel the running ones; how many."""
        with self._cond:
            jobs = list(self._queue) + list(self._running)
            self._queue.clear()
        for job in jobs:
            self.cancel(job, reason)
            job.settle(Outcome(error=reason))
        return len(jobs)

    def stop(self, timeout: float = 30) -> None:
        self.refuse_backlog(Cancelled("server is shutting down", status=503))
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

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
                self._running = batch
            started = time.perf_counter()
            try:
                self._run(batch, started)
            finally:
                with self._cond:
                    self._running = []

    def _run(self, batch: list[Job], started: float) -> None:
        def should_stop() -> Cancelled | None:
            # Stop only when nobody in the batch is waiting any more.
            reasons = [j.cancelled for j in batch]
            return reasons[0] if all(reasons) else None

        def on_preview(index: int, image: int, partial: int, picture: Any) -> None:
            batch[index].preview(image, partial, picture)

        try:
            result = self.run_batch([j.request for j in batch], should_stop, on_preview)
        except Cancelled as e:
            log.info("batch of %d request(s) stopped: %s", len(batch), e)
            for job in batch:
                job.settle(Outcome(error=job.cancelled or e))
            if self.on_batch:
                self.on_batch(batch, None, started)
            return
        except Exception as e:  # noqa: BLE001 - a fault in one batch must not stop the worker
            if len(batch) > 1:
                # One request's input may be what failed: run each alone, so only it fails.
                log.warning("batch of %d request(s) failed (%s: %s); running them one by one", len(batch), type(e).__name__, e)
                for job in batch:
                    self._run([job], time.perf_counter())
                return
            job = batch[0]
            log.error("request %s failed", job.request.request_id, exc_info=e)
            job.settle(Outcome(error=e))
            if self.on_batch:
                self.on_batch(batch, None, started)
            return
        for job, images in zip(batch, result.images):
            if job.cancelled:
                job.settle(Outcome(error=job.cancelled))  # its images are dropped
            else:
                job.steps = result.steps
                job.settle(Outcome(images))
        if self.on_batch:
            self.on_batch(batch, result, started)
