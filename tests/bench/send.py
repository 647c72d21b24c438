"""`switchyard send` next to DCMTK storescu, and what recording a re-send costs ingest.

    just bench send              # 1,000 instances per run
    just bench send --quick      # 200

One ingest (NATS with auth, file-backed JetStream, local blobs), no nodes. Each
sender sends a fresh corpus (new UIDs) over one association; wall clock of the
whole command (process start included). Then the first corpus is sent again by
`switchyard send`: every instance is already held, so each answer also waits for
an ``instance.resent.v1`` publish (the audit record). Runs alternate
storescu / send twice so load drifts hit both.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _switchyard_send(config: Path, folder: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "switchyard",
            "--config",
            str(config),
            "send",
            "-q",
            "--calling-ae",
            "BENCH",
            str(folder),
        ],
        cwd=ls.REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return time.monotonic() - started


def _storescu(port: int, called: str, folder: Path) -> float:
    started = time.monotonic()
    result = ls.storescu("127.0.0.1", port, called, [folder], calling_ae="BENCH", extra=["+sd", "+r"], timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    count = 200 if "--quick" in argv else 1000
    per_series = 50
    work = Path(tempfile.mkdtemp(prefix="bench-send-"))
    corpora = []
    for seed in range(4):
        folder = work / f"c{seed}"
        generate_studies(
            folder,
            studies=count // (2 * per_series),
            series_per_study=2,
            instances_per_series=per_series,
            seed=8100 + seed,
        )
        corpora.append(folder)
    n = sum(1 for _ in corpora[0].rglob("*.dcm"))
    size = next(corpora[0].rglob("*.dcm")).stat().st_size
    print(f"{n} instances per run, {size} bytes each; commit {_commit()}; load {_load()}", flush=True)
    stack = make_stack(work / "stack", [], services=("ingest",))
    rows = []
    try:
        port, called = stack.cfg.ingest.port, stack.cfg.ingest.ae_title
        for i, folder in enumerate(corpora):
            tool = "storescu" if i % 2 == 0 else "switchyard send"
            load = _load()
            s = _storescu(port, called, folder) if i % 2 == 0 else _switchyard_send(stack.config_path, folder)
            rows.append((tool, "first send", n / s, s, load))
        load = _load()
        s = _switchyard_send(stack.config_path, corpora[1])
        rows.append(("switchyard send", "re-send (resent events)", n / s, s, load))
    finally:
        stack.close()
    print(f"{'sender':<16} {'what':<24} {'inst/s':>8} {'seconds':>8} load")
    for tool, what, r, s, load in rows:
        print(f"{tool:<16} {what:<24} {r:>8.1f} {s:>8.2f} {load}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ls.REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
