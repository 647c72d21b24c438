"""A service's tasks: stop cleanly on the signal, and never die silently."""

from __future__ import annotations

import asyncio

import pytest

from shared.runtime import run_until_stopped


async def _until(stop: asyncio.Event) -> str:
    await stop.wait()
    return "stopped"


async def test_returns_when_stopped():
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_until(stop)) for _ in range(3)]
    asyncio.get_running_loop().call_later(0.01, stop.set)
    await run_until_stopped(stop, tasks)
    assert all(t.result() == "stopped" for t in tasks)


async def test_a_failing_task_stops_the_others_and_raises():
    stop = asyncio.Event()

    async def boom():
        raise ValueError("worker died")

    healthy = asyncio.create_task(_until(stop))
    with pytest.raises(ValueError, match="worker died"):
        await run_until_stopped(stop, [healthy, asyncio.create_task(boom())])
    assert stop.is_set() and healthy.result() == "stopped"


async def test_a_task_ending_early_is_an_error():
    stop = asyncio.Event()

    async def quits():
        return None

    with pytest.raises(RuntimeError, match="ended before the stop signal"):
        await run_until_stopped(stop, [asyncio.create_task(quits(), name="quitter")])
