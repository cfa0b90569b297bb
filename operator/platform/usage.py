"""What a FineTuneJob really used, brought up to date from its pods and its serving Deployment (pure).

`status.usage` is the durable record a platform team charges back on:

- one entry per pod (`attempts`): training and dataset-validation pods, each with its start and
  finish as the kubelet reported them, the accelerators and CPUs its containers were allocated
  (from the pod's own resources, not from the spec: `gpus: auto` on a CPU node counts 0), the
  accelerator- and CPU-seconds in between, and the tokens the trainer wrote into its termination
  message (`tokensProcessed`; the pod writes it, not a report pushed over the network, which a
  tenant holding the job's token could forge);
- serving in slices: while the serving Deployment has ready replicas, one open slice holds
  (start, replicas, devices per replica); a change of the ready count closes it and opens the
  next. The start is stored, so an operator restart continues the slice instead of losing it;
- totals per kind (training, validation, serving), tokens, and `lastUpdated`.

`update(previous, ...)` merges what is observed now into what was stored: a pod that is gone
(deleted by the TTL, or by the Job controller) keeps its entry, finished at the last time it was
seen if no finish was ever observed. Nothing here reads the clock or the API.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

Body = dict[str, Any]

TRAINING = "training"
VALIDATION = "validation"
SERVING = "serving"
KINDS = (TRAINING, VALIDATION, SERVING)

ACCELERATOR_SUFFIXES = ("/gpu", "/tpu")
"""Extended resources counted as accelerators: `nvidia.com/gpu`, `amd.com/gpu`, `google.com/tpu`, …"""
MAX_ATTEMPTS = 64
"""Pod entries kept (a Job's backoffLimit keeps far fewer); older ones fold into `earlier`."""
MAX_SLICES = 32
"""Serving slices kept; older closed ones fold into `earlier`."""
REFRESH_SECONDS = 60.0
"""How stale the running clock may get before a pass with nothing else new writes it: each write is
an API request and a watch event, and a reader adds the open intervals up to now itself."""

_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_FACTORS = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 2.0 ** 10, "Mi": 2.0 ** 20, "Gi": 2.0 ** 30, "Ti": 2.0 ** 40, "Pi": 2.0 ** 50, "Ei": 2.0 ** 60}


def quantity(value: Any) -> float:
    """A Kubernetes quantity (`2`, `500m`, `1k`) as a number; 0 for anything unreadable."""
    match = _QUANTITY.match(str(value).strip()) if value is not None else None
    if not match:
        return 0.0
    try:
        return float(match.group(1)) * _FACTORS[match.group(2)]
    except ValueError:
        return 0.0


def _container_resources(containers: list[Body]) -> tuple[int, float]:
    accelerators, cpus = 0, 0.0
    for container in containers:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        for key in set(limits) | set(requests):
            if key.endswith(ACCELERATOR_SUFFIXES):
                accelerators += int(quantity(limits.get(key, requests.get(key))))
        # CPU is charged as allocated (the request the scheduler reserved), else the limit.
        cpus += quantity(requests.get("cpu", limits.get("cpu")))
    return accelerators, cpus


def pod_devices(pod: Body) -> tuple[int, float]:
    """(accelerators, CPUs) allocated to a pod: the sum over its containers (init containers run
    before and hold their own share only while they run, so they are not added)."""
    return _container_resources(list((pod.get("spec") or {}).get("containers") or []))


def template_devices(deployment: Body) -> tuple[int, float]:
    """(accelerators, CPUs) per replica of a Deployment, from its pod template."""
    template = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return _container_resources(list(template.get("containers") or []))


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_interval(pod: Body) -> tuple[str, str] | None:
    """(start, finish) of a pod as the kubelet reported them; finish is "" while it runs; None when it
    never started (still Pending: no container has run, the scheduler may not even have placed it)."""
    status = pod.get("status") or {}
    states = [(c.get("state") or {}) for c in status.get("containerStatuses") or []]
    started = [s.get("running", {}).get("startedAt") or s.get("terminated", {}).get("startedAt")
               for s in states if "running" in s or "terminated" in s]
    started = [s for s in started if s]
    start = status.get("startTime") or (min(started) if started else "")
    if not start or not started:
        return None
    if states and all("terminated" in s for s in states):
        finished = [s["terminated"].get("finishedAt") for s in states if s["terminated"].get("finishedAt")]
        return str(start), str(max(finished)) if finished else str(start)
    return str(start), ""


def termination_tokens(pod: Body, container: str) -> int | None:
    """`tokensProcessed` from the container's termination message (the trainer writes it on exit)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if status.get("name") != container or not isinstance(terminated, dict):
            continue
        try:
            summary = json.loads(str(terminated.get("message") or ""))
        except ValueError:
            return None
        tokens = summary.get("tokensProcessed") if isinstance(summary, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            return tokens
    return None


def _seconds(start: str, finish: str, until: datetime) -> float:
    begin = parse_time(start)
    end = parse_time(finish) if finish else until
    if begin is None or end is None:
        return 0.0
    return max(0.0, (end - begin).total_seconds())


def _attempt_entry(pod: Body, kind: str, container: str) -> Body | None:
    interval = pod_interval(pod)
    if interval is None:
        return None
    accelerators, cpus = pod_devices(pod)
    entry: Body = {"pod": str((pod.get("metadata") or {}).get("name", "")), "kind": kind,
                   "startTime": interval[0], "accelerators": accelerators, "cpus": round(cpus, 3)}
    if interval[1]:
        entry["finishTime"] = interval[1]
    tokens = termination_tokens(pod, container)
    if tokens is not None:
        entry["tokensProcessed"] = tokens
    return entry


def _close_slice(entry: Body, at: str) -> Body:
    return {**entry, "end": at} if not entry.get("end") else entry


def update(previous: Any, *, now: datetime, training_pods: tuple[Body, ...] = (),
           validation_pods: tuple[Body, ...] = (), trainer_container: str = "trainer",
           validation_container: str = "validate", serving: Body | None = None) -> Body:
    """`status.usage` brought up to `now` from the pods and serving Deployment observed now.

    `serving` is the serving Deployment (None when there is none): its ready replicas accrue."""
    before: Body = previous if isinstance(previous, dict) else {}
    last_seen = str(before.get("lastUpdated") or "") or rfc3339(now)
    entries: dict[str, Body] = {str(e.get("pod")): dict(e) for e in before.get("attempts") or []
                                if isinstance(e, dict) and e.get("pod")}
    observed: set[str] = set()
    for pods, kind, container in ((training_pods, TRAINING, trainer_container),
                                  (validation_pods, VALIDATION, validation_container)):
        for pod in pods:
            entry = _attempt_entry(pod, kind, container)
            if entry is None:
                continue
            observed.add(entry["pod"])
            known = entries.get(entry["pod"], {})
            entries[entry["pod"]] = {**known, **entry}
    for name, entry in entries.items():
        if name not in observed and not entry.get("finishTime"):
            # Gone without a finish ever seen (deleted while the operator was down): the last time it
            # was known to run is the most that can be charged.
            entry["finishTime"] = last_seen
    ordered = sorted(entries.values(), key=lambda e: (str(e.get("startTime")), str(e.get("pod"))))
    earlier: Body = {k: dict(v) for k, v in (before.get("earlier") or {}).items() if k in KINDS} \
        if isinstance(before.get("earlier"), dict) else {}
    while len(ordered) > MAX_ATTEMPTS and ordered[0].get("finishTime"):
        folded = ordered.pop(0)
        _fold(earlier, str(folded.get("kind")), folded, now)
    for entry in ordered:
        seconds = _seconds(str(entry["startTime"]), str(entry.get("finishTime") or ""), now)
        entry["acceleratorSeconds"] = round(seconds * int(entry.get("accelerators") or 0), 3)
        entry["cpuSeconds"] = round(seconds * float(entry.get("cpus") or 0), 3)
    slices = _serving_slices(before, serving, now)
    while len(slices) > MAX_SLICES and slices[0].get("end"):
        _fold(earlier, SERVING, slices.pop(0), now)
    usage: Body = {"attempts": ordered}
    if slices:
        usage["servingSlices"] = slices
    if earlier:
        usage["earlier"] = earlier
    for kind in KINDS:
        accelerator, cpu = _earlier(earlier, kind)
        if kind == SERVING:
            for piece in slices:
                seconds = _seconds(str(piece["start"]), str(piece.get("end") or ""), now)
                accelerator += seconds * int(piece.get("replicas") or 0) * int(piece.get("acceleratorsPerReplica") or 0)
                cpu += seconds * int(piece.get("replicas") or 0) * float(piece.get("cpusPerReplica") or 0)
        else:
            accelerator += sum(float(e["acceleratorSeconds"]) for e in ordered if e.get("kind") == kind)
            cpu += sum(float(e["cpuSeconds"]) for e in ordered if e.get("kind") == kind)
        usage[kind] = {"acceleratorSeconds": round(accelerator, 3), "cpuSeconds": round(cpu, 3)}
    usage["tokensProcessed"] = int((earlier.get(TRAINING) or {}).get("tokensProcessed") or 0) + sum(
        int(e.get("tokensProcessed") or 0) for e in ordered if e.get("kind") == TRAINING)
    usage["trainingAttempts"] = int((earlier.get(TRAINING) or {}).get("attempts") or 0) + sum(
        1 for e in ordered if e.get("kind") == TRAINING)
    usage["lastUpdated"] = rfc3339(now)
    if before and not _worth_writing(before, usage, now):
        return before
    return usage


def _fold(earlier: Body, kind: str, entry: Body, now: datetime) -> None:
    """Add an entry that is dropped from the lists into the per-kind totals kept for it."""
    target = earlier.setdefault(kind, {})
    if kind == SERVING:
        seconds = _seconds(str(entry["start"]), str(entry.get("end") or ""), now)
        replicas = int(entry.get("replicas") or 0)
        accelerator = seconds * replicas * int(entry.get("acceleratorsPerReplica") or 0)
        cpu = seconds * replicas * float(entry.get("cpusPerReplica") or 0)
    else:
        seconds = _seconds(str(entry["startTime"]), str(entry.get("finishTime") or ""), now)
        accelerator = seconds * int(entry.get("accelerators") or 0)
        cpu = seconds * float(entry.get("cpus") or 0)
        target["attempts"] = int(target.get("attempts") or 0) + 1
        target["tokensProcessed"] = int(target.get("tokensProcessed") or 0) + int(entry.get("tokensProcessed") or 0)
    target["acceleratorSeconds"] = round(float(target.get("acceleratorSeconds") or 0) + accelerator, 3)
    target["cpuSeconds"] = round(float(target.get("cpuSeconds") or 0) + cpu, 3)


def _earlier(earlier: Body, kind: str) -> tuple[float, float]:
    found = earlier.get(kind) or {}
    return float(found.get("acceleratorSeconds") or 0), float(found.get("cpuSeconds") or 0)


def _serving_slices(before: Body, deployment: Body | None, now: datetime) -> list[Body]:
    """The serving slices with the Deployment's ready replicas now: the open slice continues while
    the count and the devices per replica stay; any change closes it (at now) and opens another."""
    slices = [dict(s) for s in before.get("servingSlices") or [] if isinstance(s, dict) and s.get("start")]
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    accelerators, cpus = template_devices(deployment) if deployment is not None else (0, 0.0)
    stamp = rfc3339(now)
    current = slices[-1] if slices and not slices[-1].get("end") else None
    wanted = {"replicas": ready, "acceleratorsPerReplica": accelerators, "cpusPerReplica": round(cpus, 3)}
    if current is not None and all(current.get(k) == v for k, v in wanted.items()):
        return slices
    if current is not None:
        slices[-1] = _close_slice(current, stamp)
    if ready > 0:
        slices.append({"start": stamp, **wanted})
    return slices


def _shape(usage: Body) -> Any:
    """What changes only when something happens (a pod starts or ends, a slice opens or closes),
    as opposed to the running clock."""
    return ([{k: v for k, v in e.items() if k not in ("acceleratorSeconds", "cpuSeconds")}
             for e in usage.get("attempts") or []], usage.get("servingSlices"), usage.get("earlier"),
            usage.get("tokensProcessed"))


def _worth_writing(before: Body, after: Body, now: datetime) -> bool:
    if _shape(before) != _shape(after):
        return True
    last = parse_time(before.get("lastUpdated"))
    return last is None or (now - last).total_seconds() >= REFRESH_SECONDS


def accrued(usage: Any, kind: str, now: datetime) -> tuple[float, float]:
    """(accelerator-seconds, CPU-seconds) of one kind up to `now`: the stored totals plus what the
    intervals still open (a running pod, the open serving slice) accrued since `lastUpdated`."""
    if not isinstance(usage, dict):
        return 0.0, 0.0
    totals = usage.get(kind) or {}
    accelerator, cpu = float(totals.get("acceleratorSeconds") or 0), float(totals.get("cpuSeconds") or 0)
    last = parse_time(usage.get("lastUpdated"))
    if last is None or now <= last:
        return accelerator, cpu
    extra = (now - last).total_seconds()
    if kind == SERVING:
        for piece in usage.get("servingSlices") or []:
            if not piece.get("end"):
                replicas = int(piece.get("replicas") or 0)
                accelerator += extra * replicas * int(piece.get("acceleratorsPerReplica") or 0)
                cpu += extra * replicas * float(piece.get("cpusPerReplica") or 0)
    else:
        for entry in usage.get("attempts") or []:
            if entry.get("kind") == kind and not entry.get("finishTime"):
                accelerator += extra * int(entry.get("accelerators") or 0)
                cpu += extra * float(entry.get("cpus") or 0)
    return accelerator, cpu
