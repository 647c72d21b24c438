"""The ``switchyard`` command line.

switchyard stack [--demo]   run nats-server, Orthanc nodes and the services locally
switchyard chaos            run the stack under faults, audit every acknowledged instance
switchyard demo             send the demo corpus to a running stack, print placements
switchyard send PATH...     C-STORE files and folders (recursive): per-file status, summary, exit 0 if all acknowledged
switchyard config           print the effective configuration (secrets masked)
switchyard catalog rebuild  replay the log into a fresh catalog file and swap it in (service stopped)
switchyard probe rebuild    the same for the probe's two store files (probe stopped)
switchyard audit export     write the events and instances of a window as Parquet and CSV
switchyard nodes add|drain|undrain|remove|list   change or show membership (node.state events)
switchyard nats credentials|init   generate NATS nkeys (0600); declare streams and KV (admin)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec

from shared.config import Config, ConfigError, load_config
from shared.fsmode import PRIVATE_DIR, private_dir, private_umask
from shared.telemetry import setup_logging
from switchyard import stack as ls
from switchyard.progress import Progress

if TYPE_CHECKING:
    from shared.readmodel.store import ProjectionStore


def with_data_dir(cfg: Config, data_dir: Path) -> Config:
    """Put every relative path of the config under ``data_dir``."""
    data_dir = data_dir.resolve()

    def under(p: str) -> str:
        path = Path(p)
        if path.is_absolute():
            return p
        # Defaults are "var/<thing>": the data dir takes the place of "var".
        if path.parts[:1] == ("var",):
            path = path.relative_to("var")
        return str(data_dir / path)

    return msgspec.structs.replace(
        cfg,
        blobs=msgspec.structs.replace(cfg.blobs, path=under(cfg.blobs.path)),
        ingest=msgspec.structs.replace(cfg.ingest, spool_dir=under(cfg.ingest.spool_dir)),
        forwarder=msgspec.structs.replace(cfg.forwarder, scratch_dir=under(cfg.forwarder.scratch_dir)),
        catalog=msgspec.structs.replace(cfg.catalog, db_path=under(cfg.catalog.db_path)),
        probe=msgspec.structs.replace(
            cfg.probe, db_path=under(cfg.probe.db_path), catalog_db_path=under(cfg.probe.catalog_db_path)
        ),
    )


def catalog_get(cfg: Config, path: str, timeout: float = 5.0, token: str = ""):
    url = f"http://{cfg.catalog.http_host}:{cfg.catalog.http_port}{path}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token or cfg.catalog.token}"})
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        return json.loads(rsp.read())


def wait_delivered(
    cfg: Config,
    index: dict[str, list[str]],
    timeout: float,
    token: str = "",
    stop: threading.Event | None = None,
) -> list[dict]:
    """Poll the catalog until every instance of every study is delivered to a node (progress on stderr)."""
    deadline = time.monotonic() + timeout
    wanted = {study: len(sops) for study, sops in index.items()}
    rows: list[dict] = []
    with Progress("demo: delivered", sum(wanted.values()), "instances") as progress:
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise Stopped("stopped while waiting for the demo's deliveries")
            try:
                rows = [
                    r
                    for r in catalog_get(cfg, "/api/studies?limit=10000", token=token)
                    if r["study_instance_uid"] in wanted
                ]
            except (urllib.error.URLError, OSError, ValueError):
                rows = []
            progress.update(sum(min(r["delivered"], wanted[r["study_instance_uid"]]) for r in rows))
            done = {r["study_instance_uid"] for r in rows if r["delivered"] >= wanted[r["study_instance_uid"]]}
            if done == set(wanted):
                return rows
            time.sleep(0.25)
    missing = sorted(
        set(wanted) - {r["study_instance_uid"] for r in rows if r["delivered"] >= wanted[r["study_instance_uid"]]}
    )
    raise TimeoutError(f"{len(missing)} demo studies not fully delivered within {timeout}s")


class Stopped(Exception):
    """A signal asked the stack to stop while the demo ran."""


def run_demo(
    cfg: Config,
    work_dir: Path,
    out: IO[str] = sys.stdout,
    timeout: float = 300.0,
    stop: threading.Event | None = None,
) -> list[dict]:
    """Send the demo corpus with ``switchyard send`` and print which node got each study."""
    from switchyard import send
    from switchyard.corpus import bundled_test_files, corpus_index, generate_studies

    corpus = work_dir / "demo-corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    files = generate_studies(
        corpus / "generated", studies=6, series_per_study=3, instances_per_series=4, seed=int(time.time())
    )
    files += bundled_test_files(corpus / "pydicom")
    index = corpus_index(files)
    out.write(
        f"demo: sending {len(files)} instances in {len(index)} studies to "
        f"{cfg.ingest.ae_title}@127.0.0.1:{cfg.ingest.port} with switchyard send\n"
    )
    out.flush()
    started = time.monotonic()
    opts = send.Options("127.0.0.1", cfg.ingest.port, cfg.ingest.ae_title, calling_ae="DEMO", quiet=True)
    summary = send.send([str(corpus)], opts, out=out, stop=stop)
    if stop is not None and stop.is_set():
        raise Stopped("stopped while sending the demo")
    if not summary.all_acknowledged:
        raise RuntimeError("the demo corpus was not acknowledged file by file (see the lines above)")
    # The local stack's operator token (catalog-tokens.json in the data dir), else a configured catalog.token.
    rows = wait_delivered(cfg, index, timeout, ls.read_catalog_tokens(work_dir).get("operator", ""), stop)
    elapsed = time.monotonic() - started
    out.write(f"demo: all {len(files)} instances delivered in {elapsed:.1f}s\n\n")
    out.write(f"{'study instance uid':<66} {'modality':<9} {'inst':>5}  node\n")
    for r in sorted(rows, key=lambda r: r["study_instance_uid"]):
        nodes = ",".join(r["nodes"] or []) or "-"
        out.write(f"{r['study_instance_uid']:<66} {(r['modalities'] or '-'):<9} {r['instances']:>5}  {nodes}\n")
    out.flush()
    return rows


def cmd_stack(args: argparse.Namespace, cfg: Config) -> int:
    data_dir = private_dir(Path(args.data_dir).resolve())
    os.chmod(data_dir, PRIVATE_DIR)  # ours: secrets and patient data below (an existing ./var too)
    cfg = ls.open_dev_qr(with_data_dir(cfg, data_dir), sys.stdout)
    cfg, tokens_path = ls.catalog_credentials(cfg, data_dir)
    missing = [name for name, ok in ls.tool_available().items() if not ok]
    if missing:
        print(f"missing: {', '.join(missing)} (run ./bootstrap.sh)", file=sys.stderr)
        return 2
    from shared import natsauth

    cfg, creds = natsauth.secure_local(cfg, data_dir)
    if creds is not None:
        print(f"switchyard: NATS credentials (nkey seeds, 0600) in {creds.directory}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console = sys.stdout
    members = None
    if args.nats_cluster > 1:
        # N servers on 127.0.0.1 (clients nats.url's port+i, routes 6222+i, monitoring nats-monitor-port+i), R3.
        members = ls.cluster_members(args.nats_cluster, base=ls.nats_port(cfg), monitor_base=args.nats_monitor_port)
        cfg = ls.with_cluster(cfg, members)
    config_path = ls.write_config(cfg, data_dir / "switchyard.toml")
    sup = ls.start_stack(cfg, data_dir, config_path, args.nats_monitor_port, console, creds=creds, nats_members=members)
    try:
        # A crashed service (or server) is started again with backoff, as compose would.
        sup.start_thread(stop)
        print(
            f"\nswitchyard: up. DICOM {cfg.ingest.ae_title}@127.0.0.1:{cfg.ingest.port}; catalog "
            f"http://{cfg.catalog.http_host}:{cfg.catalog.http_port}/api/studies (viewer and operator Bearer tokens"
            f" in {tokens_path}, mode 0600); "
            f"nodes {', '.join(f'{n.id} {n.rest_url}' for n in cfg.nodes)}; config {config_path}\n",
            flush=True,
        )
        if args.demo:
            try:
                run_demo(cfg, data_dir, stop=stop)
            except Stopped:
                return 0  # a signal during the demo: stop everything, as at any other time
        if args.exit_after_demo:
            return 0
        print("switchyard: running; a crashed process is restarted; Ctrl-C stops everything", flush=True)
        stop.wait()
        return 0
    finally:
        stop.set()
        sup.stop_all()


def cmd_chaos(args: argparse.Namespace, cfg: Config) -> int:
    from switchyard import chaos

    try:
        plan = chaos.Plan(
            instances=args.instances,
            senders=args.senders,
            faults=chaos.parse_faults(chaos.DEFAULT_FAULTS if args.faults is None else args.faults),
            seed=args.seed if args.seed is not None else int(time.time()),
            settle_timeout_s=args.settle_timeout,
            send_timeout_s=args.send_timeout,
        )
    except ValueError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    cfg = with_data_dir(cfg, data_dir)
    if not args.keep_ports:
        cfg = chaos.config_with_ports(cfg, chaos.free_port)
    missing = [name for name, ok in ls.tool_available().items() if not ok]
    if missing:
        print(f"missing: {', '.join(missing)} (run ./bootstrap.sh)", file=sys.stderr)
        return 2
    try:
        report = chaos.run(cfg, data_dir, plan, args.nats_monitor_port or chaos.free_port())
    except ValueError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(chaos.report_json(report))
    clean = report.settled and not (report.lost or report.duplicated or report.split or report.dead_lettered)
    return 0 if clean else 1


def cmd_send(args: argparse.Namespace, cfg: Config) -> int:
    """Exit 0 only when every file was acknowledged (success or warning); 1 otherwise, 2 for bad usage."""
    from switchyard import send

    icfg = cfg.ingest
    use_tls = args.tls or bool(args.tls_ca or args.tls_cert) or (bool(icfg.tls_cert_file) and not args.no_tls)
    try:
        tls = (
            send.tls_context(args.tls_ca or icfg.tls_ca_file, args.tls_cert or "", args.tls_key or "")
            if use_tls
            else None
        )
    except (OSError, ValueError) as exc:
        print(f"switchyard: TLS setup failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    opts = send.Options(
        host=args.host,
        port=args.port or icfg.port,
        called_ae=args.called_ae or icfg.ae_title,
        calling_ae=args.calling_ae,
        tls=tls,
        retries=args.retries,
        timeout_s=args.timeout,
        quiet=args.quiet,
    )
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"switchyard: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = send.send(args.paths, opts)
    if not summary.items:
        print("switchyard: no files found", file=sys.stderr)
        return 1
    return 0 if summary.all_acknowledged else 1


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    run_demo(cfg, Path(args.data_dir).resolve())
    return 0


# A config field whose name contains one of these holds a secret: printed masked, whatever section
# it is in (fields added later, e.g. NATS credentials, are covered without a change here).
SECRET_FIELD_WORDS = ("password", "token", "secret", "seed", "nkey", "private")


def mask_secrets(data: object) -> object:
    """The config as builtins with every secret-named string field replaced by ``***`` (paths are kept)."""
    if isinstance(data, dict):
        return {k: "***" if isinstance(v, str) and v and _secret_field(k) else mask_secrets(v) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    return data


def _secret_field(name: str) -> bool:
    name = name.lower()
    if name.endswith(("_file", "_path", "_dir")):
        return False  # a location, not a value
    return any(word in name for word in SECRET_FIELD_WORDS)


def cmd_config(args: argparse.Namespace, cfg: Config) -> int:
    print(json.dumps(mask_secrets(msgspec.to_builtins(cfg)), indent=2))
    return 0


def _rebuild(
    cfg: Config,
    what: str,
    jobs: list[tuple[Path, Callable[[Path], ProjectionStore], Callable[[Any], None] | None]],
    accept_log_loss: bool = False,
) -> int:
    """Rebuild store files from the log, each swapped in atomically: (path, store class, seed or None).

    Every file is checked first, so none is rebuilt while the service holds any of them.
    """
    import asyncio

    import nats.errors

    from shared.natsauth import NoCredentials
    from shared.readmodel.replay import LogTruncated, StoreInUse, ensure_unlocked, rebuild_file

    nats_cfg = cfg.nats
    if accept_log_loss:  # rebuild from whatever the log still holds
        nats_cfg = msgspec.structs.replace(nats_cfg, accepted_log_start=2**62)
    try:
        for path, _, _ in jobs:
            ensure_unlocked(path)
        for path, store_class, seed in jobs:
            with Progress(f"{what} rebuild: {path.name}", None, "events") as progress:
                result = asyncio.run(
                    rebuild_file(
                        nats_cfg,
                        path,
                        store_class,
                        seed=seed,
                        fold_bytes=cfg.catalog.rebuild_memory_mib << 20,
                        progress=lambda seq, target: progress.update(seq, target),
                    )
                )
            rate = result.events / result.seconds if result.seconds else 0.0
            print(
                f"{what} rebuilt: {result.path}: {result.events} events up to sequence {result.last_seq} "
                f"in {result.seconds:.1f}s ({rate:.0f} events/s)"
            )
    except (StoreInUse, LogTruncated) as exc:
        print(f"switchyard: {exc}; {path} not changed", file=sys.stderr)
        return 1
    except (TimeoutError, OSError, nats.errors.Error, NoCredentials) as exc:
        print(
            f"switchyard: cannot read the log from {cfg.nats.url} ({type(exc).__name__}); {path} not changed",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_catalog_rebuild(args: argparse.Namespace, cfg: Config) -> int:
    from shared.readmodel.catalog import CatalogStore

    return _rebuild(cfg, "catalog", [(Path(args.db or cfg.catalog.db_path), CatalogStore, None)], args.accept_log_loss)


def cmd_probe_rebuild(args: argparse.Namespace, cfg: Config) -> int:
    """Both probe files: the verification store (node cursors carried over) and the front door's catalog."""
    from services.probe.store import ProbeStore
    from shared.readmodel.catalog import CatalogStore

    verify_db = Path(args.db or cfg.probe.db_path)
    return _rebuild(
        cfg,
        "probe store",
        [
            (verify_db, ProbeStore, lambda store: store.carry_node_state(verify_db)),
            (Path(args.catalog_db or cfg.probe.catalog_db_path), CatalogStore, None),
        ],
        args.accept_log_loss,
    )


def cmd_audit_export(args: argparse.Namespace, cfg: Config) -> int:
    from services.catalog.audit import ExportError, export, parse_when

    try:
        with Progress("audit export", None, "files") as progress:
            result = export(
                args.db or cfg.catalog.db_path,
                parse_when(args.since),
                parse_when(args.until),
                args.out,
                progress=lambda done, total: progress.update(done, total),
            )
    except ExportError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    print(
        f"audit export: {result.events} events, {result.instances} instances -> "
        + ", ".join(str(f) for f in result.files)
    )
    return 0


async def _nodes(args: argparse.Namespace, cfg: Config) -> int:
    """Membership changes are events in the log; every service follows them live."""
    import asyncio

    from shared import membership
    from shared.bus import Bus, BusUnavailable, PublishUncertain, subject_for
    from shared.config import NodeConfig
    from shared.natsauth import NoCredentials

    try:
        bus = await asyncio.wait_for(Bus.connect(cfg.nats, "switchyard-cli"), 10)
    except TimeoutError:
        print(f"switchyard: NATS not reachable at {cfg.nats.url}", file=sys.stderr)
        return 1
    except NoCredentials as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    from shared.readmodel.replay import LogTruncated

    try:
        await bus.ensure_streams()
        try:
            pool = await membership.load(bus, cfg.nodes, cfg.node_credentials)
        except LogTruncated as exc:
            print(f"switchyard: {exc}", file=sys.stderr)
            return 1
        if args.action == "list":
            print(f"{'node':<16} {'state':<8} {'dicom':<28} rest")
            for node_id, m in sorted(pool.members.items()):
                n = m.node
                print(f"{node_id:<16} {m.state:<8} {f'{n.ae_title}@{n.host}:{n.dicom_port}':<28} {n.rest_url}")
            return 0
        member = pool.get(args.node_id)
        state = {"add": "added", "drain": "drained", "undrain": "undrained", "remove": "removed"}[args.action]
        node = None
        if args.action == "add":
            if member is not None and not member.removed:
                print(f"switchyard: node {args.node_id} exists (remove it first)", file=sys.stderr)
                return 1
            try:
                node = NodeConfig(
                    id=args.node_id,
                    host=args.host,
                    dicom_port=args.dicom_port,
                    ae_title=args.ae_title,
                    rest_url=args.rest_url,
                    username=args.username or cfg.node_credentials.username,
                )
                event = membership.transition(member, args.node_id, state, args.reason, node)
                subject_for(event)  # the node id must be a subject token
            except ValueError as exc:
                print(f"switchyard: {exc}", file=sys.stderr)
                return 2
        else:
            if member is None or member.removed:
                print(f"switchyard: no node {args.node_id}", file=sys.stderr)
                return 1
            event = membership.transition(member, args.node_id, state, args.reason)
        try:
            await bus.publish(event)
        except (BusUnavailable, PublishUncertain) as exc:
            print(f"switchyard: not recorded: {exc}", file=sys.stderr)
            return 1
        print(f"node {args.node_id}: {state}")
        return 0
    finally:
        await bus.close()


def cmd_nats_credentials(args: argparse.Namespace, cfg: Config) -> int:
    """One nkey seed per identity (0600) and the server's auth include; prints locations, never seeds."""
    from shared import natsauth

    creds = natsauth.generate(Path(args.out), cfg.nats, keep=not args.rotate)
    # Kept by --rotate: the k8s prod overlay's cluster routes (Secret switchyard-nats-route).
    route = natsauth.write_route_password(creds.directory)
    print(
        f"nats credentials in {creds.directory} (seeds 0600): "
        + ", ".join(f"{i}.nk" for i in creds.public_keys)
        + f"; server include {creds.auth_conf}; cluster route password {route.name} (0600)"
    )
    print(
        "point each process at its own seed: nats.nkey_seed_file = "
        f'"{creds.seed_template}" (or SWITCHYARD_NATS__NKEY_SEED_FILE)'
    )
    return 0


def cmd_nats_init(args: argparse.Namespace, cfg: Config) -> int:
    """Declare the streams and the KV bucket as admin: services may only check they exist."""
    import asyncio

    import nats.errors

    from shared import natsauth

    try:
        asyncio.run(asyncio.wait_for(natsauth.declare(cfg.nats), 30))
    except (TimeoutError, OSError, nats.errors.Error, natsauth.NoCredentials) as exc:
        print(
            f"switchyard: cannot declare the streams on {cfg.nats.url} ({type(exc).__name__}: {exc})", file=sys.stderr
        )
        return 1
    print(f"nats: streams {cfg.nats.events_stream}, {cfg.nats.heartbeats_stream} and KV {natsauth.KV_BUCKET} declared")
    return 0


def cmd_nodes(args: argparse.Namespace, cfg: Config) -> int:
    import asyncio

    return asyncio.run(_nodes(args, cfg))


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), so a bug report can name it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicom-switchyard")
    except PackageNotFoundError:
        return "unknown (not installed)"


ACCEPT_LOSS_HELP = (
    "rebuild from what the log still holds even if it was purged or truncated "
    "(events before its first sequence are lost); without it such a rebuild stops with an error"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard", description="Switchyard DICOM router")
    parser.add_argument("--config", help="TOML config file (default: $SWITCHYARD_CONFIG or built-in defaults)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stack", help="run the whole stack locally")
    p.add_argument("--demo", action="store_true", help="route the demo corpus once the stack is up")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo (for scripts)")
    p.add_argument("--data-dir", default="var", help="where servers keep their data (default ./var)")
    p.add_argument("--nats-monitor-port", type=int, default=8222)
    p.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        metavar="N",
        help="run N nats-servers as one JetStream cluster on loopback, streams replicated (R3)",
    )
    p.set_defaults(func=cmd_stack)
    p = sub.add_parser(
        "chaos",
        help="run the stack under faults while senders send, then audit every "
        "acknowledged instance (exit 1 if anything is lost, duplicated, split "
        "or dead-lettered)",
    )
    p.add_argument("--instances", type=int, default=2000)
    p.add_argument("--senders", type=int, default=3, help="concurrent DCMTK storescu senders")
    p.add_argument(
        "--faults",
        default=None,
        help="comma-separated kill|term|stop:TARGET@N[%%][+DURATION]: N seconds "
        "after the senders start, or N percent of the corpus "
        "acknowledged, e.g. kill:ingest@5,term:nats@30%%,stop:node2@40+30; "
        "'' for none (default: issue #13's schedule)",
    )
    p.add_argument("--seed", type=int, help="corpus seed (default: the time, so UIDs are new)")
    p.add_argument("--data-dir", default="var/chaos", help="a fresh directory per run is best")
    p.add_argument("--settle-timeout", type=float, default=600.0)
    p.add_argument("--send-timeout", type=float, default=900.0)
    p.add_argument("--keep-ports", action="store_true", help="use the config's ports (default: free ones)")
    p.add_argument("--nats-monitor-port", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=cmd_chaos)
    p = sub.add_parser("demo", help="send the demo corpus to a running stack")
    p.add_argument("--data-dir", default="var")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "send",
        help="C-STORE files and folders (recursively) to the ingest (or any SCP); "
        "exit 0 only when every file was acknowledged with success or warning",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="default: ingest.port")
    p.add_argument("--called-ae", default="", help="default: ingest.ae_title")
    p.add_argument("--calling-ae", default="SWITCHYARD_SCU", help="our AE title (default SWITCHYARD_SCU)")
    p.add_argument(
        "--tls", action="store_true", help="DICOM over TLS (default: on when the config's ingest serves TLS)"
    )
    p.add_argument("--no-tls", action="store_true", help="plain TCP even when the config's ingest serves TLS")
    p.add_argument("--tls-ca", help="CA file that signed the SCP's certificate (default: ingest.tls_ca_file)")
    p.add_argument("--tls-cert", help="client certificate (when the SCP requires one)")
    p.add_argument("--tls-key", help="the client certificate's key")
    p.add_argument("--retries", type=int, default=3, help="retries of 0xA7xx and lost associations, with backoff")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="print only files not answered success")
    p.set_defaults(func=cmd_send)
    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=cmd_config)
    from switchyard.status import add_parser as add_status_parser

    add_status_parser(sub)
    p = sub.add_parser("catalog", help="catalog maintenance")
    catalog_sub = p.add_subparsers(dest="catalog_command", required=True)
    p = catalog_sub.add_parser(
        "rebuild",
        help="replay the log from sequence 1 into a fresh file and swap it in; "
        "refuses while the catalog service holds the file",
    )
    p.add_argument("--db", help="catalog DuckDB file (default: catalog.db_path)")
    p.add_argument("--accept-log-loss", action="store_true", help=ACCEPT_LOSS_HELP)
    p.set_defaults(func=cmd_catalog_rebuild)
    p = sub.add_parser("probe", help="probe maintenance")
    probe_sub = p.add_subparsers(dest="probe_command", required=True)
    p = probe_sub.add_parser(
        "rebuild",
        help="replay the log into fresh probe store files (verification store "
        "and Q/R front door catalog) and swap them in; refuses while the "
        "probe service holds them",
    )
    p.add_argument("--db", help="verification DuckDB file (default: probe.db_path)")
    p.add_argument("--catalog-db", help="front door DuckDB file (default: probe.catalog_db_path)")
    p.add_argument("--accept-log-loss", action="store_true", help=ACCEPT_LOSS_HELP)
    p.set_defaults(func=cmd_probe_rebuild)
    p = sub.add_parser("audit", help="audit exports")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser(
        "export",
        help="events and instances of [since, until) as Parquet and CSV "
        "(reads the catalog file; stop the catalog service first)",
    )
    p.add_argument("--since", required=True, help="ISO 8601 date or date-time, UTC unless a zone is given")
    p.add_argument("--until", required=True, help="ISO 8601 date or date-time (exclusive)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--db", help="catalog DuckDB file (default: catalog.db_path)")
    p.set_defaults(func=cmd_audit_export)
    p = sub.add_parser("nats", help="NATS credentials and stream declaration")
    nats_sub = p.add_subparsers(dest="nats_command", required=True)
    q = nats_sub.add_parser(
        "credentials",
        help="write one nkey seed per identity (0600), the server's authorization include (public keys only) "
        "and the cluster route password (0600)",
    )
    q.add_argument("--out", required=True, help="directory (created 0700)")
    q.add_argument("--rotate", action="store_true", help="new seeds even where one exists (the route password is kept)")
    q.set_defaults(func=cmd_nats_credentials)
    q = nats_sub.add_parser("init", help="declare the streams and the KV bucket (admin identity)")
    q.set_defaults(func=cmd_nats_init)
    p = sub.add_parser("nodes", help="add, drain, undrain, remove or list nodes at run time")
    nsub = p.add_subparsers(dest="action", required=True)
    q = nsub.add_parser("add", help="add an Orthanc node")
    q.add_argument("node_id")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--dicom-port", type=int, required=True)
    q.add_argument("--ae-title", required=True)
    q.add_argument("--rest-url", required=True)
    q.add_argument(
        "--username",
        help="REST user (default: node_credentials.username); the password "
        "comes from config (node_credentials), never from the log",
    )
    q.add_argument("--reason", default="added from the command line")
    for action, text in (
        ("drain", "no new placements"),
        ("undrain", "take new placements again"),
        ("remove", "leave the pool; its backlog is placed elsewhere"),
    ):
        q = nsub.add_parser(action, help=text)
        q.add_argument("node_id")
        q.add_argument("--reason", default=f"{action} from the command line")
    nsub.add_parser("list", help="the pool as the log says it is")
    p.set_defaults(func=cmd_nodes)
    args = parser.parse_args(argv)
    if argv is None:  # the command itself, not a test calling main() in its own process
        # Owner-only files (rebuilt stores, audit exports, the stack's data); library log records
        # (nats, asyncio) through the one formatter, warnings and errors only: the CLI prints its own.
        private_umask()
        setup_logging("cli", "WARNING")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args, cfg)
    except KeyboardInterrupt:  # Ctrl-C in a command without its own handler (send, demo): no traceback
        print("switchyard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
