"""Start the real parts as local processes: nats-server, Orthanc nodes, the services.

Used by ``switchyard stack`` and by the integration test fixtures, so both run
the same commands. Every server listens on loopback; readiness is always read
from the server itself (HTTP health, REST, metrics endpoint), never assumed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import msgspec

from shared import natsauth
from shared.config import CatalogToken, Config, NodeConfig, QRPeer, dump_toml
from shared.fsmode import PRIVATE_UMASK, open_private_append, private_dir, write_private
from shared.orthanc import OrthancClient, OrthancError, node_config

SERVICES = ("ingest", "scheduler", "forwarder", "probe", "catalog")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DCMTK_BIN = Path("/usr/bin")  # the venv's bin has pynetdicom apps with the same names
ORTHANC = Path("/usr/sbin/Orthanc")


def loopback_shim() -> Path | None:
    """The LD_PRELOAD shim that keeps Orthanc on 127.0.0.1 (built by bootstrap.sh)."""
    for candidate in (VENV_BIN.parent / "lib" / "loopback_bind.so", REPO / ".venv" / "lib" / "loopback_bind.so"):
        if candidate.exists():
            return candidate
    return None


def dicom_env() -> dict[str, str]:
    """Environment for DCMTK tools and Orthanc: TCP_NODELAY avoids ~40 ms stalls per hop."""
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout}s")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return rsp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    threads: list[threading.Thread] = field(default_factory=list)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for t in self.threads:
            t.join(2)
        return self.popen.returncode

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """Stop processes in tiers, last started first: services, then nodes, then NATS.

    Within a tier (same name prefix group) they stop in parallel.
    """
    tiers: list[list[Proc]] = []
    for proc in reversed(procs):
        kind = _tier(proc.name)
        if tiers and _tier(tiers[-1][0].name) == kind:
            tiers[-1].append(proc)
        else:
            tiers.append([proc])
    for tier in tiers:
        for proc in tier:
            proc.terminate()
        for proc in tier:
            proc.stop(timeout)


def _tier(name: str) -> str:
    return "service" if name.partition("-")[0] in SERVICES else "nats" if name.startswith("nats") else "node"


def _pump(prefix: str, stream: IO[bytes], sink: IO[str]) -> None:
    for raw in iter(stream.readline, b""):
        sink.write(f"{prefix} | {raw.decode(errors='replace').rstrip()}\n")
        sink.flush()


def spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    log_path: Path | None,
    console: IO[str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start a process whose output goes to a log file, or to the console with a name prefix.

    Each child gets its own session: Ctrl-C reaches only the supervisor, which
    then stops services before the servers they depend on.
    """
    if console is not None:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=PRIVATE_UMASK,
        )
        t = threading.Thread(target=_pump, args=(f"{name:>10}", popen.stdout, console), daemon=True)
        t.start()
        return Proc(name, popen, [t])
    assert log_path is not None
    # Owner-only: the child's files (nats-server's store, Orthanc's storage, DuckDB) and its log.
    log = open_private_append(log_path)
    try:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            umask=PRIVATE_UMASK,
        )
    finally:
        os.close(log)
    return Proc(name, popen)


def nats_port(cfg: Config) -> int:
    return urlparse(cfg.nats.url).port or 4222


def start_nats(
    cfg: Config,
    data_dir: Path,
    monitor_port: int,
    console: IO[str] | None = None,
    timeout: float = 30.0,
    sync_always: bool = True,
    extra_conf: str = "",
    wait: bool = True,
) -> Proc:
    """``extra_conf``: more server config (shared.natsauth.server_conf: the auth include, tls)."""
    store = private_dir(data_dir / "nats")
    # One server, no replicas: a PubAck must mean "on disk", or a power cut could
    # lose events whose instances were already answered success.
    conf = data_dir / "nats.conf"
    # (sync_always=False: JetStream's default, every 2 minutes; benchmarks use it to show what fsync costs.)
    sync = "always" if sync_always else '"2m"'
    write_private(
        conf, f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  sync_interval: {sync}\n}}\n{extra_conf}".encode()
    )
    argv = [
        str(VENV_BIN / "nats-server"),
        "-c",
        str(conf),
        "-a",
        "127.0.0.1",
        "-p",
        str(nats_port(cfg)),
        "-m",
        str(monitor_port),
        "-n",
        "switchyard-local",
    ]
    proc = spawn("nats", argv, dict(os.environ), data_dir / "logs" / "nats.log", console)
    if wait:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"),
            timeout,
            "nats-server",
            proc.popen,
        )
    return proc


@dataclass(frozen=True)
class NatsMember:
    """One server of a local JetStream cluster: its client, route and monitoring ports."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def cluster_members(
    n: int, ports: Callable[[], int] | None = None, base: int = 4222, cluster_base: int = 6222, monitor_base: int = 8222
) -> list[NatsMember]:
    """``n`` members on loopback: fixed ports from the bases (the local stack) or from ``ports()`` (tests)."""
    if ports is not None:
        return [NatsMember(f"switchyard-{i + 1}", ports(), ports(), ports()) for i in range(n)]
    return [NatsMember(f"switchyard-{i + 1}", base + i, cluster_base + i, monitor_base + i) for i in range(n)]


def with_cluster(cfg: Config, members: list[NatsMember]) -> Config:
    """``cfg`` pointing its clients at every member, with streams and KV replicated on up to 3 of them."""
    import msgspec

    nats = msgspec.structs.replace(
        cfg.nats, url=members[0].url, servers=[m.url for m in members[1:]], replicas=min(3, len(members))
    )
    return msgspec.structs.replace(cfg, nats=nats)


def route_password(data_dir: Path) -> str:
    """The routes' shared secret (0600 under the data dir, kept across restarts): no stranger joins the cluster."""
    path = data_dir / "nats-route.secret"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24).encode())
    return path.read_text().strip()


def cluster_conf(
    member: NatsMember, members: list[NatsMember], store: Path, password: str, sync_always: bool = True
) -> str:
    """One member's config (without the auth/tls lines): JetStream, and routes authenticated by password."""
    sync = "always" if sync_always else '"2m"'
    routes = ", ".join(
        json.dumps(f"nats-route://route:{password}@127.0.0.1:{m.cluster_port}") for m in members if m != member
    )
    return (
        f"server_name: {json.dumps(member.name)}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  sync_interval: {sync}\n}}\n"
        f'cluster {{\n  name: "switchyard"\n  listen: "127.0.0.1:{member.cluster_port}"\n'
        f'  authorization {{ user: "route", password: {json.dumps(password)} }}\n'
        f"  routes: [{routes}]\n}}\n"
    )


def start_nats_member(
    member: NatsMember,
    members: list[NatsMember],
    data_dir: Path,
    console: IO[str] | None = None,
    timeout: float = 30.0,
    sync_always: bool = True,
    extra_conf: str = "",
    wait: bool = True,
) -> Proc:
    """Start (or restart, on its same store) one cluster member; ``wait``: until it serves clients."""
    store = data_dir / "nats" / member.name
    store.mkdir(parents=True, exist_ok=True)
    conf = data_dir / f"nats-{member.name}.conf"
    write_private(
        conf, (cluster_conf(member, members, store, route_password(data_dir), sync_always) + extra_conf).encode()
    )
    argv = [
        str(VENV_BIN / "nats-server"),
        "-c",
        str(conf),
        "-a",
        "127.0.0.1",
        "-p",
        str(member.port),
        "-m",
        str(member.monitor_port),
    ]
    proc = spawn(f"nats-{member.name}", argv, dict(os.environ), data_dir / "logs" / f"{member.name}.log", console)
    if wait:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{member.monitor_port}/healthz?js-enabled-only=true"),
            timeout,
            f"nats-server {member.name}",
            proc.popen,
        )
    return proc


def _restart_nats_member(
    member: NatsMember, members: list[NatsMember], data_dir: Path, console: IO[str] | None, extra_conf: str, wait: bool
) -> Proc:
    """``start_nats_member`` as a Supervisor starter: ``starter(wait)``."""
    return start_nats_member(member, members, data_dir, console, extra_conf=extra_conf, wait=wait)


def start_nats_cluster(
    members: list[NatsMember],
    data_dir: Path,
    console: IO[str] | None = None,
    timeout: float = 60.0,
    sync_always: bool = True,
    extra_conf: str = "",
) -> list[Proc]:
    """Start every member, then wait until the cluster has a JetStream meta leader (streams can be declared)."""
    procs = [
        start_nats_member(m, members, data_dir, console, timeout, sync_always, extra_conf, wait=False) for m in members
    ]

    def serving(m: NatsMember) -> Callable[[], bool]:
        return lambda: http_ok(f"http://127.0.0.1:{m.monitor_port}/healthz?js-enabled-only=true")

    try:
        for m, p in zip(members, procs, strict=True):
            wait_until(serving(m), timeout, f"nats-server {m.name}", p.popen)
        wait_until(lambda: all(meta_leader(m) for m in members), timeout, "JetStream meta leader")
    except BaseException:
        stop_all(procs)
        raise
    return procs


def meta_leader(member: NatsMember) -> str:
    """The JetStream meta leader as ``member`` sees it ("" if none yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{member.monitor_port}/jsz", timeout=1.0) as rsp:
        return str(json.loads(rsp.read()).get("meta_cluster", {}).get("leader", ""))


def orthanc_http_port(node: NodeConfig) -> int:
    return urlparse(node.rest_url).port or 8042


def start_orthanc(
    node: NodeConfig,
    data_dir: Path,
    console: IO[str] | None = None,
    timeout: float = 60.0,
    overrides: dict | None = None,
    wait: bool = True,
) -> Proc:
    home = data_dir / "orthanc" / node.id
    storage = private_dir(home / "storage")
    config_path = home / "orthanc.json"  # holds the node's REST passwords
    write_private(config_path, json.dumps(node_config(node, storage, orthanc_http_port(node), overrides), indent=2))
    env = dicom_env()
    shim = loopback_shim()
    if shim is not None:
        env["LD_PRELOAD"] = str(shim)
    proc = spawn(node.id, [str(ORTHANC), str(config_path)], env, home / "orthanc.log", console)
    client = OrthancClient(node, timeout=1.0)

    def ready() -> bool:
        try:
            return bool(client.system().get("DicomAet"))
        except OrthancError:
            return False

    if wait:
        wait_until(ready, timeout, f"Orthanc {node.id}", proc.popen)
    return proc


CATALOG_TOKENS_FILE = "catalog-tokens.json"


def read_catalog_tokens(data_dir: Path) -> dict[str, str]:
    """The local stack's API tokens by role ({} if none were made yet)."""
    path = data_dir / CATALOG_TOKENS_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {role: str(token) for role, token in data.items() if role in ("viewer", "operator")}


def catalog_credentials(cfg: Config, data_dir: Path) -> tuple[Config, Path]:
    """A viewer and an operator token for the local stack's catalog API.

    Made once and kept in ``data_dir/catalog-tokens.json`` (mode 0600, created
    so, never world-readable in between); the config only gets their sha256
    (as ``local-viewer`` / ``local-operator``), so the config file grants nothing.
    """
    path = data_dir / CATALOG_TOKENS_FILE
    tokens = read_catalog_tokens(data_dir)
    if set(tokens) != {"viewer", "operator"}:
        tokens = {role: secrets.token_urlsafe(32) for role in ("viewer", "operator")}
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(tokens, f)
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    local = [
        CatalogToken(name=f"local-{role}", role=role, sha256=hashlib.sha256(tokens[role].encode()).hexdigest())
        for role in ("operator", "viewer")
    ]
    kept = [t for t in cfg.catalog.tokens if t.name not in {t.name for t in local}]
    return msgspec.structs.replace(cfg, catalog=msgspec.structs.replace(cfg.catalog, tokens=kept + local)), path


# The local stack's Q/R front door is opened for this one AE, from loopback only.
DEV_QR_AE = "DEVSCU"


def open_dev_qr(cfg: Config, out: IO[str]) -> Config:
    """The local stack only: open the (closed by default) Q/R door to DEV_QR_AE on loopback, and say so.

    A config that names its own Q/R peers is left as it is.
    """
    p = cfg.probe
    if p.qr_peers or p.qr_allowed_calling_aes or p.qr_allowed_peers:
        return cfg
    peer = QRPeer(ae=DEV_QR_AE, host="127.0.0.1", rights=["find", "retrieve"])
    out.write(
        f"switchyard: dev stack: Q/R front door {p.qr_ae_title}@{p.qr_host}:{p.qr_port} opened to calling AE"
        f" {DEV_QR_AE} from 127.0.0.1 (find + retrieve); set probe.qr_peers to choose peers\n"
    )
    return msgspec.structs.replace(cfg, probe=msgspec.structs.replace(p, qr_peers=[peer]))


def write_config(cfg: Config, path: Path) -> Path:
    """The services' config file, 0600: it holds the API token and the nodes' passwords."""
    return write_private(path, dump_toml(cfg))


def metrics_port(cfg: Config, service: str) -> int:
    return getattr(cfg, service).metrics_port


def start_service(
    service: str,
    cfg: Config,
    config_path: Path,
    data_dir: Path,
    console: IO[str] | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
    wait: bool = True,
) -> Proc:
    """Run ``python -m services.<service>``; ready once its metrics endpoint answers."""
    env = {**os.environ, "SWITCHYARD_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = spawn(
        service,
        [sys.executable, "-m", f"services.{service}"],
        env,
        data_dir / "logs" / f"{service}.log",
        console,
        cwd=cwd,
    )
    port = metrics_port(cfg, service)
    if wait:
        wait_until(
            lambda: http_ok(f"http://{cfg.telemetry.metrics_host}:{port}/metrics"),
            timeout,
            f"service {service}",
            proc.popen,
        )
    return proc


def storescu(
    host: str,
    port: int,
    called_ae: str,
    paths: list[Path],
    calling_ae: str = "STORESCU",
    timeout: float = 300.0,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Send files with DCMTK storescu, proposing each file's own transfer syntax (-R)."""
    argv = [
        str(DCMTK_BIN / "storescu"),
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-R",
        *(extra or []),
        host,
        str(port),
        *map(str, paths),
    ]
    return subprocess.run(argv, env=dicom_env(), capture_output=True, text=True, timeout=timeout)


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_storescp(
    port: int,
    out_dir: Path,
    log_path: Path,
    ae_title: str = "STORESCP",
    timeout: float = 15.0,
    extra: list[str] | None = None,
) -> Proc:
    """DCMTK storescp writing every received object to out_dir, accepting all transfer syntaxes."""
    private_dir(out_dir)
    argv = [str(DCMTK_BIN / "storescp"), "-aet", ae_title, "-od", str(out_dir), "+xa", *(extra or []), str(port)]
    proc = spawn("storescp", argv, dicom_env(), log_path)
    wait_until(lambda: tcp_accepts(port), timeout, "storescp", proc.popen)
    return proc


def tool_available() -> dict[str, bool]:
    return {
        "Orthanc": ORTHANC.exists(),
        "storescu": (DCMTK_BIN / "storescu").exists(),
        "nats-server": (VENV_BIN / "nats-server").exists() or shutil.which("nats-server") is not None,
    }


# Restart delays after a crash: doubled each time, reset once a process stays up STABLE_S.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
STABLE_S = 30.0


class Supervisor:
    """Keeps the stack's processes running, as compose's ``restart: always`` or Kubernetes would.

    A process that exits without being asked to is started again after a
    backoff (logged with its exit code); a process under ``hold`` (an operator,
    or the chaos run, stopped it on purpose) is left down until ``release``.
    Restarts only spawn: readiness is the service's own business, so a service
    that cannot start yet (NATS down) simply exits and backs off again.
    """

    def __init__(self, log: IO[str] = sys.stderr) -> None:
        self.procs: dict[str, Proc] = {}
        self._starters: dict[str, Callable[[bool], Proc]] = {}
        self._order: list[str] = []
        self._held: set[str] = set()
        self._failures: dict[str, int] = {}
        self._started_at: dict[str, float] = {}
        self._due: dict[str, float] = {}
        self.restarts: list[tuple[float, str, int | None]] = []
        self._lock = threading.RLock()
        self._log = log

    def add(self, name: str, starter: Callable[[bool], Proc]) -> Proc:
        """Start ``name`` now (waiting for readiness); ``starter(wait)`` starts it again later."""
        proc = starter(True)
        with self._lock:
            self.procs[name] = proc
            self._starters[name] = starter
            self._order.append(name)
            self._started_at[name] = time.monotonic()
        return proc

    def hold(self, name: str) -> Proc:
        """Leave ``name`` down when it exits (the caller stops it)."""
        with self._lock:
            self._held.add(name)
            self._due.pop(name, None)
            return self.procs[name]

    def release(self, name: str, wait: bool = True) -> Proc:
        """Start a held process again (now, waiting for readiness if asked) and supervise it."""
        with self._lock:
            proc = self.procs[name]
            if proc.popen.poll() is None:
                self._held.discard(name)
                return proc
        proc = self._starters[name](wait)
        with self._lock:
            self.procs[name] = proc
            self._started_at[name] = time.monotonic()
            self._held.discard(name)
        return proc

    def pid(self, name: str) -> int:
        with self._lock:
            return self.procs[name].popen.pid

    def check(self) -> None:
        """One supervision pass: schedule restarts of exited processes, run those that are due."""
        now = time.monotonic()
        with self._lock:
            for name in self._order:
                proc = self.procs[name]
                if name in self._held or proc.popen.poll() is None:
                    if proc.popen.poll() is None and now - self._started_at.get(name, now) > STABLE_S:
                        self._failures[name] = 0
                    continue
                if name not in self._due:
                    n = self._failures.get(name, 0)
                    delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
                    self._failures[name] = n + 1
                    self._due[name] = now + delay
                    self.restarts.append((time.time(), name, proc.popen.returncode))
                    self._log.write(
                        f"switchyard: {name} exited with code {proc.popen.returncode}; "
                        f"restarting in {delay:g}s (restart {n + 1})\n"
                    )
                    self._log.flush()
                elif now >= self._due[name]:
                    del self._due[name]
                    try:
                        self.procs[name] = self._starters[name](False)
                        self._started_at[name] = time.monotonic()
                    except Exception as exc:  # noqa: BLE001 - try again after the next backoff
                        self._log.write(f"switchyard: {name} did not start ({type(exc).__name__}); will retry\n")
                        self._log.flush()

    def run(self, stop: threading.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            self.check()
            stop.wait(interval)

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name="supervisor", daemon=True)
        t.start()
        return t

    def stop_all(self, timeout: float = 15.0) -> None:
        with self._lock:
            self._held.update(self._order)
            procs = [self.procs[name] for name in self._order]
        stop_all(procs, timeout)


def start_stack(
    cfg: Config,
    data_dir: Path,
    config_path: Path,
    monitor_port: int,
    console: IO[str] | None = None,
    log: IO[str] = sys.stderr,
    creds: natsauth.Credentials | None = None,
    nats_members: list[NatsMember] | None = None,
) -> Supervisor:
    """NATS, the nodes and the five services under one supervisor (its loop not yet running).

    ``creds`` (natsauth.secure_local): NATS runs with that authorization block, and the
    streams and KV are declared as admin before any service starts (services only check them).
    """
    sup = Supervisor(log)
    extra_conf = natsauth.server_conf(creds)
    try:
        if nats_members:  # a local JetStream cluster: each member supervised on its own
            for member in nats_members:
                sup.add(
                    member.name,
                    functools.partial(_restart_nats_member, member, nats_members, data_dir, console, extra_conf),
                )
        else:
            sup.add(
                "nats", lambda wait: start_nats(cfg, data_dir, monitor_port, console, extra_conf=extra_conf, wait=wait)
            )
        asyncio.run(natsauth.declare(cfg.nats))  # the admin step (idempotent)
        for node in cfg.nodes:
            sup.add(node.id, functools.partial(_start_node, node, data_dir, console))
        for service in SERVICES:
            sup.add(service, functools.partial(_start_service, service, cfg, config_path, data_dir, console))
    except BaseException:
        sup.stop_all()
        raise
    return sup


def _start_node(node: NodeConfig, data_dir: Path, console: IO[str] | None, wait: bool) -> Proc:
    return start_orthanc(node, data_dir, console, wait=wait)


def _start_service(
    service: str, cfg: Config, config_path: Path, data_dir: Path, console: IO[str] | None, wait: bool
) -> Proc:
    return start_service(service, cfg, config_path, data_dir, console, wait=wait)
