"""The console's pure parts: escaping, the rules document, sessions, and how the catalog projects
operator actions (a cancelled dead letter is no longer open; a retry is in the trail)."""

from __future__ import annotations

import pytest

from services.catalog.console import Sessions
from services.catalog.console.template import Markup, html, join
from shared import events as ev
from shared.config import parse_routing
from shared.readmodel.catalog import CatalogStore
from tests.factories import placed, received


def test_every_value_is_escaped_unless_markup():
    out = html('<td>{v}</td><a href="{h}">', v="<script>alert('x')</script>", h='" onmouseover="x')
    assert "<script>" not in out and "&lt;script&gt;" in out and "&quot; onmouseover" in out
    assert html("<p>{m}</p>", m=Markup("<b>ok</b>")) == "<p><b>ok</b></p>"
    assert join(["<i>", Markup("<b>")]) == "&lt;i&gt;<b>"


def test_the_rules_document_is_toml_checked_like_the_config():
    r = parse_routing('[pools]\na = ["n1"]\n[[rules]]\nname = "x"\npools = ["a"]\nmatch = { modality = "MR" }\n')
    assert r.rules[0].name == "x" and r.pools == {"a": ["n1"]}
    assert parse_routing('[routing]\n[[routing.rules]]\nname = "y"\npools = ["all"]\n').rules[0].pools == ["all"]
    with pytest.raises(ValueError, match="unknown pools"):
        parse_routing('[[rules]]\nname = "x"\npools = ["nope"]\n')
    with pytest.raises(ValueError, match="not TOML"):
        parse_routing("[[rules")


def test_sessions_expire_and_have_their_own_csrf_tokens(monkeypatch):
    sessions = Sessions()
    a, b = sessions.create("alice", "operator"), sessions.create("bob", "viewer")
    assert a.id != b.id and a.csrf != b.csrf and len(a.id) >= 40
    assert sessions.get(a.id) is a and sessions.get("forged") is None and sessions.get("") is None
    import services.catalog.console as console

    monkeypatch.setattr(console.time, "monotonic", lambda: a.seen + console.SESSION_IDLE_S + 1)
    assert sessions.get(a.id) is None and a.id not in sessions.by_id


def test_a_cancelled_dead_letter_is_not_open_and_actions_are_in_the_trail(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    p = placed(1, "node1")
    dead = ev.InstanceDeadLetteredV1(
        event_id="d1",
        sop_instance_uid=p.sop_instance_uid,
        study_instance_uid=p.study_instance_uid,
        node_id="node1",
        placement_id=p.event_id,
        reason="node refused the transfer syntax",
        received_seq=1,
    )
    cancel = ev.InstanceDeadLetterCancelledV1(
        event_id="c1",
        sop_instance_uid=p.sop_instance_uid,
        study_instance_uid=p.study_instance_uid,
        node_id="node1",
        placement_id=p.event_id,
        actor="alice",
        reason="sender re-sends a fixed copy",
    )
    store.apply([(1, received(1)), (2, p), (3, dead)])
    assert store.rows("SELECT state FROM locations")[0]["state"] == ev.LocationState.DEAD_LETTERED
    store.apply([(4, cancel)])
    row = store.rows("SELECT state, detail FROM locations")[0]
    assert row == {"state": ev.LocationState.CANCELLED, "detail": "sender re-sends a fixed copy"}
    types = [
        r["type"]
        for r in store.rows("SELECT type FROM events WHERE sop_instance_uid = ? ORDER BY seq", [p.sop_instance_uid])
    ]
    assert types[-1] == "instance.dead_letter_cancelled.v1"
    store.close()
