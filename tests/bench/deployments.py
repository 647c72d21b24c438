"""Deployments benchmark: `just bench deployments` (or `python -m tests.bench deployments`).

Back to back on this machine, the same corpus size in every leg (issue #16):

  local    the local stack (`make_stack`), one nats-server, blobs on the filesystem
  local-s3 the same with its blobs on moto's S3 server, as compose's offline stand-in
           for MinIO keeps them (tells the S3 hops apart from the containers)
  cluster  the same on a 3-server JetStream cluster on loopback, streams and KV R3
  compose  deploy/compose.yaml in real containers (deploy/offline/harness.py, the
           compose test's stack), storescu run inside the engine's network namespace
  kills    on a cluster stack: SIGKILL of the events stream's leader while a sender
           keeps sending, to the first `forwarded` event after it (the cluster test's
           helpers), then the member rejoins; --kills times

Rate, the same in every leg: images / seconds from the start of one storescu
association (the whole corpus, +sd +r) until every image is stored on the three
Orthanc nodes (their /statistics, polled every 20 ms, as `bench placement` times
it) — i.e. received -> forwarded. Not verified: the probe verifies on its own
schedule after delivery (compose: its default interval), which would time the
probe's poll period rather than the route.

Each stack (a new one per leg; one leg's stack serves its consecutive rounds) first
gets 20 untimed images. Flags: --images=N (default 1000), --rounds=N (default 1; the rate legs in turn,
reversed every other round so that compose's containers serve two rounds back to
back), --legs=local,local-s3,cluster,compose,kills (default all), --kills=N (default 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from shared.config import Config
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.bench.placement import counts, nodes_live, probe_every_second, timed_send
from tests.fixtures.cluster import Sender, kill_and_measure, rejoin
from tests.fixtures.servers import OrthancNode, Stack, make_stack, new_orthanc_node, stream_leader
from tests.fixtures.util import free_port, poll, wait_for

RATE_LEGS = ("local", "local-s3", "cluster", "compose")
LEGS = (*RATE_LEGS, "kills")
LABELS = {
    "local": "local stack, 1 nats-server",
    "local-s3": "local stack, 1 nats-server, blobs on moto S3",
    "cluster": "local stack, 3-server JetStream cluster (R3)",
    "compose": "compose stack, real containers",
}


class Options:
    def __init__(self, images: int = 1000, rounds: int = 1, legs: tuple[str, ...] = LEGS, kills: int = 3) -> None:
        self.images, self.rounds, self.legs, self.kills = images, rounds, legs, kills


def parse(argv: list[str]) -> Options | str:
    """The options of ``argv``, or what is wrong with them."""
    o = Options()
    for arg in argv:
        name, _, value = arg.partition("=")
        try:
            if name == "--images":
                o.images = int(value)
            elif name == "--rounds":
                o.rounds = int(value)
            elif name == "--kills":
                o.kills = int(value)
            elif name == "--legs":
                o.legs = tuple(v for v in value.split(",") if v)
            else:
                return f"unknown flag {arg}"
        except ValueError:
            return f"{name} takes a whole number, not {value!r}"
    if o.images < 10 or o.rounds < 1 or o.kills < 1:
        return "--images >= 10, --rounds >= 1, --kills >= 1"
    if not o.legs or not set(o.legs) <= set(LEGS):
        return f"--legs: one or more of {','.join(LEGS)}"
    return o


def plan(legs: tuple[str, ...], rounds: int) -> list[tuple[str, int]]:
    """(leg, round) in run order: the rate legs in turn, reversed every other round (the drift of a
    shared machine falls on no one leg, and the last leg of a round is the first of the next: its
    stack serves both); the kills last."""
    rate = [leg for leg in RATE_LEGS if leg in legs]
    steps = [(leg, r) for r in range(rounds) for leg in (rate if r % 2 == 0 else rate[::-1])]
    return steps + ([("kills", 0)] if "kills" in legs else [])


def spread(xs: list[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(xs), statistics.median(xs), max(xs)


def table(rates: dict[str, list[float]], failed: dict[str, str], resumes: list[float]) -> str:
    """The figures as a Markdown table: each rate leg's rounds and median, next to the local stack's."""
    base = statistics.median(rates["local"]) if rates.get("local") else None
    rows = ["| leg | img/s, rounds | img/s, median | / local (medians) |", "| --- | --- | --- | --- |"]
    for leg in RATE_LEGS:
        if leg in failed:
            rows.append(f"| {LABELS[leg]} | failed: {failed[leg]} | | |")
        elif rates.get(leg):
            med = statistics.median(rates[leg])
            ratio = f"{med / base:.2f}x" if base else ""
            rows.append(f"| {LABELS[leg]} | {', '.join(f'{x:.1f}' for x in rates[leg])} | {med:.1f} | {ratio} |")
    if "kills" in failed:
        rows.append(f"| resume after SIGKILL of the stream leader | failed: {failed['kills']} | | |")
    elif resumes:
        lo, med, hi = spread(resumes)
        rows.append(
            f"| resume after SIGKILL of the stream leader, s | {', '.join(f'{g:.2f}' for g in resumes)} "
            f"| min {lo:.2f}, median {med:.2f}, max {hi:.2f} | |"
        )
    return "\n".join(rows)


# storescu and the count of the Orthanc containers, both inside the engine's namespace: the
# same timing as `timed_send` (the send, then the nodes' counts every 20 ms).
_TIMED_SEND = """
import base64, json, subprocess, sys, time, urllib.request
n, auth, ports, argv = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
def count():
    total = 0
    for port in ports:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/statistics")
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        total += int(json.load(urllib.request.urlopen(req, timeout=5))["CountInstances"])
    return total
before = count()
started = time.perf_counter()
out = subprocess.run(argv, capture_output=True, text=True)
if out.returncode != 0:
    sys.exit("storescu exited %d: %s" % (out.returncode, out.stderr[-2000:]))
deadline = time.monotonic() + 600
while count() - before < n:
    if time.monotonic() > deadline:
        sys.exit("not every image stored within 600 s")
    time.sleep(0.02)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def compose_timed_send(files: list[Path], corpus: Path) -> float:
    """Seconds to send ``corpus`` to the compose stack's ingest until the containers hold every image."""
    from tests.fixtures.compose import ORTHANC_AUTH, ORTHANC_PORTS, run_in

    storescu = [str(ls.DCMTK_BIN / "storescu"), "-aet", "STORESCU", "-aec", "SWITCHYARD", "-R", "+sd", "+r"]
    out = run_in(
        [
            sys.executable,
            "-c",
            _TIMED_SEND,
            str(len(files)),
            ":".join(ORTHANC_AUTH),
            json.dumps(list(ORTHANC_PORTS.values())),
            *storescu,
            "127.0.0.1",
            "11112",
            str(corpus),
        ],
        timeout=900,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


class Deployment:
    """The stack of the current leg, kept while the next step runs on the same leg."""

    def __init__(self, base: Path, nodes: list[OrthancNode]) -> None:
        self.base, self.nodes = base, nodes
        self.leg: str | None = None
        self.stack: Stack | None = None
        self.exits = contextlib.ExitStack()
        self.made = 0

    def enter(self, leg: str) -> None:
        """Start ``leg``'s stack unless it runs already, and send it a small untimed corpus, so that
        no leg's first timed round pays for cold connections and caches that the others do not."""
        if leg == self.leg or (leg == "kills" and self.leg == "cluster"):
            return
        self.leave()
        self.made += 1
        if leg == "compose":
            from tests.fixtures.compose import compose_stack

            self.exits.enter_context(compose_stack(self.base))
        else:
            then = lambda c: c  # noqa: E731
            if leg == "local-s3":
                from tests.fixtures.s3 import moto_endpoint, s3_blob_config, start_moto

                port, log = free_port(), self.base / f"moto-{self.made}.log"
                self.exits.callback(start_moto(port, log).stop, 10)
                blobs = s3_blob_config(moto_endpoint(port, log), "bench-deployments")

                def then(c: Config) -> Config:
                    return msgspec.structs.replace(c, blobs=blobs)

            self.stack = make_stack(
                self.base / f"stack-{self.made}-{leg}",
                self.nodes,
                nats_cluster=3 if leg in ("cluster", "kills") else 0,
                configure=functools.partial(probe_every_second, then=then),
            )
            wait_for(functools.partial(nodes_live, self.stack, self.nodes), timeout=60, what="nodes live")
        self.leg = leg
        warm = self.base / f"warmup-{self.made}"
        files = generate_studies(warm, studies=2, series_per_study=1, instances_per_series=10, seed=self.made)
        if leg == "compose":
            compose_timed_send(files, warm)
        else:
            stack = self.stack
            assert stack is not None
            before = counts(self.nodes)
            timed_send(
                lambda: stack.send([warm], extra=["+sd", "+r"]), lambda: counts(self.nodes) - before >= len(files)
            )

    def leave(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None
        self.exits.close()
        self.exits = contextlib.ExitStack()
        self.leg = None


def flowing(sender: Sender) -> bool:
    """The sender got a few batches through."""
    return sender.sent >= 5


async def resume_times(stack: Stack, base: Path, kills: int, seed: int) -> list[float]:
    """``kills`` times: a sender sending, SIGKILL of the stream leader, seconds to the first
    `forwarded` event after it; the member rejoins and catches up before the next."""
    gaps = []
    for k in range(kills):
        files = generate_studies(
            base / f"trickle-{k}", studies=10, series_per_study=1, instances_per_series=30, seed=seed + 5000 + k
        )
        sender = Sender(stack, files)
        sender.start()
        try:
            wait_for(functools.partial(flowing, sender), timeout=60, what="the sender flowing")
            leader = await poll(lambda: stream_leader(stack), timeout=30, what="the stream leader")
            gaps.append(await kill_and_measure(stack, leader, sender))
        finally:
            sender.stop.set()
            sender.join(180)
        print(f"leader kill {k + 1}/{kills}: SIGKILL of {leader}, first forwarded after {gaps[-1]:.2f} s", flush=True)
        await rejoin(stack, leader)
    return gaps


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def main(argv: list[str]) -> int:
    o = parse(argv)
    if isinstance(o, str):
        print(f"bench deployments: {o}", file=sys.stderr)
        return 2
    steps = plan(o.legs, o.rounds)
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"deployments bench, {started_at}, commit {git_commit()}: {o.images} images per rate leg and round, "
        f"{o.rounds} round(s); order: {', '.join(f'{leg}/{r + 1}' for leg, r in steps)}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    base = Path(tempfile.mkdtemp(prefix="switchyard-bench-deployments-"))
    seed = int(time.time())
    studies = o.images // 10
    corpora = {}
    for k, (leg, r) in enumerate(steps):
        if leg in RATE_LEGS:
            corpus = base / f"corpus-{leg}-{r}"
            files = generate_studies(
                corpus, studies=studies, series_per_study=1, instances_per_series=10, seed=seed + k
            )
            corpora[leg, r] = (corpus, files)
    rates: dict[str, list[float]] = {}
    loads: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    resumes: list[float] = []
    nodes = [new_orthanc_node(i, base / "nodes") for i in (1, 2, 3)]
    here = Deployment(base, nodes)
    try:
        for n in nodes:
            n.start()
        for leg, r in steps:
            if leg in failed:
                continue
            try:
                here.enter(leg)
                if leg == "kills":
                    assert here.stack is not None
                    resumes = asyncio.run(resume_times(here.stack, base, o.kills, seed))
                    continue
                corpus, files = corpora[leg, r]
                if leg == "compose":
                    t = compose_timed_send(files, corpus)
                else:
                    stack = here.stack
                    assert stack is not None
                    before = counts(nodes)
                    t = timed_send(
                        lambda stack=stack, corpus=corpus: stack.send([corpus], extra=["+sd", "+r"]),
                        lambda before=before, files=files: counts(nodes) - before >= len(files),
                    )
            except Exception as exc:  # noqa: BLE001 - one leg's environment failing: record it, run the others
                failed[leg] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                print(f"{leg}: failed: {exc}", file=sys.stderr, flush=True)
                here.leave()
                continue
            rates.setdefault(leg, []).append(len(files) / t)
            loads.setdefault(leg, []).append(os.getloadavg()[0])
            print(
                f"{LABELS[leg]} (round {r + 1}/{o.rounds}): {len(files) / t:.1f} img/s ({t:.2f} s for {len(files)}); "
                f"load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    finally:
        here.leave()
        for n in nodes:
            n.stop()
    print(table(rates, failed, resumes))
    print(
        json.dumps(
            {
                "started": started_at,
                "commit": git_commit(),
                "images": o.images,
                "rounds_img_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                "load_1min_after_each_round": {k: [round(x, 2) for x in v] for k, v in loads.items()},
                "resume_after_leader_kill_s": [round(g, 2) for g in resumes],
                "failed": failed,
            }
        )
    )
    return 1 if failed else 0
