"""The bus against a real nats-server: the shared pull loop, and shutdown whatever the server does."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import uvloop

from shared import events as ev
from shared.bus import Bus, forwarder_consumer
from tests.fixtures.servers import make_stack

pytestmark = pytest.mark.integration


async def _connect(cfg) -> Bus:
    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(cfg.nats, "test-bus", once, identity="harness")  # writes arbitrary events
    await bus.ensure_streams()
    return bus


def _placed(i: int) -> ev.InstancePlacedV1:
    return ev.InstancePlacedV1(
        event_id=f"p{i}",
        sop_instance_uid=f"1.2.{i}",
        study_instance_uid="1.2",
        sop_class_uid="1.2.840",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key=f"b{i}",
        dataset_digest="d",
        node_id="n1",
        reason=ev.PlacementReason.NEW_STUDY,
    )


async def test_pull_batches_yields_batches_then_empty_when_idle_and_ends_on_stop(nats_only):
    bus = await _connect(nats_only.cfg)
    try:
        for i in range(5):
            await bus.publish(_placed(i))
        stop = asyncio.Event()
        consumer = forwarder_consumer("n1", 3, 30.0)
        got: list[list[str]] = []
        started = time.monotonic()
        async with contextlib.aclosing(bus.pull_batches(consumer, 4, stop, linger=0.3, fetch_timeout=0.2)) as it:
            async for msgs in it:
                got.append([ev.decode(m.data).event_id for m in msgs])
                for m in msgs:
                    await m.ack()
                if not msgs:
                    stop.set()
        assert got == [["p0", "p1", "p2", "p3"], ["p4"], []]
        # The short batch lingered before the next pull; the full one did not.
        assert time.monotonic() - started >= 0.3
        assert consumer.durable_name is not None
        info = await bus.js.consumer_info(bus.cfg.events_stream, consumer.durable_name)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await bus.close()


@pytest.mark.parametrize("noticed", [False, True], ids=["at-once", "after-disconnect"])
def test_close_after_the_server_died_raises_nothing(nats_only, noticed):
    """Under uvloop (as services run), closing a bus whose server was killed must not raise.

    Closing at once (before the client read the EOF) made nats-py write to a
    closed uvloop transport: ``RuntimeError: ... the handler is closed``, exit 1.
    """

    async def scenario() -> None:
        bus = await _connect(nats_only.cfg)
        await bus.publish(_placed(1))
        await bus.js.pull_subscribe("dicom.instance.placed.>", durable="pull", stream=bus.cfg.events_stream)
        nats_only.nats.kill()
        if noticed:
            deadline = time.monotonic() + 10
            while bus.nc.is_connected and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not bus.nc.is_connected
        await bus.close(timeout=2.0)
        assert bus.nc.is_closed

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_services_exit_0_on_sigterm_right_after_nats_died(tmp_path):
    """``docker compose restart`` order: the server goes first, then the services get SIGTERM."""
    stack = make_stack(tmp_path, [], services=("scheduler", "forwarder"))
    try:
        assert stack.nats is not None
        stack.nats.kill()
        procs = dict(stack.services)
        for proc in procs.values():
            proc.terminate()
        # One SIGTERM each, as compose sends (Proc.stop would send a second one).
        codes = {name: proc.popen.wait(20) for name, proc in procs.items()}
        stack.services.clear()
        assert codes == {"scheduler": 0, "forwarder": 0}, {n: stack.log(n)[-2000:] for n in procs}
        for name in procs:
            assert "Traceback" not in stack.log(name), stack.log(name)[-2000:]
    finally:
        stack.close()
