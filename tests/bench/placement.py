"""Placement benchmark: `just bench placement` (or `python -m tests.bench placement`).

1. Policy decisions per second in process (pure `policy.place`, 3 nodes).
2. Decision latency over NATS: publish one `received`, wait for its `placed`
   (a real scheduler process, heartbeats published by the bench), sequential.
3. Failover: a real Orthanc node is killed while a study affine to it keeps
   arriving; time from the kill to the first placement that avoids it.
4. End to end, same run, same images: DCMTK storescu -> 1 Orthanc directly;
   storescu -> Switchyard -> 3 Orthanc nodes; storescu -> an Orthanc Lua
   auto-router (OnStoredInstance -> SendToModality round robin) -> the same 3
   nodes. CPU seconds (utime+stime from /proc) per routed image.

Flags: --images=N (default 1000), --rounds=N (default 1: each end-to-end path
sent N times, a new corpus each time; the ratios use each path's median),
--nats-auth=MODE[,MODE...] (default on: off, no authentication; on, an nkey per
service with least-privilege permissions; tls, the same over mutual TLS; the
Switchyard path runs once per mode, in this run), --tracing=MODE[,MODE...]
(off, 100, 10: tracing off, or on with that percentage of traces sampled,
exported over OTLP/HTTP to a receiver in the bench process; the Switchyard path
runs once per mode with the first NATS auth mode), --quick (fewer decisions and images).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec

from services.scheduler.policy import NodeView, Weights, place
from shared import events as ev
from shared.bus import Bus
from shared.config import Config, NodeConfig
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import OrthancNode, Stack, first_after, make_stack, new_orthanc_node, stream_leader
from tests.fixtures.util import free_port, wait_for

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def bench_policy(n: int) -> float:
    w = Weights()
    rng = random.Random(1)
    studies = [f"1.2.{rng.randrange(10**9)}.{i}" for i in range(1000)]
    nodes = [NodeView(f"node{i}", live=True, pending_jobs=i % 2, rtt_ms=1.0 + i, reserved=0) for i in range(3)]
    affinity: dict[str, str] = {}
    started = time.perf_counter()
    for i in range(n):
        study = studies[i % 1000]
        d = place(study, nodes, affinity.get(study), w)
        assert d is not None
        affinity[study] = d.node_id
    return n / (time.perf_counter() - started)


def received(i: int, study: str) -> ev.InstanceReceivedV1:
    sop = f"1.2.826.0.1.3680043.10.1{i}.{int(time.time() * 1000)}"
    return ev.InstanceReceivedV1(
        event_id=ev.fact_id("bench-received", sop),
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key="sha256/00/none",
        size=1,
        dataset_digest="0" * 64,
    )


async def nats_latency(stack, node_ids: list[str], n: int) -> list[tuple[float, float]]:
    bus = await Bus.connect(stack.cfg.nats, "bench", identity="harness")  # heartbeats and received: any subject
    stop = asyncio.Event()

    async def beat():
        while not stop.is_set():
            for node in node_ids:
                await bus.nc.publish(
                    f"node.heartbeat.{node}",
                    ev.encode(
                        ev.NodeHeartbeatV1(
                            event_id=ev.fact_id("hb", node, time.time()), node_id=node, up=True, rtt_ms=1.0
                        )
                    ),
                )
            await asyncio.sleep(0.2)

    waiting: dict[str, asyncio.Future] = {}

    async def on_placed(msg):
        e = ev.decode(msg.data)
        if not isinstance(e, ev.InstancePlacedV1):
            return
        fut = waiting.pop(e.sop_instance_uid, None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    beats = asyncio.create_task(beat())
    await bus.nc.subscribe("dicom.instance.placed.>", cb=on_placed)
    await asyncio.sleep(1.0)
    out = []
    try:
        for i in range(n):
            e = received(i, f"1.2.3.{i // 10}")
            fut = asyncio.get_running_loop().create_future()
            waiting[e.sop_instance_uid] = fut
            started = time.perf_counter()
            await bus.publish(e)
            stored = time.perf_counter()  # PubAck: the event is in the log, the scheduler can see it
            placed_at = await asyncio.wait_for(fut, 10)
            out.append((placed_at - started, placed_at - stored))
    finally:
        stop.set()
        await beats
        await bus.close()
    return out


def decision_latency(
    data_dir: Path, fake: list[NodeConfig], quick: bool, sync_always: bool
) -> tuple[float, float, float, float]:
    """(p50, p99) ms from publishing a received event to seeing its placement, one at a time,
    then (p50, p99) from its PubAck (stored in the log) to seeing the placement."""
    stack = make_stack(data_dir, [], services=("scheduler",), sync_always=sync_always)
    try:
        # The nodes exist only in the log here: added like `switchyard nodes add` does.
        async def add_nodes():
            from shared import membership

            bus = await Bus.connect(stack.cfg.nats, "bench-add", identity="harness")
            for n in fake:
                await bus.publish(membership.transition(None, n.id, "added", node=n))
            await bus.close()

        asyncio.run(add_nodes())
        pairs = asyncio.run(nats_latency(stack, [n.id for n in fake], 300 if quick else 2000))
        out = []
        for lat in (sorted(p[0] for p in pairs), sorted(p[1] for p in pairs)):
            out += [lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000]
        return out[0], out[1], out[2], out[3]
    finally:
        stack.close()


async def failover_time(stack, nodes: list[OrthancNode]) -> tuple[float, str]:
    """Keep a study arriving every 10 ms; SIGKILL its node; time to the first placement elsewhere."""
    bus = await Bus.connect(stack.cfg.nats, "bench-failover", identity="harness")
    study = f"1.2.4.{int(time.time())}"
    first: dict[str, str] = {}
    avoided = asyncio.get_running_loop().create_future()
    killed_at = [0.0]

    async def on_placed(msg):
        e = ev.decode(msg.data)
        if not isinstance(e, ev.InstancePlacedV1) or e.study_instance_uid != study:
            return
        first.setdefault("node", e.node_id)
        if killed_at[0] and e.node_id != first["node"] and not avoided.done():
            avoided.set_result((time.perf_counter(), e.reason))

    await bus.nc.subscribe("dicom.instance.placed.>", cb=on_placed)
    i = 0
    try:
        deadline = time.monotonic() + 60
        while not avoided.done() and time.monotonic() < deadline:
            await bus.publish(received(100000 + i, study))
            i += 1
            if "node" in first and not killed_at[0] and i > 20:
                victim = next(n for n in nodes if n.node.id == first["node"])
                killed_at[0] = time.perf_counter()
                assert victim.proc is not None
                victim.proc.kill()
                victim.proc = None
            await asyncio.sleep(0.01)
        at, reason = await asyncio.wait_for(avoided, 5)
        return at - killed_at[0], reason
    finally:
        await bus.close()


def lua_router(base: Path, nodes: list[OrthancNode]) -> tuple[OrthancNode, ls.Proc]:
    base.mkdir(parents=True, exist_ok=True)
    script = base / "router.lua"
    names = [n.node.id for n in nodes]
    script.write_text(
        "local nodes = {" + ", ".join(f"'{n}'" for n in names) + "}\n"
        "local i = 0\n"
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        "  i = i + 1\n"
        "  SendToModality(instanceId, nodes[(i % #nodes) + 1])\n"
        "end\n"
    )
    router = new_orthanc_node(
        9,
        base,
        {
            "LuaScripts": [str(script)],
            "DicomModalities": {n.node.id: [n.node.ae_title, n.node.host, n.node.dicom_port] for n in nodes},
        },
    )
    router.start()
    assert router.proc is not None
    return router, router.proc


def counts(nodes: list[OrthancNode]) -> int:
    return sum(int(n.client.statistics()["CountInstances"]) for n in nodes)


def nodes_live(stack: Stack, nodes: list[OrthancNode]) -> bool:
    """The scheduler counts every node live."""
    return all(stack.metric("scheduler", "switchyard_scheduler_node_live", f'node="{n.node.id}"') == 1 for n in nodes)


def grew_by(nodes: list[OrthancNode], before: int, n: int) -> bool:
    """The nodes hold at least ``n`` instances more than ``before``."""
    return counts(nodes) - before >= n


def probe_every_second(cfg: Config, then: Callable[[Config], Config]) -> Config:
    """The probe looks at each node every second, as deployed; then ``then``."""
    return then(msgspec.structs.replace(cfg, probe=msgspec.structs.replace(cfg.probe, interval_s=1.0)))


def all_verified(stack: Stack, before: float, n: int) -> bool:
    """The probe verified at least ``n`` instances more than ``before``."""
    return verified(stack) - before >= n


def verified(stack) -> float:
    """Verified outcomes the probe published, from one scrape (each scrape costs the probe CPU)."""
    port = stack.cfg.probe.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("switchyard_probe_verifications_total{") and 'outcome="verified"' in line
    )


def _round(r: int, rounds: int) -> str:
    return f" (round {r + 1}/{rounds})" if rounds > 1 else ""


def timed_send(send, done, timeout: float = 240.0) -> float:
    started = time.perf_counter()
    result = send()
    assert result.returncode == 0, result.stderr[-500:]
    wait_for(done, timeout=timeout, interval=0.02, what="all images stored")
    return time.perf_counter() - started


NATS_AUTH_MODES = ("off", "on", "tls")


def nats_auth(mode: str, base: Path):
    """(configure, server tls block) for make_stack in one --nats-auth mode."""
    if mode == "off":
        return (
            lambda cfg: msgspec.structs.replace(cfg, nats=msgspec.structs.replace(cfg.nats, allow_unauthenticated=True))
        ), ""
    if mode == "on":
        return (lambda cfg: cfg), ""
    from shared import natsauth
    from tests.fixtures.pki import make_pki

    pki = make_pki(base / "pki")
    return (
        lambda cfg: msgspec.structs.replace(
            cfg,
            nats=msgspec.structs.replace(
                cfg.nats,
                tls_ca_file=str(pki["ca"]),
                tls_cert_file=str(pki["client_crt"]),
                tls_key_file=str(pki["client_key"]),
            ),
        )
    ), natsauth.render_tls(str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]), verify=True)


def nats_cluster_bench(base: Path, images: int, rounds: int, kills: int) -> int:
    """One server next to a 3-server cluster (R3), back to back on the same nodes; then leader kills.

    Resume: SIGKILL of the events stream's leader while a sender keeps sending
    (one file per association, resent when refused), to the first forwarded
    event made after the kill.
    """
    import threading
    from datetime import UTC, datetime

    nodes = [new_orthanc_node(i, base / "nodes") for i in (1, 2, 3)]
    stack = None
    rates: dict[str, list[float]] = {"single": [], "cluster": []}
    resumes: list[float] = []
    try:
        for n in nodes:
            n.start()
        seed = int(time.time())
        for k, topology in enumerate(("single", "cluster")):
            stack = make_stack(
                base / f"stack-{topology}",
                nodes,
                nats_cluster=3 if topology == "cluster" else 0,
                configure=lambda cfg: msgspec.structs.replace(
                    cfg, probe=msgspec.structs.replace(cfg.probe, interval_s=1.0)
                ),
            )
            wait_for(
                functools.partial(nodes_live, stack, nodes),
                timeout=30,
                what="nodes live",
            )
            for r in range(rounds):
                corpus = base / f"corpus-{topology}-{r}"
                files = generate_studies(
                    corpus, studies=images // 10, series_per_study=1, instances_per_series=10, seed=seed + 7 * r + k
                )
                base_count = counts(nodes)
                t = timed_send(
                    lambda stack=stack, corpus=corpus: stack.send([corpus], extra=["+sd", "+r"]),
                    lambda b=base_count, fs=files: counts(nodes) - b >= len(fs),
                )
                rates[topology].append(len(files) / t)
                print(
                    f"{topology} nats{_round(r, rounds)}: storescu -> Switchyard -> 3 Orthanc: "
                    f"{len(files) / t:.1f} img/s ({t:.2f} s)"
                )
            if topology == "cluster":
                for kill in range(kills):
                    trickle = generate_studies(
                        base / f"trickle-{kill}",
                        studies=1,
                        series_per_study=1,
                        instances_per_series=60,
                        seed=seed + 1000 + kill,
                    )
                    stop = threading.Event()

                    def send_trickle(files=trickle, stack=stack, stop=stop):
                        for f in files:
                            while not stop.is_set():
                                out = stack.send([f], extra=["-v"])
                                if "Received Store Response (Success)" in out.stdout + out.stderr:
                                    break
                            if stop.is_set():
                                return

                    before = counts(nodes)
                    sender = threading.Thread(target=send_trickle, daemon=True)
                    sender.start()
                    wait_for(functools.partial(grew_by, nodes, before, 5), timeout=60, what="the trickle flowing")
                    leader = asyncio.run(stream_leader(stack))
                    t0 = datetime.now(UTC).timestamp()
                    stack.kill_member(leader)
                    deadline = time.monotonic() + 60
                    gap = None
                    while gap is None and time.monotonic() < deadline:
                        try:
                            found = asyncio.run(first_after(stack, ev.InstanceForwardedV1, t0))
                            gap = found[0] if found else None
                        except Exception:  # noqa: BLE001 - the cluster is electing: read again
                            gap = None
                        time.sleep(0.2)
                    stop.set()
                    sender.join(30)
                    assert gap is not None, "routing did not resume within 60 s"
                    resumes.append(gap)
                    print(f"leader kill {kill + 1}/{kills}: SIGKILL of {leader}, routing resumed after {gap:.2f} s")
                    stack.restart_member(leader)
            stack.close()
            stack = None
        single, cluster = statistics.median(rates["single"]), statistics.median(rates["cluster"])
        print(
            f"nats cluster: {cluster:.1f} img/s vs single server {single:.1f} img/s ({cluster / single:.2f}x); "
            f"resume after a leader SIGKILL: " + ", ".join(f"{g:.2f}" for g in resumes) + " s"
        )
        print(
            json.dumps(
                {
                    "img_per_s": {"single": round(single, 1), "cluster": round(cluster, 1)},
                    "rounds_img_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                    "resume_after_leader_kill_s": [round(g, 2) for g in resumes],
                }
            )
        )
        return 0
    finally:
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()


TRACING_MODES = ("off", "100", "10")
# After the last image is verified: the SDK's export schedule (5 s) and a margin.
SETTLE_S = 6.0


def with_tracing(mode: str, endpoint: str, then: Callable[[Config], Config]) -> Callable[[Config], Config]:
    """Config for one --tracing mode: off, or OTLP to ``endpoint`` with ``mode`` percent sampled."""

    def configure(cfg: Config) -> Config:
        cfg = then(cfg)
        if mode == "off":
            telemetry = msgspec.structs.replace(cfg.telemetry, traces="none")
        else:
            telemetry = msgspec.structs.replace(
                cfg.telemetry, traces="otlp", otlp_endpoint=endpoint, sample_ratio=int(mode) / 100
            )
        return msgspec.structs.replace(cfg, telemetry=telemetry)

    return configure


def span_cpu_us(mode: str, endpoint: str, n: int = 20000) -> float:
    """CPU per span in this process (created, batched, encoded, posted), as ingest makes them:
    a SERVER span with DICOM attributes and a PRODUCER child. The receiver decodes in this
    process too, so this is an upper bound."""
    from opentelemetry.trace import SpanKind

    from shared import telemetry

    cfg = with_tracing(mode, endpoint, lambda c: c)(Config()).telemetry
    provider = telemetry.setup_tracing("bench", cfg)
    tracer = provider.get_tracer("bench")
    started = time.process_time()
    for i in range(n):
        with tracer.start_as_current_span("ingest.c_store", kind=SpanKind.SERVER) as span:
            span.set_attributes(
                {
                    "rpc.system": "dicom",
                    "rpc.method": "C-STORE",
                    "dicom.sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{i}",
                    "dicom.sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                    "dicom.transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "dicom.calling_ae": "BENCH",
                    "dicom.called_ae": "SWITCHYARD",
                    "switchyard.size": 4096,
                }
            )
            telemetry.dicom_status(span, 0)
            attrs = telemetry.messaging_attributes("dicom.instance.received", "publish")
            with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER, attributes=attrs) as producer:
                telemetry.context_of(producer)
                producer.set_attribute("switchyard.stream_seq", i)
            # The exporter's queue holds 2048 spans: this loop would outrun it, a service does not.
            if i % 500 == 499:
                provider.force_flush()
    provider.shutdown()
    return (time.process_time() - started) / (2 * n) * 1e6


def mode_list(argv: list[str], flag: str, allowed: tuple[str, ...], default: list[str]) -> list[str] | None:
    """The modes of ``--flag=a,b``; None (said) when one is not allowed."""
    modes = default
    for arg in argv:
        if arg.startswith(flag + "="):
            modes = arg.split("=", 1)[1].split(",")
    if not set(modes) <= set(allowed):
        print(f"{flag}: one or more of {', '.join(allowed)}")
        return None
    return modes


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    images = 120 if quick else 1000
    for arg in argv:  # --images=N (the bench runner takes bare words for areas)
        if arg.startswith("--images="):
            images = int(arg.split("=", 1)[1])
    rounds = 1
    for arg in argv:
        if arg.startswith("--rounds="):
            rounds = max(1, int(arg.split("=", 1)[1]))
    if "--nats-cluster" in argv:
        # Only the cluster comparison: single server vs 3-server cluster, and the leader-kill resume time.
        kills = 3 if quick else 5
        print(f"placement bench, nats cluster: {images} images per round, {rounds} round(s), {kills} leader kills")
        return nats_cluster_bench(Path(tempfile.mkdtemp(prefix="switchyard-bench-cluster-")), images, rounds, kills)
    modes = mode_list(argv, "--nats-auth", NATS_AUTH_MODES, ["on"])
    tracing_modes = mode_list(argv, "--tracing", TRACING_MODES, [])
    if modes is None or tracing_modes is None:
        return 2
    # (label, nats auth mode, tracing mode): the Switchyard path runs once per variant.
    variants = (
        [(f"tracing {t}", modes[0], t) for t in tracing_modes] if tracing_modes else [(m, m, "off") for m in modes]
    )
    decisions = 20000 if quick else 200000
    print(
        f"placement bench: {images} images, {decisions} in-process decisions, NATS auth {', '.join(modes)}"
        + (f", tracing {', '.join(tracing_modes)}" if tracing_modes else "")
    )

    rate = bench_policy(decisions)
    print(f"policy: {rate:,.0f} decisions/s in process (target 100k/s)")

    base = Path(tempfile.mkdtemp(prefix="switchyard-bench-placement-"))
    fake = [
        NodeConfig(id=f"fake{i}", dicom_port=free_port(), rest_url=f"http://127.0.0.1:{free_port()}") for i in range(3)
    ]
    lat_by_sync = {}
    for sync_always in (True, False):
        lat_by_sync[sync_always] = decision_latency(base / f"latency-{sync_always}", fake, quick, sync_always)
    (p50, p99, s50, s99), (p50_nosync, p99_nosync, s50_nosync, s99_nosync) = lat_by_sync[True], lat_by_sync[False]
    print(
        f"nats: received->placed p50 {p50:.2f} ms, p99 {p99:.2f} ms over {300 if quick else 2000} sequential "
        f"instances (JetStream fsyncs every write, as deployed); from the received event's PubAck: "
        f"p50 {s50:.2f} ms, p99 {s99:.2f} ms; "
        f"with JetStream's default 2-minute sync: p50 {p50_nosync:.2f} ms, p99 {p99_nosync:.2f} ms "
        f"(from PubAck p50 {s50_nosync:.2f}, p99 {s99_nosync:.2f}) (target p99 < 2 ms)"
    )

    nodes = [new_orthanc_node(i, base / "nodes") for i in (1, 2, 3)]
    direct = new_orthanc_node(8, base / "direct")
    router = None
    stack = None
    try:
        for n in [*nodes, direct]:
            n.start()
        # Same shape, new UIDs per path: the nodes would ignore instances they already hold.
        seed = int(time.time())
        corpora: dict[str, list[Path]] = {}
        for k, path in enumerate(("direct", "lua", *(f"switchyard-{label}" for label, _, _ in variants))):
            corpora[path] = [base / f"corpus-{path}-{r}" for r in range(rounds)]
            for r, corpus in enumerate(corpora[path]):
                files = generate_studies(
                    corpus, studies=images // 10, series_per_study=1, instances_per_series=10, seed=seed + 3 * r + k
                )

        # Baseline 1: storescu -> one Orthanc.
        t_directs = []
        for r, corpus in enumerate(corpora["direct"]):
            base_count = counts([direct])
            t_directs.append(
                timed_send(
                    lambda corpus=corpus: ls.storescu(
                        "127.0.0.1", direct.node.dicom_port, direct.node.ae_title, [corpus], extra=["+sd", "+r"]
                    ),
                    lambda base_count=base_count: counts([direct]) - base_count >= len(files),
                )
            )
            print(
                f"direct{_round(r, rounds)}: storescu -> 1 Orthanc: {len(files) / t_directs[-1]:.1f} img/s "
                f"({t_directs[-1]:.2f} s)"
            )
        t_direct = statistics.median(t_directs)

        # Switchyard, once per NATS auth mode (the last mode's stack also runs the failover).
        # The probe looks at each node every second, as deployed (the tests' 0.25 s costs CPU here).
        by_mode: dict[str, tuple[float, float, list[float]]] = {}  # median s, median CPU s, every round's s
        if tracing_modes:
            from tests.fixtures.otlp import start_receiver

            receiver, stop_receiver = start_receiver()
            # The SDK's export schedule as deployed (every 5 s, or at 512 spans): each export is an HTTP
            # POST, whose CPU counts as much as the spans in it (every 100 ms cost ~1 ms/img more).
            print(
                "span CPU in process (upper bound: the receiver decodes in this process): "
                + ", ".join(f"tracing {m} {span_cpu_us(m, receiver.traces_url):.1f} us/span" for m in tracing_modes)
            )
        # Auth modes: one stack per mode, its rounds back to back. Tracing modes: a new stack per round,
        # the modes in turn and in reverse order every other round (off,100,10 then 10,100,off), so the
        # machine's drift (other work, the nodes filling up) does not fall on one mode.
        plan: list[tuple[str, str, str, list[int]]] = []
        if tracing_modes:
            for r in range(rounds):
                plan += [(*v, [r]) for v in (variants if r % 2 == 0 else variants[::-1])]
        else:
            plan = [(*v, list(range(rounds))) for v in variants]
        t_by: dict[str, list[float]] = {}
        cpu_by: dict[str, list[float]] = {}
        spans_by: dict[str, int] = {}
        settled_by: dict[str, list[float]] = {}  # services CPU ms/img until verified + SETTLE_S
        for step, (label, mode, tracing, round_ids) in enumerate(plan):
            if stack is not None:
                stack.close()
            configure, nats_tls = nats_auth(mode, base / f"auth-{step}")
            if tracing_modes:
                configure = with_tracing(tracing, receiver.traces_url, configure)
                spans_before = len(receiver.snapshot())
            stack = make_stack(
                base / f"stack-{step}",
                nodes,
                nats_tls=nats_tls,
                configure=functools.partial(probe_every_second, then=configure),
            )
            wait_for(
                functools.partial(nodes_live, stack, nodes),
                timeout=30,
                what="nodes live",
            )
            pids = {s: p.popen.pid for s, p in stack.services.items()}
            assert stack.nats is not None  # make_stack started NATS
            t_sys, sy_cpus = t_by.setdefault(label, []), cpu_by.setdefault(label, [])
            for r in round_ids:
                corpus = corpora[f"switchyard-{label}"][r]
                before = {s: cpu_seconds(pid) for s, pid in pids.items()}
                nats_before = cpu_seconds(stack.nats.popen.pid)
                base_count = counts(nodes)
                base_verified = verified(stack)
                started = time.perf_counter()
                t_sys.append(
                    timed_send(
                        lambda stack=stack, corpus=corpus: stack.send([corpus], extra=["+sd", "+r"]),
                        lambda base_count=base_count: counts(nodes) - base_count >= len(files),
                    )
                )
                cpu = {s: cpu_seconds(pid) - before[s] for s, pid in pids.items()}
                nats_cpu = cpu_seconds(stack.nats.popen.pid) - nats_before
                sy_cpus.append(sum(cpu.values()))
                print(
                    f"switchyard ({'nats auth ' + mode if not tracing_modes else label}){_round(r, rounds)}: "
                    "storescu -> Switchyard -> 3 Orthanc: "
                    f"{len(files) / t_sys[-1]:.1f} img/s ({t_sys[-1]:.2f} s); "
                    f"CPU {sy_cpus[-1] / len(files) * 1000:.1f} ms/img for the services "
                    f"({', '.join(f'{s} {v:.2f}s' for s, v in sorted(cpu.items()))}), nats {nats_cpu:.2f}s"
                )
                # Verification trails delivery: the probe's whole cost per image is counted until the last
                # verified event (and the next round starts after it, on a quiet stack).
                wait_for(
                    functools.partial(all_verified, stack, base_verified, len(files)),
                    timeout=120,
                    interval=0.1,
                    what="every image verified",
                )
                t_verified = time.perf_counter() - started
                probe_cpu = cpu_seconds(pids["probe"]) - before["probe"]
                print(
                    f"probe: every image verified {t_verified:.2f} s after the send started; probe CPU until then "
                    f"{probe_cpu:.2f} s ({probe_cpu / len(files) * 1000:.2f} ms/img)"
                )
                if tracing_modes:
                    # Every mode the same window: verified, then one export schedule (5 s) and a margin,
                    # so the last spans are encoded and posted inside it.
                    time.sleep(SETTLE_S)
                    settled_by.setdefault(label, []).append(
                        sum(cpu_seconds(pid) - before[s] for s, pid in pids.items()) / len(files) * 1000
                    )
                    print(f"{label}: services CPU until settled {settled_by[label][-1]:.2f} ms/img")
            if tracing_modes:
                stack.close()  # flushes every service's spans before they are counted
                stack = None
                spans_by[label] = spans_by.get(label, 0) + len(receiver.snapshot()) - spans_before
        for label in t_by:
            by_mode[label] = (statistics.median(t_by[label]), statistics.median(cpu_by[label]), t_by[label])
        if tracing_modes:
            stop_receiver()
            for label, spans in spans_by.items():
                print(f"{label}: {spans} spans exported ({spans / (len(files) * rounds):.1f} per image)")
            print(
                f"services CPU until settled (verified + {SETTLE_S:g} s), median ms/img: "
                + ", ".join(
                    f"{m} {statistics.median(v):.2f} ({' / '.join(f'{x:.2f}' for x in v)})"
                    for m, v in settled_by.items()
                )
            )
            off = by_mode.get("tracing off")
            print(
                "tracing modes: "
                + ", ".join(
                    f"{m} {len(files) / t:.1f} img/s, CPU {c / len(files) * 1000:.2f} ms/img"
                    + (f" (rate {off[0] / t:.3f}x of off, CPU {c / off[1]:.3f}x)" if off and m != "tracing off" else "")
                    for m, (t, c, _) in by_mode.items()
                )
            )
        # The ratios are for auth on when it ran (as deployed), else the first variant.
        t_sy, sy_cpu, t_sys = by_mode["on" if "on" in by_mode else variants[0][0]]
        if len(modes) > 1:
            print(
                "nats auth modes: "
                + ", ".join(f"{m} {len(files) / t:.1f} img/s" for m, (t, _, _) in by_mode.items())
                + (f"; on/off {by_mode['off'][0] / by_mode['on'][0]:.3f}x" if {"on", "off"} <= by_mode.keys() else "")
            )

        # Failover on the same stack (the probe polls every 0.25 s, REST timeout 1 s).
        if stack is None:  # closed after a tracing variant: a stack as deployed
            stack = make_stack(
                base / "stack-failover", nodes, configure=functools.partial(probe_every_second, then=lambda c: c)
            )
            wait_for(functools.partial(nodes_live, stack, nodes), timeout=30, what="nodes live")
        took, reason = asyncio.run(failover_time(stack, nodes))
        print(
            f"failover: {took * 1000:.0f} ms from SIGKILL to the first placement avoiding the node "
            f"(reason {reason}; target < 2 s)"
        )
        stack.close()
        stack = None
        for n in nodes:
            if not n.running:
                n.start()

        # Baseline 2: the Lua auto-router in front of the same three nodes.
        # A new router each round: Orthanc's Lua job grows across back-to-back bursts
        # (`just bench lua_router`), which would slow every later round.
        t_luas, lua_cpus = [], []
        for r, corpus in enumerate(corpora["lua"]):
            if router is not None:
                router.stop()
            router, rproc = lua_router(base / f"router-{r}", nodes)
            rbefore = cpu_seconds(rproc.popen.pid)
            base_count = counts(nodes)
            t_luas.append(
                timed_send(
                    lambda router=router, corpus=corpus: ls.storescu(
                        "127.0.0.1", router.node.dicom_port, router.node.ae_title, [corpus], extra=["+sd", "+r"]
                    ),
                    lambda base_count=base_count: counts(nodes) - base_count >= len(files),
                )
            )
            lua_cpus.append(cpu_seconds(rproc.popen.pid) - rbefore)
            print(
                f"lua router{_round(r, rounds)}: storescu -> Orthanc Lua -> 3 Orthanc: "
                f"{len(files) / t_luas[-1]:.1f} img/s ({t_luas[-1]:.2f} s); "
                f"CPU {lua_cpus[-1] / len(files) * 1000:.1f} ms/img for the router"
            )
        t_lua, lua_cpu = statistics.median(t_luas), statistics.median(lua_cpus)
        print(
            f"ratios{' of the medians' if rounds > 1 else ''}: switchyard/direct {t_direct / t_sy:.2f}x "
            f"(target >= 0.5x), switchyard/lua {t_lua / t_sy:.2f}x (target >= 5x)"
        )
        print(
            json.dumps(
                {
                    "policy_per_s": round(rate),
                    "nats_p50_ms": round(p50, 3),
                    "nats_p99_ms": round(p99, 3),
                    "nats_nosync_p50_ms": round(p50_nosync, 3),
                    "nats_nosync_p99_ms": round(p99_nosync, 3),
                    "nats_stored_p50_ms": round(s50, 3),
                    "nats_stored_p99_ms": round(s99, 3),
                    "nats_stored_nosync_p50_ms": round(s50_nosync, 3),
                    "nats_stored_nosync_p99_ms": round(s99_nosync, 3),
                    "failover_ms": round(took * 1000),
                    "verified_s": round(t_verified, 2),
                    "probe_cpu_ms_per_img_until_verified": round(probe_cpu / len(files) * 1000, 2),
                    "img_per_s": {
                        "direct": round(len(files) / t_direct, 1),
                        "switchyard": round(len(files) / t_sy, 1),
                        "lua": round(len(files) / t_lua, 1),
                    },
                    "switchyard_cpu_ms_per_img_by_variant": {
                        m: round(c / len(files) * 1000, 2) for m, (_, c, _) in by_mode.items()
                    },
                    "switchyard_img_per_s_by_nats_auth": {
                        m: round(len(files) / t, 1) for m, (t, _, _) in by_mode.items()
                    },
                    "rounds_img_per_s": {
                        "direct": [round(len(files) / t, 1) for t in t_directs],
                        "switchyard": [round(len(files) / t, 1) for t in t_sys],
                        "lua": [round(len(files) / t, 1) for t in t_luas],
                    },
                    "cpu_ms_per_img": {
                        "switchyard": round(sy_cpu / len(files) * 1000, 2),
                        "lua": round(lua_cpu / len(files) * 1000, 2),
                    },
                }
            )
        )
        return 0
    finally:
        if stack is not None:
            stack.close()
        for n in [*nodes, direct, *([router] if router else [])]:
            n.stop()
