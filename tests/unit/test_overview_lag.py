"""The overview's consumer lag: a durable not created yet is absent, NATS asked at most every 2 s."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from services.catalog.api import build_app
from shared.config import CatalogConfig
from shared.readmodel.catalog import CatalogStore
from switchyard.status import render
from tests.fixtures.servers import VIEWER_TOKEN, catalog_tokens


async def overview(tmp_path, collect) -> tuple[dict, dict]:
    store = CatalogStore(tmp_path / "c.duckdb")
    app = build_app(store, CatalogConfig(tokens=catalog_tokens()), consumer_lag=collect)
    try:
        async with TestClient(TestServer(app)) as client:
            got = []
            for _ in range(2):
                rsp = await client.get("/api/overview", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
                assert rsp.status == 200, await rsp.text()
                got.append(await rsp.json())
            return got[0], got[1]
    finally:
        store.close()


async def test_an_absent_durable_is_shown_absent_and_nats_is_asked_once_per_period(tmp_path):
    calls = []

    async def collect():
        calls.append(1)
        lag = {"num_pending": 3, "num_ack_pending": 1, "num_redelivered": 0}
        return {"scheduler": lag, "forwarder-n9": None}

    first, second = await overview(tmp_path, collect)
    assert first["consumers"] == [
        {"durable": "scheduler", "present": True, "num_pending": 3, "num_ack_pending": 1, "num_redelivered": 0},
        {
            "durable": "forwarder-n9",
            "present": False,
            "num_pending": None,
            "num_ack_pending": None,
            "num_redelivered": None,
        },
    ]
    assert second["consumers"] == first["consumers"] and len(calls) == 1
    text = render(first)
    assert "forwarder-n9" in text and "absent" in text.split("forwarder-n9")[1].splitlines()[0]


async def test_nats_not_answering_makes_the_lag_unknown_not_an_error(tmp_path):
    async def collect():
        raise TimeoutError

    first, _ = await overview(tmp_path, collect)
    assert first["consumers"] is None
    assert "unknown" in render(first)
