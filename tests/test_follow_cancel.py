"""A job's cancellation is never lost while its prompt's frames arrive.

Python 3.11's ``asyncio.wait_for`` returns the inner result instead of raising when the task is cancelled in the
moment the inner future has just completed (CPython gh-86296, fixed in 3.12), so a job cancelled while progress
frames stream in could run on to its end. The follower waits with ``asyncio.timeout``, which counts
cancellations. This test cancels at every point of the loop's schedule after a frame arrives, so the window
is hit on every run, not by chance.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from comfy_worker.runtime.attempt import Attempt
from comfy_worker.runtime.follow import Follower, Progress

FRAME = {"type": "progress", "data": {"value": 1, "max": 10, "prompt_id": "p"}}


class _SilentEvents:
    connected = True  # the socket is up: the follower waits for frames, not /history


async def _cancel_after(ticks: int) -> str:
    """Start following, deliver one frame, let the loop run ``ticks`` times, cancel; how the follow ended."""
    frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    tracker = Progress({"1": {"class_type": "KSampler"}}, lambda _: None, 0.0)
    follower = Follower(client=None, events=_SilentEvents(), supervisor=None)  # type: ignore[arg-type]
    clock = Attempt("job", started=time.monotonic(), folder="jobs/x", timeout_s=600)
    task = asyncio.create_task(follower.follow("p", frames, tracker, clock))
    for _ in range(3):
        await asyncio.sleep(0)  # the follower is waiting for a frame
    frames.put_nowait(FRAME)
    for _ in range(ticks):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), 5)
    except asyncio.CancelledError:
        return "cancelled"
    except TimeoutError:
        task.cancel()  # the follow swallowed the cancellation and waits on: end it for good
        with pytest.raises(asyncio.CancelledError):
            await task
        return "still following"
    return "returned"


@pytest.mark.parametrize("ticks", range(8))
def test_a_cancellation_as_a_frame_arrives_ends_the_follow(ticks: int) -> None:
    assert asyncio.run(_cancel_after(ticks)) == "cancelled"
