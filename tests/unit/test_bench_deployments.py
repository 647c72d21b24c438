"""The deployments bench's pure parts: options, the order of the legs, the table."""

from __future__ import annotations

from tests.bench.deployments import LEGS, Options, parse, plan, spread, table


def test_parse_defaults_and_flags():
    o = parse([])
    assert isinstance(o, Options)
    assert (o.images, o.rounds, o.legs, o.kills) == (1000, 1, LEGS, 3)
    o = parse(["--images=200", "--rounds=2", "--legs=local,compose", "--kills=5"])
    assert isinstance(o, Options)
    assert (o.images, o.rounds, o.legs, o.kills) == (200, 2, ("local", "compose"), 5)


def test_parse_says_what_is_wrong():
    assert "unknown flag" in str(parse(["--quick"]))
    assert "--legs" in str(parse(["--legs=local,k8s"]))
    assert "whole number" in str(parse(["--images=many"]))
    assert ">=" in str(parse(["--rounds=0"]))


def test_plan_reverses_every_other_round_and_kills_last():
    assert plan(LEGS, 2) == [
        ("local", 0),
        ("local-s3", 0),
        ("cluster", 0),
        ("compose", 0),
        ("compose", 1),
        ("cluster", 1),
        ("local-s3", 1),
        ("local", 1),
        ("kills", 0),
    ]
    assert plan(("kills", "local"), 1) == [("local", 0), ("kills", 0)]
    assert plan(("compose",), 3) == [("compose", 0), ("compose", 1), ("compose", 2)]


def test_spread_is_min_median_max():
    assert spread([6.0, 4.0, 5.5]) == (4.0, 5.5, 6.0)
    assert spread([1.0, 2.0]) == (1.0, 1.5, 2.0)


def test_table_puts_each_leg_next_to_the_local_stack():
    text = table({"local": [100.0, 80.0], "cluster": [45.0, 55.0]}, {}, [4.5, 6.0, 5.0])
    lines = text.splitlines()
    assert lines[0].startswith("| leg |")
    assert "| 100.0, 80.0 | 90.0 | 1.00x |" in lines[2]
    assert "| 45.0, 55.0 | 50.0 | 0.56x |" in lines[3]
    assert "min 4.50, median 5.00, max 6.00" in lines[4]
    assert len(lines) == 5  # compose did not run: no row


def test_table_says_which_leg_failed_and_why():
    text = table({"compose": [30.0]}, {"local": "TimeoutError: nodes live"}, [])
    assert "failed: TimeoutError: nodes live" in text
    assert "| 30.0 | 30.0 |  |" in text  # no local median: no ratio
