"""The chaos run: the whole local stack under faults, then an audit of every acknowledged instance.

Issue #13's operator scenario as a command (``switchyard chaos``, ``just chaos``):
synthetic studies are sent by several concurrent DCMTK storescu senders while a
schedule of faults runs (kill -9 or SIGTERM of a service or of nats-server, an
Orthanc node stopped for a while); the supervisor (switchyard.stack) restarts
what crashed, as compose would. A sender re-sends what was not acknowledged,
as a modality does. Then, for every instance storescu got a success for, the
audit asks every node (Orthanc REST), the catalog API and the log:

  lost          acknowledged, on no node and not finally dead-lettered
  duplicated    on more than one node
  split         a study on more than one node, unless all but one of them went ``down``
  dead_lettered acknowledged, on no node, its last placement a dead letter
  settle_s      from the last acknowledgement until the audit stopped changing

The report holds UIDs only (synthetic, generated here), never patient data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from shared import natsauth
from shared.config import Config, NodeConfig
from shared.orthanc import OrthancClient, OrthancError
from switchyard import stack as ls
from switchyard.corpus import _uid, generate_studies

# Issue #13's schedule: every service killed (ingest twice), nats-server SIGTERM and kill -9,
# one node stopped for 30 s. Seconds after the senders start.
DEFAULT_FAULTS = (
    "kill:ingest@5,kill:scheduler@12,kill:forwarder@18,kill:probe@24,kill:catalog@30,"
    "term:nats@36,kill:ingest@46,stop:node2@52+30,kill:nats@90"
)

_FAULT = re.compile(r"^(kill|term|stop):([A-Za-z0-9_.-]+)@(\d+(?:\.\d+)?)(%?)(?:\+(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Fault:
    action: str  # kill (SIGKILL), term (SIGTERM), stop (held down for ``duration`` s, then started)
    target: str  # a service, "nats", or a node id
    at: float  # seconds after the senders start, or percent of the corpus acknowledged if ``percent``
    duration: float = 0.0
    percent: bool = False

    def __str__(self) -> str:
        return f"{self.action}:{self.target}@{self.at:g}{'%' if self.percent else ''}" + (
            f"+{self.duration:g}" if self.duration else ""
        )


def parse_faults(text: str) -> list[Fault]:
    """``kill:ingest@5,term:nats@30%,stop:node2@40+30`` -> faults in order.

    ``@N`` is N seconds after the senders start, ``@N%`` once N percent of the
    corpus is acknowledged (so every fault lands while senders send, whatever
    the machine's speed); ``+D`` keeps a stopped process down for D seconds.
    """
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FAULT.match(part)
        if not m:
            raise ValueError(f"fault {part!r}: expected kill|term|stop:TARGET@SECONDS[%][+DURATION]")
        action, target, at, duration = m.group(1), m.group(2), float(m.group(3)), float(m.group(5) or 0)
        if action == "stop" and not duration:
            raise ValueError(f"fault {part!r}: stop needs +DURATION")
        faults.append(Fault(action, target, at, duration, percent=bool(m.group(4))))
    return faults


@dataclass
class Plan:
    instances: int = 2000
    instances_per_series: int = 10
    series_per_study: int = 2
    senders: int = 3
    faults: list[Fault] = field(default_factory=lambda: parse_faults(DEFAULT_FAULTS))
    seed: int = 0
    send_timeout_s: float = 900.0
    settle_timeout_s: float = 600.0
    batch: int = 200  # files per storescu association


@dataclass
class Report:
    instances: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    split: int = 0
    split_excused: int = 0
    dead_lettered: int = 0
    received_duplicated: int = 0
    catalog_mismatch: int = 0
    settled: bool = False
    send_s: float = 0.0
    settle_s: float = 0.0
    down_nodes: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [
            f"chaos: {self.instances} instances, {self.acknowledged} acknowledged "
            f"({self.unacknowledged} never acknowledged) in {self.send_s:.1f}s",
            f"faults: {', '.join(self.faults) or '-'}",
            f"restarts: {', '.join(self.restarts) or '-'}",
            f"nodes that went down: {', '.join(self.down_nodes) or '-'}",
            f"lost {self.lost}  duplicated {self.duplicated}  split {self.split} "
            f"(+{self.split_excused} by a node that went down)  dead-lettered {self.dead_lettered}",
            f"received twice {self.received_duplicated}  catalog disagrees {self.catalog_mismatch}",
            f"settled: {'yes' if self.settled else 'NO'} after {self.settle_s:.1f}s "
            f"(the audit then unchanged for the forwarder's ack_wait + 5 s)",
        ]
        for kind, uids in sorted(self.examples.items()):
            if uids:
                lines.append(f"  {kind}: {' '.join(uids[:5])}")
        return "\n".join(lines) + "\n"


@dataclass
class Corpus:
    files: dict[str, Path]  # SOP Instance UID -> file
    study_of: dict[str, str]  # SOP Instance UID -> Study Instance UID
    by_study: dict[str, list[str]]


def make_corpus(dest: Path, plan: Plan) -> Corpus:
    """Synthetic 16x16 studies (small, so the run measures routing, not bytes); UIDs depend on the seed."""
    per_study = plan.instances_per_series * plan.series_per_study
    studies = max(1, -(-plan.instances // per_study))
    paths = generate_studies(
        dest,
        studies=studies,
        series_per_study=plan.series_per_study,
        instances_per_series=plan.instances_per_series,
        seed=plan.seed,
        rows=16,
        cols=16,
    )
    files, study_of, by_study = {}, {}, defaultdict(list)
    for path in paths:
        study, series, instance = int(path.parent.parent.name), int(path.parent.name), int(path.stem)
        sop, study_uid = _uid(plan.seed, "instance", study, series, instance), _uid(plan.seed, "study", study)
        files[sop] = path
        study_of[sop] = study_uid
        by_study[study_uid].append(sop)
    return Corpus(files, study_of, dict(by_study))


# ---------------------------------------------------------------------------------------------- senders


def storescu_batch(cfg: Config, paths: list[Path], calling_ae: str) -> set[Path]:
    """Send ``paths`` on one association; the files storescu got a success (or warning) status for."""
    argv = [
        str(ls.DCMTK_BIN / "storescu"),
        "-v",
        "-aet",
        calling_ae,
        "-aec",
        cfg.ingest.ae_title,
        "-R",
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "60",
        "127.0.0.1",
        str(cfg.ingest.port),
        *map(str, paths),
    ]
    try:
        out = subprocess.run(argv, env=ls.dicom_env(), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return set()
    acked: set[Path] = set()
    current: Path | None = None
    for line in (out.stdout + out.stderr).splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (" in line and current is not None:
            status = line.split("Received Store Response (", 1)[1]
            if status.startswith(("Success", "Warning")):
                acked.add(current)
            current = None
    return acked


def sender(
    cfg: Config, name: str, paths: list[Path], acked: set[Path], lock: threading.Lock, deadline: float, batch: int
) -> None:
    """Send until everything is acknowledged: what was not (refused, aborted, ingest down) goes again."""
    remaining = list(paths)
    failures = 0
    while remaining and time.monotonic() < deadline:
        chunk = remaining[:batch]
        got = storescu_batch(cfg, chunk, name)
        with lock:
            acked.update(got)
        remaining = [p for p in remaining if p not in got]
        failures = 0 if got else failures + 1
        if not got:
            # A modality's retry interval, not a readiness wait: ingest may be restarting.
            time.sleep(min(0.2 * 2**failures, 3.0))


# ---------------------------------------------------------------------------------------------- faults


def run_faults(
    sup: ls.Supervisor,
    faults: list[Fault],
    started: float,
    progress: Callable[[], float],
    sending: threading.Event,
    stop: threading.Event,
    timeline: list[str],
    out: IO[str],
) -> None:
    """Run each fault when due (time or progress; a progress fault not reached when sending ends runs then)."""

    def note(text: str) -> None:
        stamp = f"{time.monotonic() - started:6.1f}s {100 * progress():3.0f}%"
        timeline.append(f"{stamp} {text}")
        out.write(f"chaos: {stamp} {text}\n")
        out.flush()

    def due(fault: Fault) -> bool:
        if fault.percent:
            return progress() * 100 >= fault.at or not sending.is_set()
        return time.monotonic() - started >= fault.at

    pending = list(faults)
    releases: list[tuple[float, Fault]] = []
    while (pending or releases) and not stop.is_set():
        for release in [r for r in releases if time.monotonic() >= r[0]]:
            releases.remove(release)
            sup.release(release[1].target, wait=False)
            note(f"started {release[1].target} again")
        for fault in [f for f in pending if due(f)]:
            pending.remove(fault)
            if fault.action == "stop":
                proc = sup.hold(fault.target)
                t0 = time.monotonic()
                proc.stop()
                note(f"stopped {fault.target} (took {time.monotonic() - t0:.1f}s) for {fault.duration:g}s")
                releases.append((time.monotonic() + fault.duration, fault))
                continue
            sig = signal.SIGKILL if fault.action == "kill" else signal.SIGTERM
            try:
                os.kill(sup.pid(fault.target), sig)
                note(f"{'kill -9' if sig == signal.SIGKILL else 'SIGTERM'} {fault.target}")
            except ProcessLookupError:
                note(f"{fault.target} was not running")
        stop.wait(0.05)
    # Whatever is still held (the run ended early) comes back before the audit.
    for _, fault in releases:
        sup.release(fault.target, wait=False)


# ---------------------------------------------------------------------------------------------- audit


def node_holdings(node: NodeConfig) -> set[str] | None:
    """Every SOP Instance UID on the node, from one /tools/find; None if it does not answer."""
    client = OrthancClient(node, timeout=60.0)
    try:
        found = client.post_json("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {f["MainDicomTags"]["SOPInstanceUID"] for f in found}
    except (OrthancError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def catalog_get(cfg: Config, path: str, token: str) -> Any:
    url = f"http://{cfg.catalog.http_host}:{cfg.catalog.http_port}{path}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as rsp:
        return json.loads(rsp.read())


@dataclass
class LogFacts:
    received: Counter
    down: set[str]
    last_placement: dict[str, str]  # sop -> "placed" | "dead_lettered"


async def _read_log(cfg: Config) -> LogFacts:
    from shared import events as ev
    from shared.bus import Bus

    bus = await asyncio.wait_for(Bus.connect(cfg.nats, "switchyard-chaos"), 10)
    received: Counter = Counter()
    down: set[str] = set()
    last: dict[str, str] = {}
    try:
        async for d in bus.replay(">"):
            e = d.event
            if isinstance(e, ev.InstanceReceivedV1):
                received[e.sop_instance_uid] += 1
            elif isinstance(e, ev.InstancePlacedV1):
                last[e.sop_instance_uid] = "placed"
            elif isinstance(e, ev.InstanceDeadLetteredV1):
                last[e.sop_instance_uid] = "dead_lettered"
            elif isinstance(e, ev.NodeStateChangedV1) and e.state == ev.NodeState.DOWN:
                down.add(e.node_id)
    finally:
        await bus.close()
    return LogFacts(received, down, last)


def audit(
    cfg: Config, corpus: Corpus, acked: set[str], report: Report, really_down: set[str], token: str
) -> tuple | None:
    """Fill the counts of ``report``; returns a fingerprint to compare passes, or None if a source is down."""
    holdings = {}
    for node in cfg.nodes:
        held = node_holdings(node)
        if held is None:
            return None
        holdings[node.id] = held
    try:
        facts = asyncio.run(_read_log(cfg))
    except Exception:  # noqa: BLE001 - NATS restarting: try the next pass
        return None
    catalog_nodes: dict[str, set[str]] = {}
    catalog_states: dict[str, set[str]] = defaultdict(set)
    try:
        for study in sorted({corpus.study_of[s] for s in acked}):
            for row in catalog_get(cfg, f"/api/instances?study_uid={study}&limit=10000", token):
                sop = row["sop_instance_uid"]
                catalog_states[sop].add(row["state"] or "")
                if row["state"] in ("forwarded", "verified"):
                    catalog_nodes.setdefault(sop, set()).add(row["node_id"])
    except (urllib.error.URLError, OSError, ValueError):
        return None

    where: dict[str, set[str]] = defaultdict(set)
    for node_id, held in holdings.items():
        for sop in held & acked:
            where[sop].add(node_id)
    lost: list[str] = []
    dup: list[str] = []
    dead: list[str] = []
    mismatch: list[str] = []
    for sop in sorted(acked):
        nodes = where.get(sop, set())
        if len(nodes) > 1:
            dup.append(sop)
        if not nodes:
            (dead if facts.last_placement.get(sop) == "dead_lettered" else lost).append(sop)
        elif catalog_nodes.get(sop, set()) != nodes:
            mismatch.append(sop)
    split: list[str] = []
    excused: list[str] = []
    for study in sorted({corpus.study_of[s] for s in acked}):
        nodes = set().union(*(where.get(s, set()) for s in corpus.by_study[study]))
        if len(nodes) > 1:
            # Only a node the run really took down excuses a split, not one merely marked down.
            (excused if len(nodes - (really_down & facts.down)) <= 1 else split).append(study)
    report.acknowledged = len(acked)
    report.lost, report.duplicated, report.dead_lettered = len(lost), len(dup), len(dead)
    report.split, report.split_excused, report.catalog_mismatch = len(split), len(excused), len(mismatch)
    report.received_duplicated = sum(1 for s in acked if facts.received[s] > 1)
    report.down_nodes = sorted(facts.down)
    report.examples = {
        "lost": lost[:5],
        "duplicated": dup[:5],
        "split": split[:5],
        "dead_lettered": dead[:5],
        "catalog_mismatch": mismatch[:5],
    }
    return (
        tuple(lost),
        tuple(dup),
        tuple(dead),
        tuple(mismatch),
        tuple(split),
        tuple(sorted((k, len(v)) for k, v in holdings.items())),
    )


def settle(
    cfg: Config,
    corpus: Corpus,
    acked: set[str],
    report: Report,
    timeout: float,
    out: IO[str],
    really_down: set[str],
    quiet_s: float,
    token: str,
) -> None:
    """Audit until nothing is lost (in flight) and the audit has not changed for ``quiet_s``, or the timeout.

    ``quiet_s`` should exceed the forwarder's ack_wait: a delivery whose ack was
    lost comes back only then, and may still make a duplicate.
    """
    started = time.monotonic()
    previous, since = None, 0.0
    while True:
        fingerprint = audit(cfg, corpus, acked, report, really_down, token)
        elapsed = time.monotonic() - started
        if fingerprint is not None:
            if fingerprint != previous or report.lost:
                previous, since = fingerprint, elapsed
                out.write(
                    f"chaos: settling ({elapsed:.0f}s): lost {report.lost} duplicated {report.duplicated} "
                    f"dead-lettered {report.dead_lettered} catalog disagrees {report.catalog_mismatch}\n"
                )
                out.flush()
            elif elapsed - since >= quiet_s:
                report.settled, report.settle_s = True, since
                return
        if elapsed > timeout:
            report.settle_s = elapsed
            return
        time.sleep(2.0)


# ---------------------------------------------------------------------------------------------- run


def run(cfg: Config, data_dir: Path, plan: Plan, monitor_port: int, out: IO[str] = sys.stdout) -> Report:
    """Start the stack under a supervisor, send under faults, audit; the stack is stopped at the end."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # The audit's own NATS client would print its reconnect warnings between the report's lines.
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    report = Report(faults=[str(f) for f in plan.faults])
    targets = {"nats", *ls.SERVICES, *(n.id for n in cfg.nodes)}
    unknown = [f.target for f in plan.faults if f.target not in targets]
    if unknown:
        raise ValueError(f"unknown fault targets: {', '.join(unknown)} (known: {', '.join(sorted(targets))})")
    out.write(f"chaos: writing {plan.instances} instances under {data_dir / 'corpus'}\n")
    out.flush()
    corpus = make_corpus(data_dir / "corpus", plan)
    report.instances = len(corpus.files)
    cfg, creds = natsauth.secure_local(cfg, data_dir)  # the bus authenticated, as deployed
    cfg, _ = ls.catalog_credentials(cfg, data_dir)  # the audit reads the catalog as an operator
    token = ls.read_catalog_tokens(data_dir)["operator"]
    config_path = ls.write_config(cfg, data_dir / "switchyard.toml")
    with open(data_dir / "supervisor.log", "a") as sup_log:
        sup = ls.start_stack(cfg, data_dir, config_path, monitor_port, log=sup_log, creds=creds)
        stop = threading.Event()
        try:
            sup.start_thread(stop)
            studies = sorted(corpus.by_study)
            shares: list[list[Path]] = [[] for _ in range(plan.senders)]
            for i, study in enumerate(studies):
                shares[i % plan.senders].extend(corpus.files[s] for s in sorted(corpus.by_study[study]))
            acked_paths: set[Path] = set()
            lock = threading.Lock()
            started = time.monotonic()
            deadline = started + plan.send_timeout_s
            out.write(f"chaos: {plan.senders} storescu senders, faults {', '.join(report.faults) or '-'}\n")
            out.flush()
            timeline: list[str] = []
            sending = threading.Event()
            sending.set()

            def progress() -> float:
                with lock:
                    return len(acked_paths) / max(1, report.instances)

            fault_thread = threading.Thread(
                target=run_faults, args=(sup, plan.faults, started, progress, sending, stop, timeline, out), daemon=True
            )
            fault_thread.start()
            senders = [
                threading.Thread(
                    target=sender,
                    args=(cfg, f"CHAOS{i + 1}", share, acked_paths, lock, deadline, plan.batch),
                    daemon=True,
                )
                for i, share in enumerate(shares)
            ]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            report.send_s = time.monotonic() - started
            sending.clear()
            # Every fault runs even if sending finished first: the audit must see its effects.
            fault_thread.join()
            # Everything up again before the audit (a restart may be in its backoff).
            ls.wait_until(
                lambda: all(p.popen.poll() is None for p in sup.procs.values()), 120, "every process running again"
            )
            sop_of = {p: s for s, p in corpus.files.items()}
            acked = {sop_of[p] for p in acked_paths}
            report.unacknowledged = report.instances - len(acked)
            out.write(f"chaos: {len(acked)} acknowledged in {report.send_s:.1f}s; auditing\n")
            out.flush()
            settle(
                cfg,
                corpus,
                acked,
                report,
                plan.settle_timeout_s,
                out,
                {f.target for f in plan.faults if f.target in {n.id for n in cfg.nodes}},
                quiet_s=cfg.forwarder.ack_wait_s + 5.0,
                token=token,
            )
            report.timeline = timeline
            report.restarts = [f"{name} (exit {code})" for _, name, code in sup.restarts]
        finally:
            stop.set()
            sup.stop_all()
    out.write(report.text())
    out.flush()
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)


def config_with_ports(cfg: Config, port: Any) -> Config:
    """``cfg`` with every listening port taken from ``port()`` (free loopback ports)."""
    s = msgspec.structs
    nodes = []
    for node in cfg.nodes:
        nodes.append(s.replace(node, dicom_port=port(), rest_url=f"http://127.0.0.1:{port()}"))
    return s.replace(
        cfg,
        nats=s.replace(cfg.nats, url=f"nats://127.0.0.1:{port()}"),
        ingest=s.replace(cfg.ingest, port=port(), metrics_port=port()),
        scheduler=s.replace(cfg.scheduler, metrics_port=port()),
        forwarder=s.replace(cfg.forwarder, metrics_port=port()),
        probe=s.replace(cfg.probe, metrics_port=port(), qr_port=port()),
        catalog=s.replace(cfg.catalog, metrics_port=port(), http_port=port()),
        nodes=nodes,
    )
