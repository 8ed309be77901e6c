"""Admission: the queue's front door and everything that decides a request's fate after its body
was understood. Ready or not, queued all or nothing (429 with a Retry-After from the recent batch
time), waited for until done, the client gone or the deadline passed (then cancelled: dropped
while queued, stopped at the next step while running), and the drain at shutdown. The local
server and each Ray replica run this same code."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled, OmniError
from ..runtime.pipeline import STAGES, BatchResult, PipelineRuntime
from ..runtime.request import GenerationRequest
from .contract import DRAINING, Caller, ServerOptions
from .metrics import Metrics
from .protocol import DenoiseSteps, ImageUsage, InputTokensDetails
from .scheduler import Job, QueueFull, Scheduler

log = logging.getLogger(__name__)

CLIENT_LEFT = "the client disconnected"


def internal_error(request_id: str) -> OmniError:
    """What a client sees of a server fault: no exception types, no messages; the log has them."""
    return OmniError(f"internal error (request {request_id}); the server log has the details", status=500)


@dataclass(frozen=True)
class Deadline:
    """When a request's answer is due (monotonic seconds) and the server limit that set it."""

    at: float
    limit_s: float

    def passed(self) -> Cancelled | None:
        if time.monotonic() <= self.at:
            return None
        return Cancelled(f"the request took longer than this server's limit of {self.limit_s:g} s; "
                         "ask for less (fewer images or steps, a smaller size) or retry later", status=504)


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check and is queued: one job per input image (an edit of k
    images is k jobs of n images each; a generation is one), with its prompt tokens."""

    requests: list[GenerationRequest]
    jobs: list[Job]
    prompt_tokens: int
    image_tokens: int
    arrived: float
    show_steps: bool = False  # a step cache runs: responses say the steps computed and reused

    @property
    def request(self) -> GenerationRequest:
        return self.requests[0]

    @property
    def images(self) -> int:
        return sum(r.n for r in self.requests)

    def usage(self, images: int | None = None) -> ImageUsage:
        out = self.image_tokens * (self.images if images is None else images)
        return ImageUsage(input_tokens=self.prompt_tokens, input_tokens_details=InputTokensDetails(text_tokens=self.prompt_tokens),
                          output_tokens=out, total_tokens=self.prompt_tokens + out)

    def describe(self) -> dict[str, Any]:
        r = self.request
        out: dict[str, Any] = {"size": r.size, "quality": r.quality, "background": "opaque", "output_format": r.output_format}
        steps = self.jobs[0].steps if self.jobs else None
        if self.show_steps and steps is not None:
            out["denoise_steps"] = DenoiseSteps(computed=steps[0], reused=steps[1])
        return out


class Admission:
    """The scheduler of one runtime (once started) and the rules around it."""

    def __init__(self, options: ServerOptions, metrics: Metrics) -> None:
        self.options = options
        self.metrics = metrics
        self.scheduler: Scheduler | None = None
        self.draining: str | None = None  # why new work is refused, once shutdown began
        self.batch_seconds_ema: float | None = None

    def start(self, runtime: PipelineRuntime) -> None:
        # One cap for both: batching stops there, and a larger request runs in chunks of it
        # (a 10-image request is never one 10-image call that could run out of memory).
        cap = runtime.max_batch(self.options.max_batch_size)
        scheduler = Scheduler(lambda reqs, stop, preview: runtime.generate(reqs, cap, stop, preview), self.options.max_queue, cap,
                              self._on_batch)
        scheduler.start()
        self.scheduler = scheduler

    def stop(self) -> None:
        if self.scheduler:
            self.scheduler.stop()

    # ---- taking work ----

    def submit(self, requests: list[GenerationRequest], stream: bool) -> list[Job]:
        """Queue every part of a request, or none of them."""
        scheduler = self.scheduler
        assert scheduler is not None, "submit before start"
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(scheduler.submit(r, stream=stream))
        except OmniError as e:
            for job in jobs:
                scheduler.cancel(job, Cancelled("a later part of the request was refused", status=e.status))
            if isinstance(e, QueueFull):
                e.headers = {"Retry-After": str(self.retry_after())}
            raise
        self.metrics.queue_depth.set(scheduler.depth())
        return jobs

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the recent batch time."""
        per_batch = self.batch_seconds_ema or 1.0
        depth = self.scheduler.depth() if self.scheduler else 0
        return max(1, min(120, math.ceil(per_batch * depth / max(1, self.options.max_batch_size))))

    # ---- waiting ----

    def deadline(self, a: Admitted) -> Deadline:
        return Deadline(a.arrived + self.options.request_timeout_s, self.options.request_timeout_s)

    async def wait(self, a: Admitted, caller: Caller) -> list[Any]:
        """The jobs' images in order. A client that leaves, or a deadline that passes, cancels
        what is left; so does a part that fails (its error is the answer)."""
        images: list[Any] = []
        deadline = self.deadline(a)
        gone = asyncio.ensure_future(caller.gone())
        try:
            for job in a.jobs:
                while not job.future.done():
                    left = deadline.at - time.monotonic()
                    await asyncio.wait({job.future, gone}, timeout=max(0.01, left), return_when=asyncio.FIRST_COMPLETED)
                    if job.future.done():
                        break
                    if gone.done():
                        raise Cancelled(CLIENT_LEFT, status=499)
                    reason = deadline.passed()
                    if reason is not None:
                        raise reason
                images += self.result(job)
        except asyncio.CancelledError:  # the caller gave up on us (a Ray call whose client left)
            self.abandon(a, Cancelled(CLIENT_LEFT, status=499))
            raise
        except Cancelled as reason:
            self.abandon(a, reason)
            raise
        except OmniError:
            self.abandon(a, Cancelled("another part of the request failed", status=500))
            raise
        finally:
            gone.cancel()
        return images

    def result(self, job: Job) -> list[Any]:
        """A settled job's images, or its error as what the client may see."""
        outcome = job.future.result()
        if outcome.error is None:
            return outcome.images
        if isinstance(outcome.error, OmniError):  # the request's own fault, a deadline, a shutdown
            raise outcome.error
        # A fault, logged with its traceback by the worker. Answered here rather than by the
        # catch-all handler: Starlette re-raises after that one responds, and uvicorn then
        # closes the connection under the client.
        raise internal_error(job.request.request_id)

    def abandon(self, a: Admitted, reason: Cancelled) -> None:
        """Cancel every unfinished part of a request; counted by why and where it was."""
        scheduler = self.scheduler
        for job, req in zip(a.jobs, a.requests):
            if job.future.done() or scheduler is None:
                continue
            queued = scheduler.cancel(job, reason)
            where = "queued" if queued else "running"
            self.metrics.cancelled.labels(reason="disconnect" if reason.status == 499 else "deadline", where=where).inc()
            if queued and reason.status == 499:
                self.metrics.dropped.inc()
            log.info("request %s cancelled while %s: %s", req.request_id, where, reason)

    # ---- shutdown ----

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new work (503), let the backlog finish for up to `timeout` seconds, then answer
        what is left with 503 in the error shape."""
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        self.draining = DRAINING
        scheduler = self.scheduler
        if scheduler is None:
            return
        scheduler.close(DRAINING)
        deadline = time.monotonic() + timeout
        while not scheduler.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = scheduler.refuse_backlog(Cancelled(DRAINING, status=503, headers={"Retry-After": "5"}))
        if left:
            log.warning("drain timeout (%.0f s): %d request(s) answered 503", timeout, left)

    def _on_batch(self, jobs: list[Job], result: BatchResult | None, started: float) -> None:
        m = self.metrics
        for job in jobs:
            m.queue_wait.observe(started - job.enqueued)
        if result is None:
            return
        for stage in (*STAGES, "total"):
            if stage in result.stages:
                m.stage.labels(stage=stage).observe(result.stages[stage])
        m.images.inc(sum(j.request.n for j in jobs if not j.cancelled))
        for n in result.calls:
            m.batch_images.observe(n)
        if result.lora_switch is not None:
            m.lora_switches.inc()
            m.lora_switch_seconds.observe(result.lora_switch)
        for name, _ in jobs[0].request.lora:  # one adapter set per batch
            m.lora_requests.labels(adapter=name).inc(len(jobs))
        for job in jobs:  # one plan per batch: every request ran the same steps
            for outcome, n in zip(("computed", "reused"), result.steps):
                m.denoise_steps.labels(outcome=outcome, route=job.request.route or "other").inc(n)
        for outcome, n in zip(("hit", "miss"), result.prompt_cache):
            m.prompt_cache.labels(result=outcome).inc(n)
        total = result.stages.get("total", 0.0)
        self.batch_seconds_ema = total if self.batch_seconds_ema is None else 0.8 * self.batch_seconds_ema + 0.2 * total
