"""Heartbeat enrichment: what a node says about itself beyond /statistics and /jobs.

Best effort: /system (version, name) and Orthanc's Prometheus metrics
(/tools/metrics-prometheus, on by default in 1.10; "MetricsEnabled": false
turns it off). Neither decides whether a node is up: a node without metrics
is still a node.
"""

from __future__ import annotations

import logging

from shared.orthanc import OrthancClient, OrthancError

log = logging.getLogger("switchyard.probe.health")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples without labels, ``name value [timestamp]``; comments and labelled samples skipped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or line.startswith("#") or "{" in parts[0]:
            continue
        try:
            samples[parts[0]] = float(parts[1])
        except ValueError:
            continue
    return samples


def enrich(client: OrthancClient) -> dict:
    """Extra heartbeat fields; missing pieces are left at their defaults."""
    extra: dict = {}
    try:
        extra["version"] = str(client.system().get("Version", ""))
    except (OrthancError, ValueError) as exc:
        log.debug("/system unavailable: %s", exc)
    try:
        extra["metrics"] = parse_prometheus(client.get_bytes("/tools/metrics-prometheus").decode(errors="replace"))
    except OrthancError as exc:
        log.debug("Prometheus metrics unavailable: %s", exc)
    return extra
