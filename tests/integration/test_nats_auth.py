"""Attacks on the bus, against a real nats-server running the project's generated auth config.

Every refusal asserted here comes from the server (a permissions violation or
an authorization error), not from the client; the stack keeps routing after.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TypedDict

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from shared import events as ev
from shared import natsauth
from shared.bus import Bus, subject_for
from shared.membership import transition
from tests.fixtures.deploy import DEPLOY, SWITCHYARD, compose_config, service_config
from tests.integration.placement_helpers import route_one_study

pytestmark = pytest.mark.integration


class Attacker:
    """A raw nats-py client with one identity's seed (or none), collecting the server's refusals."""

    def __init__(self, cfg, identity: str | None):
        self.cfg, self.identity = cfg, identity
        self.errors: list[str] = []
        self.nc: Client  # connected in __aenter__

    async def __aenter__(self):
        async def on_error(exc):
            self.errors.append(str(exc))

        opts = dict(allow_reconnect=False, connect_timeout=2, error_cb=on_error)
        if self.identity is not None:
            opts.update(
                nkeys_seed=str(natsauth.seed_path(self.cfg, self.identity)),
                inbox_prefix=natsauth.inbox_prefix(self.cfg, self.identity),
            )
        self.nc = await nats.connect(self.cfg.url, **opts)
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()

    async def refused(self, what: str, subject: str, timeout: float = 5.0) -> bool:
        """Poll (with a deadline) for the server's permissions violation naming ``subject``.

        ``what``: "Publish" or "Subscription".
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # nats-py lower-cases the server's -ERR line
            if any(f'permissions violation for {what} to "{subject}"'.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False

    async def publish(self, subject: str, data: bytes = b"{}") -> bool:
        await self.nc.publish(subject, data)
        await self.nc.flush()
        return await self.refused("Publish", subject)

    async def request(self, subject: str, body: dict) -> dict | None:
        """A JetStream API call; None when the server refused to let it through."""
        try:
            msg = await self.nc.request(subject, json.dumps(body).encode(), timeout=1.0)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None
        return json.loads(msg.data)


class InstanceKeys(TypedDict):
    """The fields the per-instance events share, spread into each with ``**``."""

    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str


def samples(stack):
    """One event of each type, as its rightful publisher would record it."""
    common = InstanceKeys(sop_instance_uid="9.9", study_instance_uid="9", node_id="node1", placement_id="p")
    return {
        "received": ev.InstanceReceivedV1(
            event_id="r",
            sop_instance_uid="9.9",
            sop_class_uid="1",
            study_instance_uid="9",
            series_instance_uid="9.1",
            transfer_syntax_uid="1",
            blob_key="b",
            size=1,
            dataset_digest="d",
        ),
        "placed": ev.InstancePlacedV1(
            event_id="p",
            sop_instance_uid="9.9",
            study_instance_uid="9",
            sop_class_uid="1",
            transfer_syntax_uid="1",
            blob_key="b",
            dataset_digest="d",
            node_id="node1",
            reason=ev.PlacementReason.NEW_STUDY,
        ),
        "forwarded": ev.InstanceForwardedV1(event_id="f", **common),
        "dead_lettered": ev.InstanceDeadLetteredV1(event_id="x", reason="r", **common),
        "verified": ev.InstanceVerifiedV1(event_id="v", sop_instance_uid="9.9", node_id="node1", dataset_digest="d"),
        "heartbeat": ev.NodeHeartbeatV1(event_id="h", node_id="node1", up=True),
        "added": transition(None, "evil", "added"),
        "retry_requested": ev.InstanceRetryRequestedV1(event_id="rr", sop_instance_uid="9.9", received_seq=1),
        "down": transition(None, "node1", "down"),
    }


OWN = {
    "ingest": {"received"},
    "scheduler": {"placed", "down", "dead_lettered"},  # the final dead letter (verification failed twice)
    "forwarder": {"forwarded", "dead_lettered"},
    "probe": {"heartbeat", "verified"},
    # The web console's node actions (as the admin CLI records them) and its own operator events.
    "catalog": {"added", "retry_requested"},
}


async def test_no_credentials_no_connection(stack):
    async def attempt():
        with pytest.raises(nats.errors.Error) as raised:
            await nats.connect(stack.cfg.nats.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
        return raised.value

    exc = await attempt()
    assert "Authorization Violation" in str(exc), exc
    assert "authentication error" in (stack.data_dir / "logs" / "nats.log").read_text()


@pytest.mark.parametrize("identity", natsauth.SERVICES)
async def test_each_service_is_refused_outside_its_rights(stack, identity):
    cfg = stack.cfg.nats
    s = cfg.events_stream

    async def attack():
        async with Attacker(cfg, identity) as a:
            for kind, event in samples(stack).items():
                if kind not in OWN[identity]:
                    assert await a.publish(subject_for(event), ev.encode(event)), f"{identity} published {kind}"
            for subject in (
                f"$JS.API.STREAM.PURGE.{s}",
                f"$JS.API.STREAM.DELETE.{s}",
                f"$JS.API.STREAM.UPDATE.{s}",
                f"$JS.API.CONSUMER.DELETE.{s}.scheduler",
            ):
                assert await a.request(subject, {}) is None
                assert await a.refused("Publish", subject), subject
            # Another service's durable, under its name.
            other = "forwarder-node1" if identity == "scheduler" else "scheduler"
            filt = "dicom.instance.placed.node1" if identity == "scheduler" else "dicom.instance.received"
            create = f"$JS.API.CONSUMER.CREATE.{s}.{other}.{filt}"
            assert (
                await a.request(
                    create, {"stream_name": s, "config": {"name": other, "durable_name": other, "filter_subject": filt}}
                )
                is None
            )
            assert await a.refused("Publish", create)
            # The log's live traffic and another identity's replies.
            for subject in ("dicom.instance.>", "_INBOX_admin.>"):
                await a.nc.subscribe(subject)
                await a.nc.flush()
                assert await a.refused("Subscription", subject), subject
            if identity == "ingest":  # ingest only writes: it may not read the stream at all
                sub = f"$JS.API.CONSUMER.CREATE.{s}"
                assert (
                    await a.request(sub, {"stream_name": s, "config": {"filter_subject": "dicom.instance.>"}}) is None
                )
                assert await a.refused("Publish", sub)
            else:  # followers may make ephemeral consumers, but not a durable in disguise
                rsp = await a.request(
                    f"$JS.API.CONSUMER.CREATE.{s}",
                    {
                        "stream_name": s,
                        "config": {
                            "durable_name": "scheduler",
                            "filter_subject": "dicom.instance.received",
                            "deliver_subject": f"{natsauth.inbox_prefix(cfg, identity)}.x",
                        },
                    },
                )
                assert rsp is not None and "error" in rsp, rsp

    await attack()
    assert stack.catalog("/healthz")["ok"]


def forged_node_events(storescp):
    """``added`` for node evil (the attacker's storescp) and a placement of a patient's image on it."""
    evil = transition(None, "evil", "added", node=evil_node(storescp))
    placed = samples(None)["placed"]
    forged = ev.InstancePlacedV1(
        **{**{f: getattr(placed, f) for f in placed.__struct_fields__}, "node_id": "evil", "event_id": "forged-placed"}
    )
    return evil, forged


def assert_nothing_received(storescp, seconds: float = 3.0) -> None:
    """The forged events were recorded before the real instance routed: give a stray C-STORE time to land."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert storescp.received() == [], "the attacker's storescp received an image"
        time.sleep(0.2)


async def test_forged_node_exfiltration_is_refused_by_the_server(stack, storescp, tmp_path):
    """No credentials, or the probe's or ingest's: the server refuses both the node and the placement."""
    cfg = stack.cfg.nats
    evil, forged = forged_node_events(storescp)

    async def attack():
        with pytest.raises(nats.errors.Error):
            await nats.connect(cfg.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
        for identity in ("probe", "ingest"):
            async with Attacker(cfg, identity) as a:
                assert await a.publish(subject_for(evil), ev.encode(evil))
                assert await a.publish(subject_for(forged), ev.encode(forged))

    await attack()
    route_one_study(stack, tmp_path, 1212)
    assert_nothing_received(storescp)
    assert "evil" not in {row["node_id"] for row in stack.catalog("/api/nodes")}


async def test_stolen_scheduler_seed_cannot_add_a_node(stack, storescp, tmp_path):
    """The scheduler may record down/up and placements: an ``added`` payload on its ``up`` subject is
    refused by every consumer (provenance), so no forwarder ever serves evil."""
    cfg = stack.cfg.nats
    evil, forged = forged_node_events(storescp)
    before = {
        s: stack.metric(s, "switchyard_bus_rejected_events_total", 'reason="subject"') or 0.0
        for s in ("forwarder", "catalog")
    }

    async def attack():
        bus = await Bus.connect(cfg, "attack", identity="scheduler")
        try:
            await bus.js.publish("node.state.evil.up", ev.encode(evil))
            await bus.js.publish(subject_for(forged), ev.encode(forged))
        finally:
            await bus.close()

    await attack()
    route_one_study(stack, tmp_path, 1313)
    assert_nothing_received(storescp)
    for service, count in before.items():
        assert stack.metric(service, "switchyard_bus_rejected_events_total", 'reason="subject"') > count, service
    # The placement is on the log (the catalog shows its location), but evil is no member.
    evil_rows = [r for r in stack.catalog("/api/nodes") if r["node_id"] == "evil"]
    assert all(r["state"] is None and not r["configured"] for r in evil_rows), evil_rows


def evil_node(scp):
    from shared.config import NodeConfig

    return NodeConfig(
        id="evil", host="127.0.0.1", dicom_port=scp.port, ae_title=scp.ae_title, rest_url="http://127.0.0.1:1"
    )


def test_stack_data_and_credentials_are_private(stack):
    creds = Path(stack.cfg.nats.nkey_seed_file).parent
    assert creds.stat().st_mode & 0o777 == 0o700
    for path in [*creds.iterdir(), stack.data_dir / "nats.conf"]:
        assert path.stat().st_mode & 0o777 == 0o600, path


async def test_raw_replay_reader_authenticates_with_its_nkey(stack, tmp_path):
    """The rebuild's own-socket reader signs the server nonce; a wrong seed is refused by the server."""
    from shared import natswire

    cfg = stack.cfg.nats
    seed = natsauth.seed_path(cfg, "catalog")
    assert seed is not None
    wire = await natswire.connect(cfg.url, seed.read_bytes().strip())
    wire.close()
    with pytest.raises(natswire.WireError, match="Authorization Violation"):
        await natswire.connect(cfg.url, natsauth.new_seed())
    with pytest.raises(natswire.WireUnsupported):
        await natswire.connect(cfg.url)  # no seed: the reader leaves it to nats-py


def test_nats_credentials_command_writes_private_seeds(tmp_path, capsys):
    from switchyard import cli

    out = tmp_path / "secrets"
    assert cli.main(["nats", "credentials", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o700
    for identity in natsauth.IDENTITIES:
        seed = (out / f"{identity}.nk").read_bytes().strip()
        assert (out / f"{identity}.nk").stat().st_mode & 0o777 == 0o600
        assert seed.decode() not in printed  # where, never what
    assert "harness" not in (out / "auth.conf").read_text()


def test_compose_gives_each_service_only_its_own_seed():
    services = compose_config()["services"]
    for name in SWITCHYARD:
        assert services[name]["secrets"] == [{"source": f"nats-{name}", "target": "nats.nk"}], name
        cfg = service_config(services[name])
        assert cfg.nats.nkey_seed_file == "/run/secrets/nats.nk" and not cfg.nats.allow_unauthenticated, name
        assert services[name]["depends_on"]["nats-init"]["condition"] == "service_completed_successfully", name
    assert services["nats-init"]["secrets"] == [{"source": "nats-admin", "target": "nats.nk"}]
    assert any(v["target"] == "/etc/nats/auth.conf" for v in services["nats"]["volumes"])
    assert 'include "auth.conf"' in (DEPLOY / "nats" / "jetstream-single.conf").read_text()


async def test_catalog_reads_consumer_lag_but_cannot_create_fetch_or_delete(stack, tmp_path):
    """The overview's consumer lag: the catalog may ask a durable's INFO, nothing that changes or drains it."""
    cfg = stack.cfg.nats
    s = cfg.events_stream
    route_one_study(stack, tmp_path, 1515)  # the durables exist once the services pulled
    node = stack.cfg.nodes[0].id
    async with Attacker(cfg, "catalog") as a:
        for durable in ("scheduler", f"forwarder-{node}"):
            info = await a.request(f"$JS.API.CONSUMER.INFO.{s}.{durable}", {})
            assert info is not None and info.get("name") == durable, info
            assert isinstance(info["num_pending"], int), info
        for subject, body in (
            (f"$JS.API.CONSUMER.MSG.NEXT.{s}.scheduler", {"batch": 1}),
            (f"$JS.API.CONSUMER.CREATE.{s}.lag.dicom.instance.received", {"stream_name": s, "config": {"name": "lag"}}),
            (f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.lag", {"stream_name": s, "config": {"durable_name": "lag"}}),
            (f"$JS.API.CONSUMER.DELETE.{s}.forwarder-{node}", {}),
        ):
            assert await a.request(subject, body) is None, subject
            assert await a.refused("Publish", subject), subject
    assert f"forwarder-{node}" in {c.name for c in await consumers(stack)}


async def consumers(stack):
    bus = await Bus.connect(stack.cfg.nats, "check", identity="admin")
    try:
        return await bus.js.consumers_info(stack.cfg.nats.events_stream)
    finally:
        await bus.close()
