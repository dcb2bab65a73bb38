"""Several jobs in flight in one worker (JOB_CONCURRENCY), in-process against the stand-in ComfyUI: arrival
order, the clock that stops while a job waits behind others, cancelling a queued job, draining on low memory.
The same guarantees through the runpod SDK's production loop are in test_concurrency.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.execution import Lineup
from comfy_worker.runtime.job import Worker

from .test_job_flow import rebuilt, settings_for, sleep_graph
from .worker_process import close_worker, free_port


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    built = build_worker(settings_for(tmp_path_factory.mktemp("stream"), free_port(), JOB_CONCURRENCY="3"))
    assert built.startup_error is None, built.startup_error.to_dict()
    yield built
    close_worker(built)


def job(seconds: float, prefix: str, timeout: float | None = None) -> dict[str, Any]:
    # in steps, so an interrupt lands within a step (ComfyUI would be restarted at INTERRUPT_GRACE otherwise)
    steps = max(1, int(seconds * 20))
    return {"workflow": sleep_graph(seconds, prefix=prefix, steps=steps)} | ({"timeout": timeout} if timeout else {})


async def in_flight(worker: Worker, *inputs: dict[str, Any]) -> list[dict[str, Any]]:
    return await asyncio.gather(*(worker.run(f"job-{i}", raw, lambda _m: None) for i, raw in enumerate(inputs)))


def test_jobs_in_flight_run_in_arrival_order_and_wait_off_their_clock(worker: Worker) -> None:
    # ComfyUI runs one prompt at a time: the third job cannot end before 3 x 1 s of sleeping, twice its timeout
    # (each sleeps a little differently: ComfyUI would take the same node with the same inputs from its cache)
    results = asyncio.run(in_flight(worker, *(job(1.0 + i / 100, f"order{i}", timeout=1.5) for i in range(3))))
    assert [r.get("status") for r in results] == ["success"] * 3, [r.get("error") for r in results]
    queued = [r["timings"]["queued_s"] for r in results]
    assert queued[0] < queued[1] < queued[2], f"each waited for the ones before it: {queued}"
    assert results[2]["execution_time_seconds"] > 3.0, "twice its timeout: the wait behind the others did not count"
    for result in results:
        # its own run (about its 1 s sleep: frames reach the worker a little after ComfyUI starts), the wait left out
        assert 0.9 < result["timings"]["comfyui_s"] < 2.5, result["timings"]
    assert worker.client.queue() == {"queue_running": [], "queue_pending": []}


def test_cancelling_a_queued_job_removes_only_its_prompt(worker: Worker) -> None:
    async def scenario() -> tuple[dict[str, Any], set[str]]:
        running = asyncio.create_task(worker.run("running", job(3.0, "keep"), lambda _m: None))
        queued = asyncio.create_task(worker.run("queued", job(0.2, "drop"), lambda _m: None))
        deadline = time.monotonic() + 60
        while True:
            queue = await asyncio.to_thread(worker.client.queue)
            if queue["queue_running"] and queue["queue_pending"]:
                break
            assert time.monotonic() < deadline and not running.done(), f"both never got to ComfyUI: {queue}"
            await asyncio.sleep(0.05)
        dropped = queue["queue_pending"][0][1]
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        while dropped in {item[1] for item in (await asyncio.to_thread(worker.client.queue))["queue_pending"]}:
            assert time.monotonic() < deadline, "the cancelled job's prompt stayed queued"
            await asyncio.sleep(0.05)
        left = await asyncio.to_thread(worker.client.queue)
        still_running = {item[1] for item in left["queue_running"]}
        return await running, still_running

    result, still_running = asyncio.run(scenario())
    assert result.get("status") == "success", result.get("error")
    assert still_running == {result["prompt_id"]}, "the running prompt went on while the queued one left"


def test_low_memory_drains_the_worker_and_only_the_last_job_asks_for_a_fresh_one(worker: Worker) -> None:
    low = rebuilt(worker, dataclasses.replace(worker.settings, refresh_min_free_ram_gb=1e9))
    assert low.concurrency(1) == 3
    ended: list[str] = []

    async def one(name: str, seconds: float) -> dict[str, Any]:
        result = await low.run(name, job(seconds, name), lambda _m: None)
        ended.append(name)
        return result

    async def scenario() -> dict[str, dict[str, Any]]:
        results = await asyncio.gather(one("a", 0.3), one("b", 0.31), one("c", 0.32))
        return dict(zip("abc", results, strict=True))

    results = asyncio.run(scenario())
    assert all(r.get("status") == "success" for r in results.values()), results
    asking = [name for name, r in results.items() if r.get("refresh_worker")]
    assert asking == [ended[-1]], f"only the last to end asks ({ended}): {asking}"
    assert low.concurrency(3) == 0, "a draining worker takes no more jobs"


def test_an_error_result_of_the_last_job_carries_the_refresh_too(worker: Worker) -> None:
    low = rebuilt(worker, dataclasses.replace(worker.settings, refresh_min_free_ram_gb=1e9))
    fail = {"class_type": "StandinFail", "inputs": {"message": "no", "exception_type": "ValueError"}}
    failing = {"workflow": {"1": fail}}
    result = asyncio.run(low.run("alone", failing, lambda _m: None))
    assert json.loads(result["error"])["error_type"] == "comfyui_execution"
    assert result.get("refresh_worker") is True


def test_a_draining_worker_whose_last_job_is_cancelled_takes_jobs_again(worker: Worker, tmp_path: Path) -> None:
    low = rebuilt(worker, dataclasses.replace(worker.settings, refresh_min_free_ram_gb=1e9))

    async def scenario() -> dict[str, Any]:
        long = asyncio.create_task(low.run("long", job(5.0, "longest"), lambda _m: None))
        short = await low.run("short", job(0.1, "short"), lambda _m: None)
        assert low.concurrency(3) == 0, "the first to end found memory low"
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return short

    short = asyncio.run(scenario())
    assert "refresh_worker" not in short, "another job was still in flight"
    assert low.concurrency(3) == 3, "nobody could carry refresh_worker: the next job measures again"
    deadline = time.monotonic() + 60  # the cancelled prompt stops within INTERRUPT_GRACE
    while worker.client.queue()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_lineup_keeps_arrival_order_and_a_requeued_job_its_place() -> None:
    async def scenario() -> list[str]:
        lineup = Lineup()
        order: list[str] = []
        first, second, third = lineup.join(), lineup.join(), lineup.join()

        async def queue(name: str, place: int) -> None:
            await lineup.turn(place)
            order.append(name)
            lineup.leave(place)

        late = [asyncio.create_task(queue("third", third)), asyncio.create_task(queue("second", second))]
        await asyncio.sleep(0)
        assert order == [], "both wait for the first"
        await queue("first", first)
        await asyncio.gather(*late)
        lineup.rejoin(first)  # its prompt was lost before it ran: it goes ahead of a job that came later
        fourth = lineup.join()
        later = asyncio.create_task(queue("fourth", fourth))
        await queue("first again", first)
        await later
        return order

    assert asyncio.run(scenario()) == ["first", "second", "third", "first again", "fourth"]


def test_a_restart_for_changed_nodes_waits_for_the_jobs_in_flight_and_holds_new_ones(worker: Worker) -> None:
    restarts = worker.supervisor.restarts if worker.supervisor else 0

    async def scenario() -> list[dict[str, Any]]:
        first = asyncio.create_task(worker.run("first", job(1.5, "hup1"), lambda _m: None))
        second = asyncio.create_task(worker.run("second", job(0.5, "hup2"), lambda _m: None))
        deadline = time.monotonic() + 60
        while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:
            assert time.monotonic() < deadline, "the first job never ran"
            await asyncio.sleep(0.05)
        worker.request_restart()  # SIGHUP from apply_config.sh while two jobs are in flight
        third = asyncio.create_task(worker.run("third", job(0.2, "hup3"), lambda _m: None))
        return list(await asyncio.gather(first, second, third))

    results = asyncio.run(scenario())
    assert [r.get("status") for r in results] == ["success"] * 3, [r.get("error") for r in results]
    assert worker.supervisor is not None and worker.supervisor.restarts == restarts + 1
