"""The alert rules load in Prometheus's own checker, each alert is unit-tested both ways,
and each names a runbook paragraph that exists in docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules" / "switchyard.yml"
TESTS = sorted((REPO / "deploy" / "prometheus" / "rules" / "tests").glob("*.yml"))
OPERATIONS = REPO / "docs" / "operations.md"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: ./bootstrap.sh installs the Debian package prometheus"
    return path


def alerts() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    assert TESTS
    out = subprocess.run([promtool(), "test", "rules", *map(str, TESTS)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alerts())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_paragraph():
    headings = {anchor(m) for m in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.M)}
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        path, _, fragment = url.partition("#")
        assert path == "docs/operations.md" and fragment, f"{name}: runbook_url {url!r}"
        assert fragment in headings, f"{name}: no heading for #{fragment} in docs/operations.md"


def test_compose_prometheus_config_is_valid(tmp_path):
    """deploy/prometheus.yml as Prometheus reads it, with the container's paths mapped to files here."""
    text = (REPO / "deploy" / "prometheus.yml").read_text()
    secret = tmp_path / "secret"
    secret.write_text("x")
    text = text.replace("/etc/prometheus/rules/*.yml", str(RULES))
    text = text.replace("/etc/prometheus/orthanc-password", str(secret)).replace(
        "/etc/prometheus/minio-token", str(secret)
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    out = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
