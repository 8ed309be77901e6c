"""The scheduler on its own, with the tiny Z-Image runtime: what a job's future settles to when its
client leaves while it runs in a batch with others."""

from __future__ import annotations

import asyncio
import threading

from omni_trt.errors import Cancelled
from omni_trt.runtime.request import ImageAsk, resolve
from omni_trt.server.scheduler import Scheduler
from serving import counting_steps

STEPS = 3


def test_a_job_cancelled_while_its_batch_runs_is_settled_with_its_cancellation_not_its_images(runtime):
    """Two requests share one pipeline call. The client of one leaves while it runs; the other is
    still waited for, so the batch runs to its end (every step) and makes both images. The one
    whose client left gets its cancellation and no images (nothing to encode); the other its image."""
    entered, go = threading.Event(), threading.Event()
    stopped: list = []  # what should_stop said after the batch's last step

    def run_batch(requests, should_stop, on_preview):
        entered.set()
        assert go.wait(60), "the test never let the batch go on"
        result = runtime.generate(requests, 4, should_stop, on_preview)
        stopped.append(should_stop())
        return result

    async def scenario():
        scheduler = Scheduler(run_batch, max_queue=8, max_batch_images=4)
        left = resolve(runtime.family, ImageAsk("a fox whose client leaves", size="64x64", steps=STEPS, seed=1), request_id="left")
        stays = resolve(runtime.family, ImageAsk("a fox still waited for", size="64x64", steps=STEPS, seed=2), request_id="stays")
        assert left.batch_key() == stays.batch_key()
        gone, waited = scheduler.submit(left), scheduler.submit(stays)
        scheduler.start()  # both queued before the worker looks: one batch of two
        try:
            assert await asyncio.to_thread(entered.wait, 60), "the worker never ran the batch"
            assert scheduler.in_flight == 2
            reason = Cancelled("the client disconnected", status=499)
            assert scheduler.cancel(gone, reason) is False  # not queued any more: running
            go.set()
            outcomes = await asyncio.wait_for(asyncio.gather(gone.future, waited.future), 120)
        finally:
            go.set()
            await asyncio.to_thread(scheduler.stop)
        return reason, outcomes

    with counting_steps(runtime) as steps:
        reason, (cancelled, done) = asyncio.run(scenario())
    assert len(steps) == STEPS and stopped == [None], "one request was still waited for: the batch must run to its end"
    assert cancelled.error is reason, cancelled
    assert cancelled.images is None, "a job whose client left must not hand back images to encode"
    assert done.error is None and len(done.images) == 1 and done.images[0].size == (64, 64)
