"""The Lua auto-router baseline on its own: `just bench lua_router`.

The placement bench compares Switchyard with an Orthanc Lua auto-router
(OnStoredInstance -> SendToModality round robin). That router's cost per
image grows with the length of the burst it is routing: Orthanc queues each
SendToModality into a job that stays open while instances keep arriving, and
every new one costs more. So the Lua baseline, and the ratio against it,
depend on how many images arrive back to back. This bench shows it: the same
router takes bursts of N images, first back to back, then each after a pause
long enough for Orthanc to close the job.

Flags: --images=N per burst (default 250), --rounds=K bursts per series
(default 4), --pause=S seconds between paused bursts (default 15).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.bench.placement import counts, cpu_seconds, lua_router, timed_send
from tests.fixtures.servers import new_orthanc_node


def _flag(argv: list[str], name: str, default: float) -> float:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return float(arg.split("=", 1)[1])
    return default


def main(argv: list[str]) -> int:
    images = int(_flag(argv, "images", 40 if "--quick" in argv else 250))
    rounds = int(_flag(argv, "rounds", 2 if "--quick" in argv else 4))
    pause = _flag(argv, "pause", 15.0)
    base = Path(tempfile.mkdtemp(prefix="switchyard-bench-lua-"))
    nodes = [new_orthanc_node(i, base / "nodes") for i in (1, 2, 3)]
    router = None
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for n in nodes:
            n.start()
        router, proc = lua_router(base / "router", nodes)
        seed = int(time.time())
        for series, wait in (("back to back", 0.0), (f"after {pause:.0f} s pauses", pause)):
            results[series] = []
            for r in range(rounds):
                corpus = base / f"corpus-{len(results)}-{r}"
                files = generate_studies(
                    corpus,
                    studies=max(1, images // 10),
                    series_per_study=1,
                    instances_per_series=10,
                    seed=seed + 100 * len(results) + r,
                )
                if wait:
                    time.sleep(wait)  # the gap itself is what is measured, not a readiness wait
                start_count, start_cpu = counts(nodes), cpu_seconds(proc.popen.pid)
                took = timed_send(
                    lambda corpus=corpus: ls.storescu(
                        "127.0.0.1", router.node.dicom_port, router.node.ae_title, [corpus], extra=["+sd", "+r"]
                    ),
                    lambda start_count=start_count, files=files: counts(nodes) - start_count >= len(files),
                )
                cpu = cpu_seconds(proc.popen.pid) - start_cpu
                results[series].append(
                    {"img_per_s": round(len(files) / took, 1), "cpu_ms_per_img": round(cpu / len(files) * 1000, 1)}
                )
                print(
                    f"lua router, {series}, burst {r + 1}/{rounds} of {len(files)} images: "
                    f"{len(files) / took:.1f} img/s, router CPU {cpu / len(files) * 1000:.1f} ms/img",
                    flush=True,
                )
        print(json.dumps({"images_per_burst": images, "pause_s": pause, "bursts": results}))
        return 0
    finally:
        if router is not None:
            router.stop()
        for n in nodes:
            n.stop()
