"""Progress reports from trainer pods: authentication, validation, replay guard, status patches (pure).

A trainer pod pushes small JSON reports (`kubetune.api.messages.ProgressReport`; docs/operator.md,
"Progress reports"). This
module decides whether one is acceptable and what it changes in the
FineTuneJob's status; the HTTP endpoint in `progress` only wires it to aiohttp
and the API server.

Order of checks, cheapest and least revealing first: size, nesting depth and
JSON syntax (`decode_report`), the job it names (`report_job`), the token
(`authenticate`), the per-job rate (`RateLimiter`), and only then the fields
(`validate_report`), so a caller without a token learns nothing about them.

Authentication: each job gets the token HMAC-SHA256(operator key,
"<namespace>/<name>/<uid>") in a Secret of its own; a report is accepted only
when its bearer token is the token of the job it names, so a job can report
for itself and for nothing else (the uid also tells a recreated job with the
same name apart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
from datetime import datetime
from typing import Annotated, Any, TypedDict

from kubetune.api import finetunejob as models, messages, schema as apischema
from kubetune.api.schema import MaxItems, PreserveUnknownFields
from kubetune.operator.jobs import render

Body = dict[str, Any]

# The message definitions are shared with the trainer (kubetune.api.messages); this module adds the
# operator's limits and the status schema's checks.
KINDS = messages.KINDS
TERMINAL_KINDS = messages.TERMINAL_KINDS
NUMBER_FIELDS = messages.number_fields(messages.ReportFields)
COUNT_FIELDS = messages.count_fields(messages.ReportFields)
MAX_MESSAGE_CHARS = 1024
MAX_RESULTS = 64
MAX_REPORT_DEPTH = 16
"""Deepest nesting of objects and arrays a report may have (real reports nest 3 deep), so nothing that
handles a report later can run out of recursion."""
STRUCTURED_RESULTS = messages.STRUCTURED_RESULTS
"""Keys of `results` whose values are objects (checked against `status.results`' schema); every
other key is a metric name with a number."""
MAX_EVALUATIONS = 512
"""Evaluations kept in `status.metrics.evaluations` (the newest; the CRD's bound)."""
EVALUATION_FIELDS = ("valLoss", "valPerplexity", "valTokenAccuracy", "valAccuracy", "valF1")
"""Figures of one evaluation kept in the learning curve (top-level fields or `results` of the report)."""
RESOLVED_FIELDS = tuple(models.ResolvedHyperparameters.__annotations__)
"""Keys of `resolved` (the trainer's resolved hyperparameters) that reach `status.resolved`."""


class ReportError(ValueError):
    """A rejected report: `status` is the HTTP status to answer, `reason` a CamelCase word for metrics."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: float | None = None) -> None:
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        """Seconds the sender should wait before trying again (HTTP 429's Retry-After)."""
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class JobKey:
    """Identity of a FineTuneJob, as named in a report and signed in its token."""

    namespace: str
    name: str
    uid: str

    def signed_text(self) -> str:
        return f"{self.namespace}/{self.name}/{self.uid}"


@dataclasses.dataclass(frozen=True)
class Report:
    """A parsed, well-formed report (not yet authenticated)."""

    job: JobKey
    attempt: int
    seq: int
    time: datetime
    kind: str
    body: Body
    """The whole report, as sent."""

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


def job_token(key: bytes, job: JobKey) -> str:
    """The bearer token of one job."""
    return hmac.new(key, job.signed_text().encode(), hashlib.sha256).hexdigest()


def authenticate(key: bytes, authorization: str | None, job: JobKey) -> None:
    """Raise ReportError 401 without a bearer token, 403 when the token is not this job's."""
    if not key:
        raise ReportError(503, "NoKey", "the operator has no secret key; it accepts no reports")
    if not authorization or not authorization.startswith("Bearer "):
        raise ReportError(401, "MissingToken", "Authorization: Bearer <token> required")
    presented = authorization[len("Bearer "):].strip()
    if not hmac.compare_digest(presented.encode(), job_token(key, job).encode()):
        raise ReportError(403, "WrongToken", f"token is not valid for job {job.signed_text()}")


def _nesting_depth(value: Any, limit: int) -> int:
    """How deep arrays and objects nest in a decoded value (iteratively; stops counting past `limit`)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def decode_report(raw: bytes, max_bytes: int) -> Body:
    """The report's JSON object: size, nesting depth and syntax checked (ReportError 413/400); nothing else."""
    if len(raw) > max_bytes:
        raise ReportError(413, "TooLarge", f"report is {len(raw)} bytes; at most {max_bytes} allowed")
    too_deep = ReportError(400, "Malformed", f"report nests arrays/objects more than {MAX_REPORT_DEPTH} deep")
    try:
        # json's C decoder raises RecursionError (it used to escape as a 500) near 1000 levels
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as error:
        raise ReportError(400, "Malformed", f"report is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ReportError(400, "Malformed", "report must be a JSON object")
    # Depth cannot exceed the number of opening brackets, and real reports have a handful: only a
    # report with many is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_REPORT_DEPTH and _nesting_depth(body, MAX_REPORT_DEPTH) > MAX_REPORT_DEPTH:
        raise too_deep
    return body


def report_job(body: Body) -> JobKey:
    """The job a decoded report names (what its token must be for); ReportError 400 when it names none."""
    job = body.get("job")
    if not isinstance(job, dict) or not all(isinstance(job.get(f), str) and job.get(f)
                                            for f in ("namespace", "name", "uid")):
        raise ReportError(400, "Malformed", "job: must be an object with non-empty namespace, name and uid")
    return JobKey(job["namespace"], job["name"], job["uid"])


def parse_report(raw: bytes, max_bytes: int) -> Report:
    """Decode and check a whole report without authenticating it; ReportError 413/400 naming the problem."""
    body = decode_report(raw, max_bytes)
    try:
        key = report_job(body)
    except ReportError as job_problem:
        try:
            validate_report(body, JobKey("", "", ""))
        except ReportError as other_problems:  # one message lists every problem
            raise ReportError(400, "Malformed", f"{job_problem}; {other_problems}") from None
        raise
    return validate_report(body, key)


def validate_report(body: Body, key: JobKey) -> Report:
    """Check the fields of a decoded report from job `key`; ReportError 400 listing every problem."""
    problems: list[str] = []
    attempt, seq = body.get("attempt"), body.get("seq")
    if not _is_count(attempt):
        problems.append(f"attempt: must be an integer >= 0, got {attempt!r}")
    if not _is_count(seq):
        problems.append(f"seq: must be an integer >= 0, got {seq!r}")
    kind = body.get("kind")
    if kind not in KINDS:
        problems.append(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    when = _parse_time(body.get("time"))
    if when is None:
        problems.append(f"time: must be an RFC 3339 timestamp, got {body.get('time')!r}")
    for field in NUMBER_FIELDS:
        if field in body and body[field] is not None and not _is_number(body[field]):
            problems.append(f"{field}: must be a finite number, got {body[field]!r}")
    for field in COUNT_FIELDS:
        if field in body and body[field] is not None and not _is_count(body[field]):
            problems.append(f"{field}: must be an integer >= 0, got {body[field]!r}")
    problems.extend(_optional_part_problems(body))
    if problems or when is None or not isinstance(attempt, int) or not isinstance(seq, int):
        raise ReportError(400, "Malformed", "; ".join(problems))
    return Report(job=key, attempt=attempt, seq=seq, time=when, kind=str(kind), body=body)


def _optional_part_problems(body: Body) -> list[str]:
    problems = []
    checkpoint = body.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, dict) or not _is_count(checkpoint.get("step"))
                                   or not isinstance(checkpoint.get("path", ""), str)):
        problems.append("checkpoint: must be an object with an integer step and a string path")
    problems.extend(_results_problems(body.get("results")))
    if body.get("samples") is not None:
        problems.extend(_schema_problems("samples", body["samples"]))
    model = body.get("model")
    if model is not None and (not isinstance(model, dict)
                              or not all(isinstance(model.get(k, ""), str) for k in ("uri", "digest"))):
        problems.append("model: must be an object with string uri and digest")
    if body.get("message") is not None and not isinstance(body.get("message"), str):
        problems.append("message: must be a string")
    if body.get("tracking") is not None:
        problems.extend(_schema_problems("tracking", body["tracking"]))
        if not isinstance(body["tracking"], dict) or "state" not in body["tracking"]:
            problems.append("tracking: must be an object with a state (ok or unavailable)")
    resolved = body.get("resolved")
    if resolved is not None:
        if not isinstance(resolved, dict):
            problems.append("resolved: must be an object of resolved hyperparameters")
        else:
            try:
                apischema.parse(models.ResolvedHyperparameters, _known_resolved(resolved), "resolved")
            except apischema.ValidationError as error:
                problems.extend(error.problems)
    return problems


class _StatusParts(TypedDict, total=False):
    """Parts of a report that reach status as they are, typed as there."""

    results: Annotated[models.EvaluationResults, PreserveUnknownFields()]
    """Test metrics (`status.results`)."""
    samples: Annotated[list[models.SampleAnswer], MaxItems(20)]
    """Test prompts with the base and the tuned model's answers (`status.samples`)."""
    tracking: models.TrackingStatus
    """Experiment tracking state (`status.tracking`)."""


def _schema_problems(key: str, value: Any) -> list[str]:
    """What in `value` does not fit `status.<key>`'s schema, by field path."""
    try:
        apischema.parse(_StatusParts, {key: value}, "")
    except apischema.ValidationError as error:
        return [problem.removeprefix(".") for problem in error.problems]
    return []


def _results_problems(results: Any) -> list[str]:
    """`results`: metric names to numbers, plus the structured fields of the status schema (per-class
    metrics, confusion matrix, `baseline`, `improvement`), each checked against it."""
    if results is None:
        return []
    message = (f"results: must be an object of at most {MAX_RESULTS} metric names to numbers "
               f"(and {', '.join(STRUCTURED_RESULTS)} as in status.results)")
    if not isinstance(results, dict) or len(results) > MAX_RESULTS:
        return [message]
    if not all(isinstance(k, str) and (_is_number(v) or k in STRUCTURED_RESULTS) for k, v in results.items()):
        return [message]
    problems = _schema_problems("results", results)
    if problems:
        return problems
    baseline = results.get("baseline")
    if isinstance(baseline, dict) and not all(_is_number(v) or k in STRUCTURED_RESULTS for k, v in baseline.items()):
        return ["results.baseline: must be an object of metric names to numbers, like results"]
    return []


def _known_resolved(value: Body) -> Body:
    # A newer trainer may resolve more fields; those are dropped rather than failing the report.
    return {k: v for k, v in value.items() if k in RESOLVED_FIELDS}


def resolved_hyperparameters(value: Any) -> Body:
    """The known, well-typed part of a `resolved` object (from a report or the termination summary);
    {} when it is absent or does not fit the status schema."""
    if not isinstance(value, dict):
        return {}
    try:
        return dict(apischema.parse(models.ResolvedHyperparameters, _known_resolved(value), "resolved"))
    except apischema.ValidationError:
        return {}


def tracking_status(value: Any) -> Body:
    """`value` when it is a tracking state that fits `status.tracking` (with its `state`), else {}."""
    if not isinstance(value, dict) or "state" not in value or _schema_problems("tracking", value):
        return {}
    return dict(value)


def sample_answers(value: Any) -> list[Body]:
    """`value` when it is a list of sample answers that fits `status.samples`, else []."""
    if not isinstance(value, list) or not value or _schema_problems("samples", value):
        return []
    return [dict(item) for item in value]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


@dataclasses.dataclass
class _AttemptState:
    seq: int
    time: datetime


class ReplayGuard:
    """Rejects replayed and stale reports.

    Per job uid and attempt, `seq` must grow. A pod that replaces another within
    the same attempt (after a preemption, or a suspend/resume) starts its
    sequence again; it may do so with a `started` report newer than anything
    accepted for that attempt. Reports of an attempt older than the newest one
    seen are stale.
    """

    def __init__(self) -> None:
        self._attempts: dict[tuple[str, int], _AttemptState] = {}
        self._latest_attempt: dict[str, int] = {}

    def check(self, report: Report) -> None:
        """Raise ReportError 409 if the report is a replay or stale; do not record it."""
        uid = report.job.uid
        latest = self._latest_attempt.get(uid)
        if latest is not None and report.attempt < latest:
            raise ReportError(409, "StaleAttempt",
                              f"attempt {report.attempt} is older than attempt {latest} already reporting")
        state = self._attempts.get((uid, report.attempt))
        if state is None or report.seq > state.seq:
            return
        if report.kind == "started" and report.time > state.time:
            return
        raise ReportError(409, "Replayed", f"seq {report.seq} of attempt {report.attempt} is not newer than "
                                           f"seq {state.seq} already accepted")

    def record(self, report: Report) -> None:
        """Remember an accepted report."""
        uid = report.job.uid
        self._latest_attempt[uid] = max(report.attempt, self._latest_attempt.get(uid, 0))
        self._attempts[(uid, report.attempt)] = _AttemptState(seq=report.seq, time=report.time)

    def forget(self, uid: str) -> None:
        """Drop what is known about a deleted job."""
        self._latest_attempt.pop(uid, None)
        for key in [k for k in self._attempts if k[0] == uid]:
            del self._attempts[key]


class WriteThrottle:
    """At most one status write per job per `interval` seconds; terminal reports always pass."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def due(self, uid: str, now: float, *, terminal: bool) -> bool:
        """Whether a write may happen now."""
        last = self._last.get(uid)
        return terminal or last is None or now - last >= self.interval

    def wrote(self, uid: str, now: float) -> None:
        self._last[uid] = now

    def wait_seconds(self, uid: str, now: float) -> float:
        """How long until the next write is due (0 when due now)."""
        last = self._last.get(uid)
        return 0.0 if last is None else max(0.0, self.interval - (now - last))


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per job: up to `burst` reports at once, then `rate` per second.

    A trainer reports a few times a second at most; a job that sends far more is
    misbehaving or hostile, and each accepted report costs the operator a merge
    and, eventually, a status write."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, uid: str, now: float) -> float:
        """Take one report's token: 0.0 when the report may pass, else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def forget(self, uid: str) -> None:
        self._buckets.pop(uid, None)


def _pick(body: Body, fields: tuple[str, ...]) -> Body:
    return {f: body[f] for f in fields if body.get(f) is not None}


def merge_report(status: Body, report: Report, *, recent_checkpoints: int) -> Body:
    """The status fields a report changes: `progress`, `metrics`, `checkpoints`, `results`, `model`,
    `resolved`, `samples`, `tracking`.

    `status` holds these fields as last known (from earlier reports or the
    object); the result is a new dict of the same fields, ready to merge-patch.
    """
    body = report.body
    progress = dict(status.get("progress") or {})
    progress.update(_pick(body, ("step", "totalSteps", "epoch", "tokensSeen", "tokensPerSecond", "etaSeconds")))
    progress["attempt"] = report.attempt
    if report.kind == "started":
        # A new attempt starts at 0 or at the checkpoint it resumed from; its predecessor's step is not its own.
        start = body.get("step")
        progress["step"] = progress["startStep"] = start if _is_count(start) else 0
    step, total = progress.get("step"), progress.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        progress["percent"] = round(min(100.0, 100.0 * step / total), 1)
    if report.kind == "completed":
        progress["percent"] = 100.0
        progress["etaSeconds"] = 0
    metrics = dict(status.get("metrics") or {})
    metrics.update(_pick(body, ("trainLoss", "valLoss", "valPerplexity", "learningRate")))
    if report.kind == "evaluation":
        metrics.update(_evaluation(metrics.get("evaluations"), body))
    checkpoints = [dict(c) for c in (status.get("checkpoints") or []) if isinstance(c, dict)]
    checkpoint = body.get("checkpoint")
    if isinstance(checkpoint, dict):
        entry = {"step": checkpoint["step"], "path": checkpoint.get("path", ""), "time": body["time"]}
        val_loss = checkpoint.get("valLoss", body.get("valLoss"))
        if _is_number(val_loss):
            entry["valLoss"] = val_loss
        checkpoints = [c for c in checkpoints if c.get("step") != entry["step"]] + [entry]
        checkpoints.sort(key=lambda c: int(c.get("step", 0)))
        best = _best_checkpoint(checkpoints, metrics.get("bestCheckpoint"))
        if best is not None:
            metrics["bestCheckpoint"] = best
        checkpoints = checkpoints[-recent_checkpoints:] if recent_checkpoints else []
    patch: Body = {"progress": progress, "metrics": metrics, "checkpoints": checkpoints}
    if isinstance(body.get("results"), dict):
        patch["results"] = dict(body["results"])
    if isinstance(body.get("samples"), list):
        patch["samples"] = list(body["samples"])
    if isinstance(body.get("model"), dict):
        model = {k: v for k, v in body["model"].items() if k in ("uri", "digest") and v}
        if "uri" in model:  # the trainer names the folder as its pod sees it; status names the storage
            model["uri"] = render.storage_uri(model["uri"])
        patch["model"] = model
    resolved = resolved_hyperparameters(body.get("resolved"))
    if resolved:
        patch["resolved"] = resolved
    tracking = tracking_status(body.get("tracking"))
    if tracking:
        patch["tracking"] = tracking
    return patch


def _evaluation(curve: Any, body: Body) -> Body:
    """The metrics an evaluation report changes: the latest valAccuracy/valF1 and the learning curve
    `evaluations` with this step's figures (replacing an earlier entry of the same step, as a resumed
    attempt re-evaluates)."""
    raw = body.get("results")
    results: Body = raw if isinstance(raw, dict) else {}
    figures = {f: v for f in EVALUATION_FIELDS if _is_number(v := body.get(f, results.get(f)))}
    step = body.get("step")
    if not figures or not _is_count(step):
        return {}
    points = [dict(p) for p in (curve if isinstance(curve, list) else [])
              if isinstance(p, dict) and _is_count(p.get("step")) and p["step"] != step]
    points.append({"step": step, **figures})
    points.sort(key=lambda p: int(p["step"]))
    changed: Body = {"evaluations": points[-MAX_EVALUATIONS:]}
    changed.update({f: figures[f] for f in ("valAccuracy", "valF1") if f in figures})
    return changed


def _best_checkpoint(checkpoints: list[Body], previous: Any) -> Body | None:
    candidates = [c for c in checkpoints if _is_number(c.get("valLoss"))]
    if isinstance(previous, dict) and _is_number(previous.get("valLoss")):
        candidates.append(previous)
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (c["valLoss"], -int(c.get("step", 0))))
    return {"step": best["step"], "path": best.get("path", ""), "valLoss": best["valLoss"]}
