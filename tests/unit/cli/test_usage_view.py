"""`kubetune usage`: the per-namespace roll-up of status.usage, whole or since a time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetune.cli import main as cli, usage_view

NOW = datetime(2026, 1, 2, 0, 0, 0, tzinfo=timezone.utc)


def job(namespace: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": "j"}, "status": {"usage": usage} if usage else {}}


STORED = {
    "attempts": [
        {"pod": "v", "kind": "validation", "startTime": "2026-01-01T00:00:00Z", "finishTime": "2026-01-01T00:01:00Z",
         "accelerators": 0, "cpus": 1.0, "acceleratorSeconds": 0.0, "cpuSeconds": 60.0},
        {"pod": "t0", "kind": "training", "startTime": "2026-01-01T00:01:00Z", "finishTime": "2026-01-01T01:01:00Z",
         "accelerators": 2, "cpus": 4.0, "acceleratorSeconds": 7200.0, "cpuSeconds": 14400.0, "tokensProcessed": 100},
        {"pod": "t1", "kind": "training", "startTime": "2026-01-01T23:00:00Z",
         "accelerators": 1, "cpus": 1.0, "acceleratorSeconds": 1800.0, "cpuSeconds": 1800.0},
    ],
    "servingSlices": [{"start": "2026-01-01T22:00:00Z", "end": "2026-01-01T23:00:00Z", "replicas": 2,
                       "acceleratorsPerReplica": 1, "cpusPerReplica": 0.5}],
    "training": {"acceleratorSeconds": 9000.0, "cpuSeconds": 16200.0},
    "validation": {"acceleratorSeconds": 0.0, "cpuSeconds": 60.0},
    "serving": {"acceleratorSeconds": 7200.0, "cpuSeconds": 3600.0},
    "tokensProcessed": 100,
    "lastUpdated": "2026-01-01T23:30:00Z",
}


def test_whole_usage_is_the_stored_totals_plus_the_open_pod_up_to_now() -> None:
    found = usage_view.rollup([job("a", STORED), job("a", None), job("b", STORED)], NOW)
    assert found["a"]["jobs"] == 2
    # t1 still runs: 30 more minutes on one accelerator since lastUpdated.
    assert found["a"]["trainingAccelerator"] == 9000.0 + 1800.0
    assert found["a"]["servingAccelerator"] == 7200.0 and found["a"]["tokens"] == 100
    assert found["b"] == found["a"] | {"jobs": 1.0}


def test_since_cuts_every_interval_at_that_time() -> None:
    since = usage_view.parse_since("90m", NOW)
    assert since == NOW - timedelta(minutes=90)
    found = usage_view.rollup([job("a", STORED)], NOW, since)["a"]
    assert found["trainingAccelerator"] == 3600.0  # t1 from 23:00 to now
    assert found["servingAccelerator"] == 2 * 1800.0  # the slice from 22:30 to 23:00, two replicas
    assert found["validationCpu"] == 0.0 and found["tokens"] == 0.0


def test_a_bad_since_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="--since: 'yesterday' is neither a duration"):
        usage_view.parse_since("yesterday", NOW)
    assert usage_view.parse_since("2026-01-01T00:00:00Z", NOW) == datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_the_table_shows_hours_per_namespace() -> None:
    text = usage_view.table(usage_view.rollup([job("team-a", STORED)], NOW))
    header, row = text.splitlines()
    assert header.split()[0] == "NAMESPACE" and row.split()[0] == "team-a"
    assert row.split()[2] == "3.00"  # training accelerator-hours: 9000 s + 1800 s open


def test_the_cli_has_the_command() -> None:
    args = cli.build_parser().parse_args(["usage", "-n", "team-a", "--since", "7d"])
    assert args.namespace == "team-a" and args.since == "7d" and callable(args.func)
