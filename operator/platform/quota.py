"""Per-namespace quota: who holds a trainer, who waits, and whether a job may start now (pure).

Accounting is level-based and restart-safe: it is computed afresh from the
cluster on every decision — the namespace's FineTuneJobs and their trainer
Jobs — never from memory. A job *holds* its share while its trainer Job is
unfinished and not suspended (or still has active pods). A job *waits* when it
passed validation, has not finished, is not suspended by its user, and its
trainer Job is missing or suspended. Jobs that name a Kueue queue are Kueue's
to admit and count here for nothing but `maxGpusPerJob`.

Waiting jobs start oldest first (creation timestamp, then name). The queue is
strict: when the oldest waiting job does not fit, younger ones wait behind it,
so a large job is never starved by a stream of small ones. A job that can never
fit (more GPUs than `maxGpusPerJob` or `maxTotalGpus`) waits without blocking.

A job counts `ResourcesSpec.job_gpus` of its typed spec, `gpus: auto` resolved to the
estimate's choice (`estimate.with_resolved_gpus`): the same number its trainer Job requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.api.schema import ValidationError
from kubetune.operator import conditions
from kubetune.operator.jobs import builders
from kubetune.operator.platform import estimate
from kubetune.operator.platform.policy import NamespaceLimits
from kubetune.operator.specs import spec_of

Body = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Usage:
    """One FineTuneJob as quota sees it."""

    name: str
    created: str
    """The FineTuneJob's creationTimestamp (RFC 3339; sorts in time order)."""
    gpus: int
    """GPUs its trainer requests."""
    holding: bool
    """Its trainer runs, or may run (counted against the limits)."""
    waiting: bool
    """It would run if there were room."""

    @property
    def order(self) -> tuple[str, str]:
        return (self.created, self.name)


@dataclasses.dataclass(frozen=True)
class Admission:
    """Whether a job may start its trainer now, and if not, why."""

    admitted: bool
    message: str = ""


ADMITTED = Admission(True)


def _finished(job: Body) -> bool:
    found = list((job.get("status") or {}).get("conditions") or [])
    return conditions.is_true(found, conditions.SUCCEEDED) or conditions.is_true(found, conditions.FAILED)


def trainer_finished(trainer: Body) -> bool:
    """Whether a trainer Job reached an outcome (it holds nothing any more)."""
    for condition in (trainer.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget") \
                and condition.get("status") == "True":
            return True
    return False


def queued(spec: FineTuneJobSpec) -> bool:
    """Whether the job names a Kueue queue (Kueue admits it, not this quota)."""
    return bool(spec.resource_settings().queue_name)


def usage_of(job: Body, spec: FineTuneJobSpec, trainer: Body | None) -> Usage:
    """How one FineTuneJob (its metadata and status from `job`, its typed spec with `gpus: auto`
    resolved) and its trainer Job (if any) count."""
    metadata = job.get("metadata") or {}
    finished = _finished(job) or (trainer is not None and trainer_finished(trainer))
    exempt = queued(spec) or finished
    holding = False
    waiting = False
    if not exempt:
        if trainer is not None:
            runs = not (trainer.get("spec") or {}).get("suspend")
            holding = runs or int((trainer.get("status") or {}).get("active") or 0) > 0
            waiting = not runs
        else:
            validated = conditions.is_true(list((job.get("status") or {}).get("conditions") or []),
                                           conditions.VALIDATED)
            waiting = validated
        waiting = waiting and not spec.suspend and not metadata.get("deletionTimestamp")
    return Usage(name=str(metadata.get("name", "")), created=str(metadata.get("creationTimestamp") or ""),
                 gpus=spec.resource_settings().job_gpus(), holding=holding, waiting=waiting)


def resolved_spec_of(job: Body) -> FineTuneJobSpec | None:
    """Another job's typed spec with `gpus: auto` resolved to its `status.estimate.gpus` (one per pod
    before its estimate: it neither waits nor holds until then); None when the spec does not parse
    (its own reconcile fails it with InvalidSpec)."""
    try:
        spec = spec_of(job)
    except ValidationError:
        return None
    known = ((job.get("status") or {}).get("estimate") or {})
    resources = estimate.with_resolved_gpus(spec.resource_settings(), known.get("gpus") if isinstance(known, dict)
                                            else None, spec.resource_settings().gpu_count())
    return dataclasses.replace(spec, resources=resources)


def namespace_usage(jobs: tuple[Body, ...], trainers: tuple[Body, ...]) -> list[Usage]:
    """Usage of every FineTuneJob in a namespace, joining trainer Jobs by their instance label."""
    by_owner = {}
    for trainer in trainers:
        owner = ((trainer.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_INSTANCE)
        if owner:
            by_owner[owner] = trainer
    found = []
    for job in jobs:
        metadata = job.get("metadata") or {}
        resolved = resolved_spec_of(job)
        if resolved is None:
            # Counted as holding nothing: a spec that does not parse never gets a trainer Job (one made
            # before a schema change is not counted until the job is fixed or ends).
            found.append(Usage(name=str(metadata.get("name", "")), created=str(metadata.get("creationTimestamp") or ""),
                               gpus=0, holding=False, waiting=False))
            continue
        found.append(usage_of(job, resolved, by_owner.get(metadata.get("name", ""))))
    return found


def never_fits(gpus: int, limits: NamespaceLimits) -> str:
    """Why a job with that many GPUs can never start under these limits ("" when it can)."""
    if limits.max_gpus_per_job and gpus > limits.max_gpus_per_job:
        return f"requests {gpus} GPUs; at most {limits.max_gpus_per_job} per job are allowed (maxGpusPerJob)"
    if limits.max_total_gpus and gpus > limits.max_total_gpus:
        return f"requests {gpus} GPUs; the namespace may hold at most {limits.max_total_gpus} (maxTotalGpus)"
    return ""


def admit(me: Usage, others: list[Usage], limits: NamespaceLimits) -> Admission:
    """Whether `me` (a job that wants to start its trainer) may start now, given the namespace's usage."""
    never = never_fits(me.gpus, limits)
    if never:
        return Admission(False, f"{never}; it starts only if the platform policy changes")
    if not limits.limits_running_jobs:
        return ADMITTED
    peers = [u for u in others if u.name != me.name]
    holding = [u for u in peers if u.holding]
    jobs, gpus = len(holding), sum(u.gpus for u in holding)
    queue = sorted([u for u in peers if u.waiting and not u.holding and not never_fits(u.gpus, limits)] + [me],
                   key=lambda u: u.order)
    ahead: list[str] = []
    for candidate in queue:
        fits = (not limits.max_concurrent_jobs or jobs + 1 <= limits.max_concurrent_jobs) and (
            not limits.max_total_gpus or gpus + candidate.gpus <= limits.max_total_gpus)
        if not fits:
            blocking = ahead + ([] if candidate is me else [candidate.name])
            why = f"; waiting behind older job(s) {', '.join(blocking)}" if blocking else ""
            usage = _usage_text(len(holding), sum(u.gpus for u in holding), limits)
            return Admission(False, f"{usage}{why}; starts when room frees up")
        if candidate is me:
            return ADMITTED
        jobs, gpus = jobs + 1, gpus + candidate.gpus
        ahead.append(candidate.name)
    return ADMITTED  # not reached: `me` is in the queue


def _usage_text(jobs: int, gpus: int, limits: NamespaceLimits) -> str:
    parts = []
    if limits.max_concurrent_jobs:
        parts.append(f"{jobs} of {limits.max_concurrent_jobs} concurrent jobs running (maxConcurrentJobs)")
    if limits.max_total_gpus:
        parts.append(f"{gpus} of {limits.max_total_gpus} GPUs held (maxTotalGpus)")
    return "namespace quota: " + ", ".join(parts)
