"""The web console in a real browser (Debian chromium + chromedriver, Selenium) against the real local stack.

Three Orthanc nodes; node1 accepts only Implicit VR Little Endian and is the
only node of the pool that instances sent by AE "PICKY" are routed to, so
those dead-letter for good (a refused transfer syntax). Everything else goes
to the pool of node2 and node3. Screenshots of each page: tests/artifacts/console/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import msgspec
import pydicom
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from shared.config import RoutingConfig, RoutingRule
from switchyard.corpus import generate_studies
from tests.fixtures.otlp import start_receiver, traced
from tests.fixtures.servers import OPERATOR_TOKEN, VIEWER_TOKEN, catalog_ready, make_stack, new_orthanc_node
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

IMPLICIT_ONLY = {"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2"]}
TRACE_URL = "http://grafana.invalid/explore?trace={trace_id}"


def console_config(cfg):
    routing = RoutingConfig(
        rules=[
            RoutingRule(name="picky", pools=["p1"], match={"calling_ae": "PICKY"}),
            RoutingRule(name="rest", pools=["others"]),
        ],
        pools={"p1": ["node1"], "others": ["node2", "node3"]},
    )
    telemetry = msgspec.structs.replace(cfg.telemetry, trace_url_template=TRACE_URL)
    return msgspec.structs.replace(cfg, routing=routing, telemetry=telemetry)


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    nodes = [new_orthanc_node(1, base / "nodes", IMPLICIT_ONLY), *(new_orthanc_node(i, base / "nodes") for i in (2, 3))]
    stack = None
    # Tracing on, as deployed: events carry a traceparent, and the trail links it.
    receiver, stop_receiver = start_receiver()
    try:
        for n in nodes:
            n.start()
        stack = make_stack(
            base / "stack", nodes, configure=lambda cfg: traced(console_config(cfg), receiver.traces_url)
        )
        wait_for(lambda: catalog_ready(stack), timeout=30, what="catalog up")
        yield stack
    finally:
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()
        stop_receiver()


def base_url(stack) -> str:
    return f"http://127.0.0.1:{stack.cfg.catalog.http_port}"


def studies(tmp: Path, n: int, seed: int, per_series: int = 2) -> list[tuple[str, list[Path]]]:
    files = generate_studies(tmp, studies=n, series_per_study=1, instances_per_series=per_series, seed=seed)
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID, []).append(f)
    return list(out.items())


def sign_in(browser, stack, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(base_url(stack) + "/login")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "form.who"), timeout=10, what="signed in")


def show(browser, stack, path: str) -> None:
    browser.get(base_url(stack) + path)


def shot(browser, screenshots: Path, name: str) -> None:
    browser.save_screenshot(str(screenshots / f"{name}.png"))


# WCAG contrast of each element's own text against the first opaque background behind it.
LOW_CONTRAST_JS = """
const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
const lum = ([r, g, b]) => {
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
const bg = (el) => { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor);
  if (c.length === 3 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
return [...document.querySelectorAll("body *")].filter((el) => [...el.childNodes].some(
    (n) => n.nodeType === 3 && n.textContent.trim()) && el.offsetParent !== null).map((el) => {
  const a = lum(rgb(getComputedStyle(el).color)), b = lum(bg(el));
  return [el.tagName + " " + el.textContent.trim().slice(0, 30), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
}).filter(([, ratio]) => ratio < 4.5);
"""


def assert_accessible(browser) -> None:
    """Every visible input has a label; text contrast at least 4.5:1; no sideways scrolling at 1366x768."""
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".filter(e => e.labels.length === 0).map(e => e.name)"
    )
    assert unlabelled == []
    assert browser.execute_script(LOW_CONTRAST_JS) == []
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def node_rows(browser) -> dict[str, list[str]]:
    rows = browser.find_elements(By.CSS_SELECTOR, "table#nodes tbody tr")
    return {cells[0]: cells for cells in ([td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows)}


def test_overview_shows_the_three_nodes(console, browser, screenshots):
    sign_in(browser, console, OPERATOR_TOKEN)

    def three_active():
        show(browser, console, "/")
        rows = node_rows(browser)
        return (
            rows
            if sorted(rows) == ["node1", "node2", "node3"]
            and all(r[1] == "active" and r[7] != "never" for r in rows.values())
            else None
        )

    rows = wait_for(three_active, timeout=30, interval=0.5, what="three active nodes with heartbeats")
    assert len(rows) == 3
    # Live: the page's script polls /api/overview and rewrites the figures.
    first = browser.find_element(By.ID, "updated").text
    wait_for(lambda: browser.find_element(By.ID, "updated").text != first, timeout=15, interval=0.5, what="a poll")
    assert sorted(node_rows(browser)) == ["node1", "node2", "node3"]
    # Keyboard: the first Tab reaches the skip link, and it shows a focus outline.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("class") == "skip" and focused.value_of_css_property("outline-style") == "solid"
    assert browser.find_element(By.CSS_SELECTOR, "nav a[aria-current=page]").text == "Overview"
    assert_accessible(browser)
    shot(browser, screenshots, "overview")


def test_switchyard_status_prints_what_the_overview_shows(console):
    env = {**os.environ, "SWITCHYARD_TOKEN": VIEWER_TOKEN}
    cmd = [sys.executable, "-m", "switchyard", "--config", str(console.config_path), "status"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.startswith("node")}
    assert sorted(lines) == ["node", "node1", "node2", "node3"] and lines["node2"][1] == "active"
    assert "open dead letters" in out.stdout and "catalog lag" in out.stdout
    bad = subprocess.run(cmd, env={**env, "SWITCHYARD_TOKEN": "wrong"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "answered 401" in bad.stderr


def test_overview_shows_each_consumers_lag(console, browser, tmp_path):
    """Issue #15: every durable's lag (the catalog may read consumer INFO), on the JSON, the page and status."""
    sent = studies(tmp_path, 2, seed=6150, per_series=1)
    for _, files in sent:
        assert console.send(files).returncode == 0
    wait_for(
        lambda: all(console.catalog(f"/api/instances?study_uid={uid}") for uid, _ in sent), timeout=60, what="routed"
    )
    durables = ["scheduler", "scheduler-replace", "scheduler-verify", "scheduler-operator"]
    durables += [f"forwarder-{n}" for n in ("node1", "node2", "node3")]

    def listed():
        c = {c["durable"]: c for c in console.catalog("/api/overview")["consumers"] or []}
        return c if all(c.get(d, {}).get("present") for d in ("scheduler", "forwarder-node2")) else None

    consumers = wait_for(listed, timeout=20, interval=0.5, what="consumer lag in /api/overview")
    assert sorted(consumers) == sorted(durables)
    for d in ("scheduler", "forwarder-node1", "forwarder-node2", "forwarder-node3"):
        c = consumers[d]
        assert c["present"], d
        assert all(isinstance(c[k], int) and c[k] >= 0 for k in ("num_pending", "num_ack_pending", "num_redelivered"))
    sign_in(browser, console, VIEWER_TOKEN)
    show(browser, console, "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "table#consumers tbody tr")
    assert sorted(r.find_element(By.TAG_NAME, "td").text for r in rows) == sorted(durables)
    env = {**os.environ, "SWITCHYARD_TOKEN": VIEWER_TOKEN}
    cmd = [sys.executable, "-m", "switchyard", "--config", str(console.config_path), "status"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.startswith(("scheduler", "forwarder"))}
    assert sorted(lines) == sorted(durables) and lines["forwarder-node2"][1].isdigit(), out.stdout


def test_search_a_study_and_open_its_trail(console, browser, screenshots, tmp_path):
    ((study_uid, files),) = studies(tmp_path, 1, seed=6101)
    assert console.send(files, calling_ae="CONSOLESCU").returncode == 0
    wait_for(
        lambda: (
            [
                r
                for r in console.catalog(f"/api/instances?study_uid={study_uid}")
                if r["state"] in ("forwarded", "verified")
            ]
            if len(console.catalog(f"/api/instances?study_uid={study_uid}")) == len(files)
            else None
        ),
        timeout=60,
        what="study delivered",
    )
    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, "/search")
    browser.find_element(By.ID, "f-calling_ae").send_keys("CONSOLESCU")
    browser.find_element(By.CSS_SELECTOR, "form.search button").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "table#results tbody a"), timeout=10, what="results")
    assert_accessible(browser)
    shot(browser, screenshots, "search")
    browser.find_element(By.LINK_TEXT, study_uid).click()
    rows = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "table#instances tbody tr"), timeout=10, what="study"
    )
    assert len(rows) == len(files)
    cells = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[1] in ("node2", "node3")  # the node it is on, by the "rest" rule's pool
    shot(browser, screenshots, "study")
    rows[0].find_element(By.TAG_NAME, "a").click()
    trail = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "ol#trail li"), timeout=10, what="trail")
    kinds = {li.get_attribute("class").split("ev-")[1]: li for li in trail}
    assert "from CONSOLESCU at 127.0.0.1" in kinds["received"].text
    assert "rule rest" in kinds["placed"].text and "candidates (score)" in kinds["placed"].text
    assert "forwarded" in kinds
    # Tracing is on in the stack: the events carry a traceparent, linked through telemetry.trace_url_template.
    link = kinds["received"].find_element(By.CSS_SELECTOR, "a.trace").get_attribute("href")
    assert re.fullmatch(r"http://grafana\.invalid/explore\?trace=[0-9a-f]{32}", link), link
    shot(browser, screenshots, "trail")


def open_dead_letter(stack, sop: str) -> dict | None:
    return next((d for d in stack.catalog("/api/dead-letters") if d["sop_instance_uid"] == sop), None)


def test_a_dead_letter_retried_to_another_node_from_the_page(console, browser, screenshots, tmp_path):
    ((_, files),) = studies(tmp_path, 1, seed=6102, per_series=1)
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert console.send(files, calling_ae="PICKY").returncode == 0
    wait_for(lambda: open_dead_letter(console, sop), timeout=60, what="dead letter (node1 refuses the syntax)")
    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, "/dead-letters")
    assert_accessible(browser)
    shot(browser, screenshots, "dead-letters")
    key = sop.replace(".", "-")
    Select(browser.find_element(By.ID, f"node-{key}")).select_by_value("node2")
    browser.find_element(By.ID, f"retry-reason-{key}").send_keys("node1 cannot take this syntax")
    browser.find_element(By.CSS_SELECTOR, f"form.retry[action='/api/dead-letters/{sop}/retry'] button").click()
    wait_for(lambda: "Recorded: retry requested" in browser.page_source, timeout=10, what="retry recorded")

    def delivered_to_node2():
        rows = console.catalog(f"/api/instances?study_uid={pydicom.dcmread(files[0]).StudyInstanceUID}")
        return (
            rows if rows and rows[0]["node_id"] == "node2" and rows[0]["state"] in ("forwarded", "verified") else None
        )

    wait_for(delivered_to_node2, timeout=60, what="the retry delivered to node2")
    assert open_dead_letter(console, sop) is None
    trail = console.catalog(f"/api/instances/{sop}/trail")["events"]
    retry = next(e for e in trail if e["type"] == "instance.retry_requested.v1")
    assert retry["actor"] == "test-operator" and retry["why"]["reason"] == "node1 cannot take this syntax"
    placed = [e for e in trail if e["type"] == "instance.placed.v1"]
    assert placed[-1]["node_id"] == "node2" and placed[-1]["why"]["reason"] == "operator_retry"
    show(browser, console, f"/instances/{sop}")
    assert "retry_requested" in browser.find_element(By.ID, "trail").text
    shot(browser, screenshots, "trail-retried")


def test_a_dead_letter_cancelled_from_its_trail_page(console, browser, tmp_path):
    ((study_uid, files),) = studies(tmp_path, 1, seed=6105, per_series=1)
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert console.send(files, calling_ae="PICKY").returncode == 0
    wait_for(lambda: open_dead_letter(console, sop), timeout=60, what="dead letter")
    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, f"/instances/{sop}")
    key = sop.replace(".", "-")
    browser.find_element(By.ID, f"cancel-reason-{key}").send_keys("the sender re-sends a fixed copy")
    browser.find_element(By.XPATH, "//button[normalize-space()='Cancel dead letter']").click()
    wait_for(lambda: "Recorded: dead letter cancelled" in browser.page_source, timeout=10, what="cancel recorded")
    wait_for(lambda: open_dead_letter(console, sop) is None, timeout=10, what="no longer an open dead letter")
    (row,) = console.catalog(f"/api/instances?study_uid={study_uid}")
    assert row["state"] == "cancelled" and row["detail"] == "the sender re-sends a fixed copy"
    show(browser, console, f"/instances/{sop}")
    assert not browser.find_elements(By.CSS_SELECTOR, "main form.cancel, main form.retry")  # nothing left to act on


def test_a_retry_to_the_schedulers_choice_over_the_bearer_api(console, tmp_path):
    """No node chosen: placed again in its pool (only node1, which refuses again): a new open dead letter."""
    ((_, files),) = studies(tmp_path, 1, seed=6106, per_series=1)
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert console.send(files, calling_ae="PICKY").returncode == 0
    first = wait_for(lambda: open_dead_letter(console, sop), timeout=60, what="dead letter")
    req = urllib.request.Request(
        base_url(console) + f"/api/dead-letters/{sop}/retry",
        data=json.dumps({"reason": "try once more"}).encode(),
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as rsp:
        assert rsp.status == 202 and json.loads(rsp.read())["node"] is None
    again = wait_for(
        lambda: (d := open_dead_letter(console, sop)) and d["placement_id"] != first["placement_id"] and d,
        timeout=60,
        what="dead-lettered again after the retry",
    )
    assert again["node_id"] == "node1" and again["pool"] == "p1"
    placed = [e for e in console.catalog(f"/api/instances/{sop}/trail")["events"] if e["type"] == "instance.placed.v1"]
    assert [p["why"]["reason"] for p in placed] == ["rule", "operator_retry"]
    assert placed[-1]["why"]["pool"] == "p1" and placed[-1]["node_id"] == "node1"


NEW_RULES = """[pools]
p1 = ["node1"]
others = ["node2", "node3"]
only2 = ["node2"]

[[rules]]
name = "picky"
pools = ["p1"]
match = { calling_ae = "PICKY" }

[[rules]]
name = "to-node2"
pools = ["only2"]
match = { calling_ae = "RULESCU" }

[[rules]]
name = "rest"
pools = ["others"]
"""


def test_routing_rules_changed_from_the_page_apply_without_a_restart(console, browser, screenshots, tmp_path):
    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, "/rules")
    assert 'name = "picky"' in browser.find_element(By.ID, "document").get_attribute("value")  # the config's
    area = browser.find_element(By.ID, "document")
    area.clear()
    area.send_keys(NEW_RULES)
    browser.find_element(By.ID, "rules-reason").send_keys("RULESCU studies to node2")
    browser.find_element(By.XPATH, "//button[normalize-space()='Apply rules']").click()
    wait_for(lambda: "Recorded: rules changed" in browser.page_source, timeout=10, what="rules recorded")
    shot(browser, screenshots, "rules")
    scheduler_log = console.data_dir / "logs" / "scheduler.log"
    wait_for(lambda: "routing rules from stream seq" in scheduler_log.read_text(), timeout=20, what="rules applied")
    ((study_uid, files),) = studies(tmp_path, 1, seed=6104, per_series=1)
    assert console.send(files, calling_ae="RULESCU").returncode == 0
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID

    def placed():
        events = console.catalog(f"/api/instances/{sop}/trail")["events"]
        return next((e for e in events if e["type"] == "instance.placed.v1"), None)

    p = wait_for(placed, timeout=60, what="placed under the new rules")
    assert p["node_id"] == "node2" and p["why"]["rule"] == "to-node2" and p["why"]["pool"] == "only2"


def test_drain_a_node_from_the_page_and_the_scheduler_stops_placing_on_it(console, browser, screenshots, tmp_path):
    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, "/nodes")
    browser.find_element(By.ID, "drain-node3").send_keys("maintenance window")
    browser.find_element(By.XPATH, "//button[normalize-space()='Drain node3']").click()
    wait_for(lambda: "Recorded: node drained" in browser.page_source, timeout=10, what="drain recorded")

    def drained_on_page():
        show(browser, console, "/nodes")
        return node_rows(browser).get("node3", [None, None])[1] == "drained"

    wait_for(drained_on_page, timeout=10, interval=0.3, what="node3 drained on the page")
    assert_accessible(browser)
    shot(browser, screenshots, "nodes")
    node3 = wait_for(
        lambda: next(n for n in console.catalog("/api/nodes") if n["node_id"] == "node3" and n["state_reason"]),
        timeout=10,
        what="the drain in the catalog",
    )
    assert node3["state"] == "drained" and node3["state_reason"] == "maintenance window"
    trail = console.catalog("/api/overview")["recent"]
    assert any(r["type"] == "node.state_changed.v1" and r["node_id"] == "node3" for r in trail)
    wait_for(
        lambda: console.metric("scheduler", "switchyard_scheduler_node_live", 'node="node3"') == 0,
        timeout=20,
        what="the scheduler sees node3 drained",
    )
    sent = studies(tmp_path, 3, seed=6103, per_series=1)
    for _, files in sent:
        assert console.send(files, calling_ae="AFTERDRAIN").returncode == 0

    def placed():
        rows = [r for uid, _ in sent for r in console.catalog(f"/api/instances?study_uid={uid}") if r["node_id"]]
        return rows if len(rows) == len(sent) else None

    rows = wait_for(placed, timeout=60, what="new studies placed")
    assert {r["node_id"] for r in rows} == {"node2"}
    show(browser, console, "/")
    shot(browser, screenshots, "overview-busy")


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None, "no CSRF field on the page"
    return m.group(1)


def session_post(stack, path: str, cookie: str, fields: dict[str, str], origin: str | None = None) -> int:
    headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    if origin:
        headers["Origin"] = origin
    req = urllib.request.Request(
        base_url(stack) + path, data=urllib.parse.urlencode(fields).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as rsp:
            return rsp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_viewer_sees_no_actions_and_forged_posts_are_refused(console, browser, screenshots):
    sign_in(browser, console, VIEWER_TOKEN)
    for path in ("/", "/nodes", "/dead-letters", "/rules", "/search"):
        show(browser, console, path)
        assert browser.find_elements(By.CSS_SELECTOR, "main button, main form[method=post]") in ([], None) or (
            path == "/search" and all(b.text == "Search" for b in browser.find_elements(By.CSS_SELECTOR, "main button"))
        ), path
        assert_accessible(browser)
    show(browser, console, "/search")
    assert not browser.find_elements(By.ID, "f-patient_id") and not browser.find_elements(By.ID, "f-accession")
    shot(browser, screenshots, "viewer-search")
    viewer_cookie = f"switchyard_session={browser.get_cookie('switchyard_session')['value']}"
    viewer_csrf = csrf_of(browser.page_source)
    # A viewer with a valid session and CSRF token still may not act.
    assert session_post(console, "/api/nodes/node2/drain", viewer_cookie, {"reason": "x", "csrf": viewer_csrf}) == 403

    sign_in(browser, console, OPERATOR_TOKEN)
    show(browser, console, "/nodes")
    cookie = f"switchyard_session={browser.get_cookie('switchyard_session')['value']}"
    csrf = csrf_of(browser.page_source)
    forged = {"reason": "forged"}
    assert session_post(console, "/api/nodes/node2/drain", cookie, forged) == 403  # no CSRF token
    assert session_post(console, "/api/nodes/node2/drain", cookie, {**forged, "csrf": "x" * len(csrf)}) == 403
    assert (
        session_post(console, "/api/nodes/node2/drain", cookie, {**forged, "csrf": csrf}, "http://evil.example") == 403
    )
    node2 = next(n for n in console.catalog("/api/nodes") if n["node_id"] == "node2")
    assert node2["state"] == "active"  # nothing was recorded
    # The bearer API is unchanged: a viewer token reads, and may not act.
    req = urllib.request.Request(
        base_url(console) + "/api/nodes/node2/drain",
        data=json.dumps({"reason": "x"}).encode(),
        headers={"Authorization": f"Bearer {VIEWER_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 403
