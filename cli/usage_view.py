"""What `kubetune usage [-n NS | -A] [--since TIME]` shows: accelerator- and CPU-seconds and tokens per namespace.

Reads only the FineTuneJobs' `status.usage` (the durable record the operator
keeps from the pods' own start and finish times and resources), so it works on
any cluster the current kubeconfig reaches and needs no Prometheus.

`--since` (an RFC 3339 time, or a duration such as `24h`, `7d`) counts only
the part of each pod's run and each serving slice after that time; tokens are
counted for the pods that finished after it. Open intervals (a running pod, the
serving slice in progress) count up to now.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetune.operator.platform import usage

Body = dict[str, Any]
COLUMNS = ("NAMESPACE", "JOBS", "TRAIN ACC-H", "TRAIN CPU-H", "VALID CPU-H", "SERVE ACC-H", "SERVE CPU-H", "TOKENS")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """`24h`, `7d`, `30m` before now, or an RFC 3339 time; ValueError naming what is allowed."""
    if not text:
        return None
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    moment = usage.parse_time(text.strip())
    if moment is None:
        raise ValueError(f"--since: {text!r} is neither a duration (30m, 24h, 7d, 2w) nor an RFC 3339 time "
                         "(2026-01-31T00:00:00Z)")
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _overlap(start: Any, end: Any, since: datetime | None, now: datetime) -> float:
    begin, finish = usage.parse_time(start), usage.parse_time(end) if end else now
    if begin is None or finish is None:
        return 0.0
    if since is not None:
        begin = max(begin, since)
    return max(0.0, (finish - begin).total_seconds())


def job_usage(job: Body, now: datetime, since: datetime | None = None) -> dict[str, float]:
    """One job's figures: `{kind}Accelerator`, `{kind}Cpu` (seconds) for training, validation and
    serving, and `tokens`. Without `since`, the stored totals plus the open intervals up to now."""
    stored = (job.get("status") or {}).get("usage")
    figures: dict[str, float] = {}
    if not isinstance(stored, dict):
        return {f"{k}{s}": 0.0 for k in usage.KINDS for s in ("Accelerator", "Cpu")} | {"tokens": 0.0}
    if since is None:
        for kind in usage.KINDS:
            figures[f"{kind}Accelerator"], figures[f"{kind}Cpu"] = usage.accrued(stored, kind, now)
        figures["tokens"] = float(stored.get("tokensProcessed") or 0)
        return figures
    # With --since, only the listed entries can be cut at that time; the folded `earlier` totals are
    # older than every listed entry, so they are left out.
    for kind in usage.KINDS:
        figures[f"{kind}Accelerator"] = figures[f"{kind}Cpu"] = 0.0
    figures["tokens"] = 0.0
    for entry in stored.get("attempts") or []:
        kind = str(entry.get("kind"))
        if kind not in usage.KINDS:
            continue
        seconds = _overlap(entry.get("startTime"), entry.get("finishTime"), since, now)
        figures[f"{kind}Accelerator"] += seconds * int(entry.get("accelerators") or 0)
        figures[f"{kind}Cpu"] += seconds * float(entry.get("cpus") or 0)
        finished = usage.parse_time(entry.get("finishTime"))
        if kind == usage.TRAINING and finished is not None and finished >= since:
            figures["tokens"] += float(entry.get("tokensProcessed") or 0)
    for piece in stored.get("servingSlices") or []:
        seconds = _overlap(piece.get("start"), piece.get("end"), since, now) * int(piece.get("replicas") or 0)
        figures["servingAccelerator"] += seconds * int(piece.get("acceleratorsPerReplica") or 0)
        figures["servingCpu"] += seconds * float(piece.get("cpusPerReplica") or 0)
    return figures


def rollup(jobs: Iterable[Body], now: datetime, since: datetime | None = None) -> dict[str, dict[str, float]]:
    """Namespace -> the summed figures of its jobs (plus `jobs`, how many)."""
    found: dict[str, dict[str, float]] = {}
    for job in jobs:
        namespace = str((job.get("metadata") or {}).get("namespace", ""))
        totals = found.setdefault(namespace, {"jobs": 0.0})
        totals["jobs"] += 1
        for key, value in job_usage(job, now, since).items():
            totals[key] = totals.get(key, 0.0) + value
    return found


def table(found: dict[str, dict[str, float]]) -> str:
    """The roll-up as a table; hours with two decimals (accelerator-hours and CPU-hours)."""
    def hours(value: float) -> str:
        return f"{value / 3600:.2f}"

    rows = [COLUMNS]
    for namespace in sorted(found):
        t = found[namespace]
        rows.append((namespace, str(int(t["jobs"])), hours(t.get("trainingAccelerator", 0)),
                     hours(t.get("trainingCpu", 0)), hours(t.get("validationCpu", 0)),
                     hours(t.get("servingAccelerator", 0)), hours(t.get("servingCpu", 0)),
                     str(int(t.get("tokens", 0)))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


Kubectl = Callable[..., Any]


def add_command(commands: Any, kubectl: Kubectl) -> None:
    """Register `kubetune usage` on the CLI's subcommands; `kubectl(args, *words)` runs kubectl."""
    command = commands.add_parser("usage", help="accelerator- and CPU-hours and tokens per namespace, from status.usage")
    command.add_argument("-n", "--namespace", default="", help="one namespace (default: the current one)")
    command.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    command.add_argument("--since", help="only usage after this time: 30m, 24h, 7d, 2w, or an RFC 3339 time")
    command.add_argument("--json", action="store_true", help="print the figures (seconds) as JSON")
    command.set_defaults(func=lambda args: run(args, kubectl))


def run(args: argparse.Namespace, kubectl: Kubectl) -> int:
    now = datetime.now(timezone.utc)
    try:
        since = parse_since(args.since, now)
    except ValueError as error:
        print(f"kubetune usage: {error}", file=sys.stderr)
        return 2
    words = ["get", "finetunejobs", "-o", "json"] + (["--all-namespaces"] if args.all_namespaces else [])
    proc = kubectl(args, *words)
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return 1
    found = rollup(json.loads(proc.stdout).get("items") or [], now, since)
    print(json.dumps(found, indent=2, sort_keys=True) if args.json else table(found))
    return 0
