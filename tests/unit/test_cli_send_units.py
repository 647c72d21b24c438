"""switchyard send's pieces (files, contexts, statuses), the progress display and the forwarder's summary line."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest

from services.forwarder.worker import DeliverySummary
from switchyard import send
from switchyard.cli import main, package_version
from switchyard.corpus import generate_studies
from switchyard.progress import Progress


def test_statuses_are_classified_and_explained():
    assert send.outcome_of(0x0000) == send.OK
    assert send.outcome_of(0xB000) == send.WARNING and send.outcome_of(0x0001) == send.WARNING
    for refused in (0xA700, 0xA900, 0xC000, 0xC001, 0x0122, 0x0211):
        assert send.outcome_of(refused) == send.REFUSED
    assert "retry may help" in send.meaning(0xA701)
    assert "will not help" in send.meaning(0xC123) and "will not help" in send.meaning(0xA950)


def test_files_are_found_recursively_and_inspected_from_their_meta(tmp_path):
    files = generate_studies(tmp_path / "c", studies=1, series_per_study=2, instances_per_series=2, seed=3)
    (tmp_path / "c" / "notes.txt").write_text("not dicom")
    found = send.find_files([tmp_path / "c"])
    assert sorted(found) == sorted([*files, tmp_path / "c" / "notes.txt"])
    items = [send.inspect(p) for p in found]
    bad = [i for i in items if i.outcome == send.FAILED]
    assert [i.path.name for i in bad] == ["notes.txt"] and "not a DICOM Part 10 file" in bad[0].detail
    good = [i for i in items if not i.outcome]
    assert all(i.sop_class and i.sop_instance and i.transfer_syntax and i.offset > 132 for i in good)
    assert "------ failed: not a DICOM" in send.line_for(bad[0])


def test_contexts_are_split_across_associations_beyond_the_limit():
    items = [send.Item(path=Path(f"{n}"), sop_class=f"1.2.{n}", transfer_syntax="1.2") for n in range(250)]
    groups = send.groups(items)
    assert [len(g) for g in groups] == [send.MAX_CONTEXTS, send.MAX_CONTEXTS, 10]
    assert [i for g in groups for i in g] == items


def test_progress_prints_plain_lines_off_a_terminal_and_a_bar_on_one():
    plain = io.StringIO()
    with Progress("send", 4, "files", stream=plain, interval=0) as p:
        p.advance()
        p.echo("a.dcm: 0x0000 success", out=io.StringIO())
        p.advance(3)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("send: 1/4 files  25%") and lines[-1].startswith("send: 4/4 files 100%")
    assert "\r" not in plain.getvalue()
    bar, out = io.StringIO(), io.StringIO()
    p = Progress("rebuild", None, "events", stream=bar, tty=True)
    p.update(10, 20)
    p.echo("a line", out=out)
    p.close()
    assert "\r\x1b[K" in bar.getvalue() and "[##############--------------] 10/20 events" in bar.getvalue()
    assert out.getvalue() == "a line\n" and bar.getvalue().endswith("\n")


def test_progress_shows_a_rate_only_after_a_second():
    """Work done before the bar started (the demo's first check finds 165 delivered) is no rate."""
    p = Progress("demo: delivered", 191, "instances", stream=io.StringIO())
    p.update(165)
    assert p.text() == "demo: delivered: 165/191 instances  86%"
    p.started -= 2.0  # two seconds on
    assert "/s, 2s elapsed, ~" in p.text()


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"switchyard {package_version()}"
    assert package_version()[0].isdigit()


async def test_forwarder_summary_is_one_line_per_period_per_node(caplog):
    caplog.set_level(logging.INFO, logger="switchyard.forwarder.worker")
    summary = DeliverySummary("node2 (NODE2)", every=0.2)
    for _ in range(5):
        summary.forwarded()
    assert [r.getMessage() for r in caplog.records] == ["node2 (NODE2): 1 instance forwarded in 0.0s"]
    # The tail of the spell is logged by the timer, though nothing more arrives.
    deadline = asyncio.get_running_loop().time() + 5
    while len(caplog.records) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert caplog.records[1].getMessage().startswith("node2 (NODE2): 4 instances forwarded in ")


def test_progress_says_nothing_more_when_the_work_failed():
    plain = io.StringIO()
    with pytest.raises(RuntimeError), Progress("rebuild", None, "events", stream=plain, interval=60):
        raise RuntimeError("log unreachable")
    assert plain.getvalue() == ""
