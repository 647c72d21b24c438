"""`switchyard status`: what the console's overview page shows, as text (GET /api/overview).

The token comes from $SWITCHYARD_TOKEN or --token-file (the config holds only
token digests); the URL from --url or the config's catalog address.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared.config import Config


def catalog_url(cfg: Config) -> str:
    host = cfg.catalog.http_host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - a listen address, not ours
    scheme = "https" if cfg.catalog.tls_cert_file else "http"
    return f"{scheme}://{host}:{cfg.catalog.http_port}"


def fetch(url: str, token: str, cafile: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url.rstrip("/") + "/api/overview", headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as rsp:
        data: dict[str, Any] = json.loads(rsp.read())
        return data


def _v(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> str:
    """The overview as the page shows it: totals, nodes, consumer lag, pipeline per minute, recent activity."""
    t, cat = data["totals"], data["catalog"]
    lines = [
        f"Switchyard at {data['generated_at']}",
        f"instances {t['instances']}  studies {t['studies']}  open dead letters {data['dead_letters']}"
        f"  verification failures {data['verification_failures']}  catalog lag {_v(cat['lag'])} events",
        "",
        f"{'node':<12} {'state':<9} {'score':>8} {'pending':>7} {'rtt':>9} {'cpu':>5} {'disk free':>10}"
        f" {'placed/min':>10} {'queue':>6} {'verified':>8}  last heartbeat",
    ]
    for n in data["nodes"]:
        load = n.get("load") or {}
        free = load.get("disk_free_bytes")
        gib = None if free is None else free / 2**30
        lines.append(
            f"{n['node_id']:<12} {_v(n['state']):<9} {_v(n.get('score'), '{:.3f}'):>8}"
            f" {_v(load.get('pending_jobs')):>7} {_v(load.get('rtt_ms'), '{:.1f}ms'):>9}"
            f" {_v(load.get('cpu_percent'), '{:.0f}%'):>5} {_v(gib, '{:.1f}GiB'):>10}"
            f" {n.get('placements_per_minute', 0):>10} {n.get('forward_queue', 0):>6}"
            f" {_v(n.get('verified_rate'), '{:.0%}'):>8}  {n.get('last_heartbeat') or 'never'}"
        )
    consumers = data.get("consumers")
    lines += ["", f"{'consumer':<24} {'pending':>8} {'ack pending':>11} {'redelivered':>11}"]
    if consumers is None:
        lines.append("  (unknown: NATS did not answer)")
    for c in consumers or []:
        if c["present"]:
            lines.append(
                f"{c['durable']:<24} {c['num_pending']:>8} {c['num_ack_pending']:>11} {c['num_redelivered']:>11}"
            )
        else:
            lines.append(f"{c['durable']:<24} {'absent':>8}")
    stages = data.get("pipeline_per_minute") or {}
    lines += ["", "last minute: " + ("  ".join(f"{k} {v}" for k, v in sorted(stages.items())) or "no events")]
    if data.get("recent"):
        lines += ["", "recent activity:"]
        for r in data["recent"][:10]:
            lines.append(
                f"  {r['seq']:>8} {r['at']} {r['type']:<34} {r['node_id'] or '':<10} {r['sop_instance_uid'] or ''}"
            )
    return "\n".join(lines)


def cmd_status(args: Any, cfg: Config) -> int:
    token = os.environ.get("SWITCHYARD_TOKEN", "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not token:
        print("switchyard: set $SWITCHYARD_TOKEN or --token-file (a catalog token, viewer is enough)", file=sys.stderr)
        return 2
    url = args.url or catalog_url(cfg)
    try:
        data = fetch(url, token, args.cafile)
    except urllib.error.HTTPError as exc:
        print(f"switchyard: the catalog at {url} answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"switchyard: the catalog at {url} is not reachable ({exc})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(render(data))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="what the console's overview shows: nodes, pipeline, dead letters, lag")
    p.add_argument("--url", help="catalog URL (default: from the config's catalog section)")
    p.add_argument("--token-file", help="file holding a catalog token (default: $SWITCHYARD_TOKEN)")
    p.add_argument("--cafile", help="CA bundle for an HTTPS catalog")
    p.add_argument("--json", action="store_true", help="print the /api/overview JSON")
    p.set_defaults(func=cmd_status)
