# Switchyard tasks. Start from ./bootstrap.sh, which installs what is missing.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv/bin"
export PATH := venv + ":" + env_var('PATH')

default:
    @just --list

# Run nats-server, three Orthanc nodes and all five services; route the demo corpus
stack *ARGS:
    {{venv}}/switchyard stack --demo {{ARGS}}

# The stack under faults (kill -9, NATS restarts, a node stopped) while 3 senders send; audits every
# acknowledged instance (lost/duplicated/split/dead-lettered). E.g. just chaos --instances 20000
chaos *ARGS:
    {{venv}}/switchyard chaos {{ARGS}}

# Run the stack without the demo
up *ARGS:
    {{venv}}/switchyard stack {{ARGS}}

# The whole test suite: unit tests, then integration tests on real servers
test *ARGS:
    {{venv}}/python -m pytest -q {{ARGS}}

unit *ARGS:
    {{venv}}/python -m pytest -q tests/unit {{ARGS}}

integration *ARGS:
    {{venv}}/python -m pytest -q tests/integration {{ARGS}}

# Lint and format check (ruff; settings in pyproject.toml)
lint:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .

# Type check (mypy; strict for shared/, settings in pyproject.toml)
typecheck:
    {{venv}}/mypy

# Re-resolve requirements-dev.lock (the venv) and requirements.lock (the image) from pyproject.toml (`just lock --upgrade` moves every pin forward)
lock *ARGS:
    {{venv}}/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "just lock" -q -o requirements-dev.lock {{ARGS}}
    {{venv}}/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "just lock" -q -o requirements.lock {{ARGS}}

# Benchmarks (figures go to docs/benchmarks.md)
bench *ARGS:
    {{venv}}/python -m tests.bench {{ARGS}}

# The compose stack in real containers (a netns-local dockerd and local images where no registry answers)
compose-test *ARGS:
    {{venv}}/python -m pytest -q -m compose tests/integration/test_compose.py {{ARGS}}

# Validate the compose file
compose-config:
    DOCKER_CONFIG={{justfile_directory()}}/.venv/docker-config docker compose -f deploy/compose.yaml config --quiet
