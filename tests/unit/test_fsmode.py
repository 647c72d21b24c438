"""Owner-only files whatever the caller's umask; secrets masked when the config is printed."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from shared.config import Config
from shared.fsmode import open_private_append, private_dir, write_private
from switchyard import cli


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_and_files_under_a_loose_umask(tmp_path: Path, loose_umask: None) -> None:
    d = private_dir(tmp_path / "a" / "b")
    assert mode(tmp_path / "a") == mode(d) == 0o700
    existing = tmp_path / "secret.toml"
    existing.write_text("old")
    existing.chmod(0o644)
    write_private(existing, "token = 'x'")
    assert mode(existing) == 0o600 and existing.read_text() == "token = 'x'"
    fd = open_private_append(tmp_path / "logs" / "x.log")
    os.close(fd)
    assert mode(tmp_path / "logs" / "x.log") == 0o600 and mode(tmp_path / "logs") == 0o700


def test_private_dir_leaves_existing_parents_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    private_dir(tmp_path / "child")
    assert mode(tmp_path) == 0o755


def test_config_print_masks_every_secret(capsys: pytest.CaptureFixture[str]) -> None:
    base = Config()
    cfg = msgspec.structs.replace(base, catalog=msgspec.structs.replace(base.catalog, token="legacy-secret-token"))
    assert cli.cmd_config(None, cfg) == 0  # type: ignore[arg-type]
    printed = capsys.readouterr().out
    data = json.loads(printed)
    assert cfg.catalog.token not in printed
    assert data["catalog"]["token"] == "***" and data["blobs"]["s3_secret_key"] == "***"
    assert all(n["password"] == "***" for n in data["nodes"]) and data["node_credentials"]["password"] == "***"
    # Locations stay readable.
    masked = cli.mask_secrets({"nats": {"creds_file": "/run/x.creds", "nkey_seed": "SUA...", "user_password": ""}})
    assert masked == {"nats": {"creds_file": "/run/x.creds", "nkey_seed": "***", "user_password": ""}}
