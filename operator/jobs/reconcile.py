"""The one level-based reconcile of a FineTuneJob (pure).

`reconcile(observed, settings)` looks at the FineTuneJob and its children as
they are now and returns a `Decision`: the status fields to write, the child
objects to create, patch or delete, and the Events to emit. Create, update,
resume, the timer and child events all call it; running it twice on the same
observation gives the same decision, and running it after its actions took
effect changes nothing more. `handlers` and `client` carry the decision out.

The steps, in order:

0. parse the spec once (`specs.spec_of`: `FineTuneJobSpec.from_dict`, once per version of the object,
   the API server's defaults applied): every
   step below reads the typed spec; one that does not parse (written before a schema change, or
   past the CRD's schema) ends here, `Validated=False InvalidSpec` naming each bad field;
1. finished jobs: only the TTL of training children and serving;
2. render the spec into the trainer config (a bad spec ends here, `Validated=False`);
3. the progress-token Secret and the config ConfigMap;
4. dataset validation in a pod without accelerators (`InvalidDataset` ends the job); its sizing facts
   give `status.estimate`, resolve `resources.gpus: auto`, and reject a job that cannot fit
   (`InsufficientResources`) before any GPU is held;
5. the trainer Job: create, suspend/resume, and read its outcome;
6. serving: once training succeeded and `spec.serving.enabled`, a Deployment and a
   Service serve the model; `ServingReady` follows the Deployment's availability.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetune.api import layout, process
from kubetune.api.finetunejob import FineTuneJobSpec, TrackingSpec
from kubetune.api.schema import ValidationError
from kubetune.operator import conditions, names
from kubetune.operator.conditions import Condition
from kubetune.operator.jobs import builders, render
from kubetune.operator.platform import estimate, quota, usage
from kubetune.operator.platform.policy import NO_POLICY, NamespaceLimits, PlatformPolicy, violations
from kubetune.operator.progress import reports
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.specs import has_pending_work, spec_of

Body = dict[str, Any]

ANNOTATION_PRUNED = "kubetune.io/pruned-by-sweep"
"""Set by a FineTuneSweep on a trial it prunes, with why: the job ends (`reason Pruned`), its trainer Job is deleted."""


@dataclasses.dataclass(frozen=True)
class Observed:
    """The FineTuneJob and its children as read from the API server."""

    job: Body
    """The FineTuneJob (metadata, spec, status)."""
    now: datetime
    """The time of the observation (UTC, aware)."""
    config_map: Body | None = None
    progress_secret: Body | None = None
    validation_job: Body | None = None
    validation_pods: tuple[Body, ...] = ()
    trainer_job: Body | None = None
    trainer_pods: tuple[Body, ...] = ()
    serving_deployment: Body | None = None
    serving_service: Body | None = None
    serving_key_secret: Body | None = None
    """The Secret with the serving endpoint's API key (read once serving may exist)."""
    serving_host: Body | None = None
    """With `spec.serving.shareWith`: the FineTuneJob it names (None when there is none)."""
    serving_guests: tuple[Body, ...] = ()
    """The FineTuneJobs of the namespace whose `spec.serving.shareWith` names this job."""
    serving_adapters_config_map: Body | None = None
    """The ConfigMap listing the guests' adapters for this job's serving pods."""
    namespace_jobs: tuple[Body, ...] = ()
    """Every FineTuneJob in the namespace (read only when the namespace's quota needs it)."""
    namespace_trainer_jobs: tuple[Body, ...] = ()
    """Every trainer Job in the namespace (read only when the namespace's quota needs it)."""
    kueue_workloads: tuple[Body, ...] = ()
    """Kueue's Workloads of the trainer Job (label `kueue.x-k8s.io/job-uid`; read only for a job with
    `resources.queueName` once its trainer Job exists)."""
    source_job: Body | None = None
    """The FineTuneJob named by `spec.model.fromJob` (read only until the job's lineage is resolved)."""
    foreign_children: tuple[str, ...] = ()
    """Objects with a child's name that this job does not control (`describe_foreign`): a leftover of
    a deleted job of the same name, or someone else's object. Nothing is created while one is there."""


@dataclasses.dataclass(frozen=True)
class CreateChild:
    """Create this object; 409 means it is already there."""

    manifest: Body


@dataclasses.dataclass(frozen=True)
class PatchChild:
    """Merge-patch an existing child."""

    api_version: str
    kind: str
    name: str
    patch: Body


@dataclasses.dataclass(frozen=True)
class ReplaceChild:
    """Replace (PUT) an existing child with this manifest: fields it leaves out are removed.
    `resource_version` guards against overwriting a change made since the observation (409)."""

    manifest: Body
    resource_version: str


@dataclasses.dataclass(frozen=True)
class DeleteChild:
    """Delete a child (and, for Jobs, its pods); 404 means it is already gone."""

    api_version: str
    kind: str
    name: str
    grace_seconds: int | None = None
    """The pod's termination grace period for this deletion (None: its own)."""


Action = CreateChild | PatchChild | ReplaceChild | DeleteChild


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the FineTuneJob."""

    type: str
    """`Normal` or `Warning`."""
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do: status fields to merge-patch, child actions, events, and when to look again."""

    status_patch: Body
    actions: tuple[Action, ...]
    events: tuple[Event, ...]
    requeue_after: float | None = None
    """Seconds until something time-based is due (e.g. the TTL), or None."""


@dataclasses.dataclass(frozen=True)
class Termination:
    """How a pod's container ended, from its status."""

    exit_code: int
    message: str
    summary: Body
    """The trainer's JSON summary from the termination message (empty if it was not JSON)."""
    finished_at: str
    disrupted: bool


class _Draft:
    """The decision being built."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        job = observed.job
        self.metadata: Body = job.get("metadata") or {}
        self.parsed: FineTuneJobSpec | None = None
        """The typed spec; None when it does not parse (`spec_problems` says why)."""
        self.spec_problems: list[str] = []
        try:
            self.parsed = spec_of(job, keep=has_pending_work(job.get("spec"), job.get("status")))
        except ValidationError as error:
            self.spec_problems = error.problems
        self.status: Body = dict(job.get("status") or {})
        self.generation = int(self.metadata.get("generation") or 0)
        self.now = _rfc3339(observed.now)
        self.before: list[Condition] = list(self.status.get("conditions") or [])
        self.conditions: list[Condition] = list(self.before)
        self.patch: Body = {"observedGeneration": self.generation}
        self.actions: list[Action] = []
        self.extra_events: list[Event] = []
        self.requeue_after: float | None = None
        self.plan: estimate.Plan | None = None
        """The resource plan made in this pass (None: read `status.estimate`)."""
        self.limits: NamespaceLimits = NO_POLICY.defaults
        """The namespace's platform limits (set by `reconcile`)."""

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def spec(self) -> FineTuneJobSpec:
        """The typed spec, parsed once per pass. `reconcile` stops before any step that reads it
        when it did not parse (`_invalid_spec`)."""
        if self.parsed is None:
            raise RuntimeError("the spec did not parse: " + "; ".join(self.spec_problems))
        return self.parsed

    def set(self, type_: str, status: conditions.Status, reason: str, message: str) -> None:
        self.conditions = conditions.set_condition(self.conditions, type_, status, reason, message,
                                                   generation=self.generation, now=self.now)

    def is_true(self, type_: str) -> bool:
        return conditions.is_true(self.conditions, type_)

    def finish(self, succeeded: bool, reason: str, message: str, completion_time: str | None = None) -> None:
        """Mark the job terminal (Succeeded or Failed) and record its completion time once."""
        self.set(conditions.SUCCEEDED, "True" if succeeded else "False", reason, message)
        self.set(conditions.FAILED, "False" if succeeded else "True", reason, "" if succeeded else message)
        self.set(conditions.RUNNING, "False", reason, "training ended")
        if conditions.find(self.conditions, conditions.STALLED) is not None:
            self.set(conditions.STALLED, "False", conditions.NOT_TRAINING, "training ended")
        if not self.status.get("completionTime"):
            self.patch["completionTime"] = completion_time or self.now

    def decision(self) -> Decision:
        _account_usage(self)
        self.patch["conditions"] = self.conditions
        self.patch["phase"] = state_of({"conditions": self.conditions})
        events = transition_events(conditions.changes(self.before, self.conditions))
        return Decision(status_patch=self.patch, actions=tuple(self.actions),
                        events=tuple(events + self.extra_events), requeue_after=self.requeue_after)


QUIET_REASONS = frozenset({conditions.NOT_FINISHED, conditions.NOT_SUSPENDED, conditions.NOT_TRAINING,
                           conditions.PROGRESSING})
"""Reasons of a False condition that says nothing has happened (a job not finished, not suspended, not
stalled): set or reset along with a transition that has its own Event, so they get none."""


def transition_events(changed: list[Condition]) -> list[Event]:
    """One Event per transition (per Event type: a Warning never hides inside a Normal Event): the
    conditions a reconcile moves together make one Event, led by a condition that became True (else
    the first changed), naming each of the others (Succeeded=True, Failed=False and Running=False all
    say TrainingComplete; a job's first pass sets Validated, Running and ServingReady at once). False
    conditions with a quiet reason (`QUIET_REASONS`) make none. Events were half of the operator's API
    requests when it posted one per condition, most of them saying nothing new."""
    grouped: dict[str, list[Condition]] = {}
    for condition in changed:
        if condition["status"] == "False" and condition["reason"] in QUIET_REASONS:
            continue
        grouped.setdefault(_event_for(condition).type, []).append(condition)
    events = []
    for group in grouped.values():
        lead = max(group, key=lambda c: c["status"] == "True")
        event = _event_for(lead)
        others = [f"{c['type']}={c['status']}" + ("" if c["reason"] == lead["reason"] else f" {c['reason']}")
                  for c in group if c is not lead]
        if others:
            event = dataclasses.replace(event, message=(event.message + " (also " + ", ".join(others) + ")")[:1024])
        events.append(event)
    return events


def _event_for(condition: Condition) -> Event:
    warning = (condition["type"] in (conditions.FAILED, conditions.STALLED) and condition["status"] == "True"
               and condition["reason"] != conditions.PRUNED) or (
        condition["type"] in (conditions.VALIDATED, conditions.TRACKED) and condition["status"] == "False")
    text = f"{condition['type']}={condition['status']}"
    if condition["message"]:
        text += f": {condition['message']}"
    return Event(type="Warning" if warning else "Normal", reason=condition["reason"], message=text[:1024])


def reconcile(observed: Observed, settings: OperatorSettings, policy: PlatformPolicy = NO_POLICY) -> Decision:
    """Decide how to converge one FineTuneJob; see the module docstring for the steps."""
    if (observed.job.get("metadata") or {}).get("deletionTimestamp"):
        # Being deleted: the garbage collector is removing the children; recreating them would
        # hold a foreground deletion open forever.
        return Decision(status_patch={}, actions=(), events=())
    draft = _Draft(observed)
    limits = policy.limits_for(str(draft.metadata.get("namespace", "")))
    draft.limits = limits
    if observed.foreign_children:
        _blocked_by_foreign_children(draft)
        return draft.decision()
    if draft.parsed is None:
        _invalid_spec(draft)
        return draft.decision()
    if draft.is_true(conditions.SUCCEEDED) or draft.is_true(conditions.FAILED):
        _expire_training_children(draft)
        _decide_serving(draft, settings, limits)
        return draft.decision()
    pruned = _annotation(observed.job, ANNOTATION_PRUNED)
    if pruned:
        _prune(draft, pruned)
        return draft.decision()
    job = _with_source_job(draft)
    if job is None:
        _decide_serving(draft, settings, limits)
        return draft.decision()
    try:
        rendered = render.trainer_config_for(job, lineage=_lineage(draft))
    except render.SpecError as error:
        message = "; ".join(error.problems)
        draft.set(conditions.VALIDATED, "False", conditions.INVALID_SPEC, message)
        draft.finish(False, conditions.INVALID_SPEC, message)
        _decide_serving(draft, settings, limits)
        return draft.decision()
    if not _model_source_allowed(draft, limits) or not _spec_allowed(draft, limits, settings):
        _decide_serving(draft, settings, limits)
        return draft.decision()
    _ensure_credentials(draft, settings)
    _ensure_config(draft, rendered)
    if _validate_dataset(draft, rendered, settings, policy):
        _train(draft, rendered, settings, limits, policy)
    _decide_serving(draft, settings, limits)
    return draft.decision()


# --- step 0: a spec that does not parse ---------------------------------------------------------

def _invalid_spec(draft: _Draft) -> None:
    """The spec does not fit the API's models (an object written before a schema change, or with the
    CRD's schema bypassed): nothing of it can be trusted, so nothing is created. A running job ends
    `Failed InvalidSpec`, naming every bad field, as a spec the trainer config rejects does; a finished
    job keeps its outcome and its children (a later schema must not undo a finished run) and says,
    in `Validated`, that the operator manages none of them until the spec is fixed."""
    message = "; ".join(draft.spec_problems)[:4096]
    if draft.is_true(conditions.SUCCEEDED) or draft.is_true(conditions.FAILED):
        draft.set(conditions.VALIDATED, "False", conditions.INVALID_SPEC,
                  f"{message} (the operator leaves this job's children as they are until the spec is fixed)"[:4096])
        return
    draft.set(conditions.VALIDATED, "False", conditions.INVALID_SPEC, message)
    draft.finish(False, conditions.INVALID_SPEC, message)
    _remove_serving(draft)
    draft.set(conditions.SERVING_READY, "False", conditions.NO_MODEL, "training failed: no model to serve")


# --- step 0: children this job does not own ---------------------------------------------------

FOREIGN_RETRY_SECONDS = 10.0
"""How soon to look again while a same-named object of a deleted job is being garbage-collected."""


def controlled_by(child: Body, owner_uid: str) -> bool:
    """Whether `child`'s controller owner reference points at the object with that uid."""
    owners = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == owner_uid and o.get("controller") for o in owners)


def describe_foreign(child: Body, kind: str, job_name: str) -> str:
    """A same-named child this job does not control, in words: whose it is and whether it is going."""
    metadata = child.get("metadata") or {}
    controller = next((o for o in metadata.get("ownerReferences") or [] if o.get("controller")), None)
    name = f"{kind} {metadata.get('name', '')}"
    if controller is None:
        whose = "has no controller (made by someone else)"
    elif controller.get("kind") == builders.KIND and controller.get("name") == job_name:
        whose = f"belongs to an earlier FineTuneJob of this name (uid {controller.get('uid', '')})"
    else:
        whose = f"is controlled by {controller.get('kind', '')} {controller.get('name', '')}"
    going = " and is being deleted" if metadata.get("deletionTimestamp") else ""
    return f"{name} {whose}{going}"


def _blocked_by_foreign_children(draft: _Draft) -> None:
    """A child name is taken by an object this job does not own. Creating around it would stall
    silently (409 looks like "already there") or, worse, start pods that mount the other object
    (a deleted job's ConfigMap or token): create nothing and say why."""
    found = "; ".join(draft.observed.foreign_children)
    stale = all("earlier FineTuneJob" in f for f in draft.observed.foreign_children)
    if stale:
        message = f"waiting for the garbage collector to remove {found}; kubetune creates nothing until then"
        draft.requeue_after = FOREIGN_RETRY_SECONDS
    else:
        message = (f"{found}: kubetune creates nothing for this job while it is there; delete or rename it, "
                   "or give the FineTuneJob another name")
    finished = draft.is_true(conditions.SUCCEEDED) or draft.is_true(conditions.FAILED)
    draft.set(conditions.SERVING_READY if finished else conditions.RUNNING, "False",
              conditions.WAITING_FOR_OLD_CHILDREN if stale else conditions.CHILD_NAME_CONFLICT, message[:4096])


def _prune(draft: _Draft, why: str) -> None:
    """A sweep pruned this trial: stop its pods (delete the Jobs) and end it, keeping its metrics so far."""
    for child in (draft.observed.trainer_job, draft.observed.validation_job):
        if child is not None:
            draft.actions.append(DeleteChild("batch/v1", "Job", child["metadata"]["name"]))
    draft.finish(False, conditions.PRUNED, why[:1024])
    _set_suspended(draft, holding_pods=False)


# --- step 2a: training on from an earlier job ------------------------------------------------

SOURCE_JOB_RETRY_SECONDS = 30.0
"""How soon to look again at a `spec.model.fromJob` job that has not Succeeded yet (the resync also does)."""


def _lineage(draft: _Draft) -> list[Body]:
    lineage = {**draft.status, **draft.patch}.get("lineage")
    return [dict(entry) for entry in lineage if isinstance(entry, dict)] if isinstance(lineage, list) else []


def source_lineage(source: Body) -> list[Body]:
    """The lineage a job trained on from `source` (a Succeeded FineTuneJob) starts with: `source`'s own
    lineage (or its base model), then `source`'s model."""
    status = source.get("status") or {}
    model = status.get("model") or {}
    before = [dict(e) for e in (status.get("lineage") or []) if isinstance(e, dict)]
    if not before:
        base = str(((source.get("spec") or {}).get("model") or {}).get("source") or "")
        before = [{"uri": base}] if base else []
    entry = {"job": str((source.get("metadata") or {}).get("name", "")), "uri": str(model.get("uri", ""))}
    if model.get("digest"):
        entry["digest"] = str(model["digest"])
    return before + [entry]


def _with_source_job(draft: _Draft) -> Body | None:
    """The job to render: as it is, or with `spec.model.fromJob` resolved to that job's model URI
    (`status.lineage`, once resolved, pins it: a later run of the source job changes nothing). None
    while the source job has not Succeeded (`Validated=False SourceJobNotReady`; looked at again)."""
    job = draft.observed.job
    from_job = draft.spec.model.from_job
    if not from_job:
        return job
    lineage = _lineage(draft)
    if not lineage:
        source = draft.observed.source_job
        problem = ""
        if source is None:
            problem = f"FineTuneJob {from_job!r} does not exist in this namespace"
        elif not conditions.is_true(list((source.get("status") or {}).get("conditions") or []),
                                    conditions.SUCCEEDED):
            state = state_of(source.get("status") or {})
            problem = f"FineTuneJob {from_job!r} has not Succeeded (it is {state})"
        elif not ((source.get("status") or {}).get("model") or {}).get("uri"):
            problem = f"FineTuneJob {from_job!r} Succeeded but records no status.model.uri"
        if problem:
            message = f"spec.model.fromJob: {problem}; training starts once it has Succeeded"
            draft.set(conditions.VALIDATED, "False", conditions.SOURCE_JOB_NOT_READY, message)
            draft.set(conditions.RUNNING, "False", conditions.SOURCE_JOB_NOT_READY, "waiting for the source job")
            draft.set(conditions.SUCCEEDED, "False", conditions.NOT_FINISHED, "")
            draft.set(conditions.FAILED, "False", conditions.NOT_FINISHED, "")
            draft.requeue_after = SOURCE_JOB_RETRY_SECONDS
            return None
        assert source is not None
        lineage = source_lineage(source)
        draft.patch["lineage"] = lineage
    if layout.is_adapter(str(lineage[-1].get("uri", ""))) and draft.spec.method.type == "full":
        message = (f"spec.method.type: full cannot train on from {from_job!r}, which saved an unmerged LoRA "
                   "adapter: use method lora (it trains that adapter on), or train the source with merge: true")
        draft.set(conditions.VALIDATED, "False", conditions.INVALID_SPEC, message)
        draft.finish(False, conditions.INVALID_SPEC, message)
        return None
    resolved = copy.deepcopy(job)
    resolved["spec"]["model"]["source"] = lineage[-1]["uri"]
    return resolved


# --- step 2b: platform policy --------------------------------------------------------------

def _model_source_allowed(draft: _Draft, limits: NamespaceLimits) -> bool:
    """A base model the platform does not allow here ends the job before anything runs."""
    if draft.observed.trainer_job is not None:
        return True  # already training: a later policy change does not stop a run
    source = draft.spec.model.source or ""
    if draft.spec.model.from_job or limits.model_source_allowed(source):
        # fromJob: the lineage's base model was checked when the first job of the chain ran, and the
        # model it continues from is that namespace's own output.
        return True
    message = (f"spec.model.source: {source!r} is not allowed in namespace "
               f"{draft.metadata.get('namespace', '')}; allowed: {', '.join(limits.allowed_model_sources)}")
    draft.set(conditions.VALIDATED, "False", conditions.MODEL_SOURCE_NOT_ALLOWED, message)
    draft.finish(False, conditions.MODEL_SOURCE_NOT_ALLOWED, message)
    return False


def own_images(settings: OperatorSettings) -> tuple[str, ...]:
    """The images the operator itself runs: a spec may always name these."""
    return (settings.trainer_image, settings.vllm_image)


def _spec_allowed(draft: _Draft, limits: NamespaceLimits, settings: OperatorSettings) -> bool:
    """Defence in depth behind the chart's ValidatingAdmissionPolicy: a spec asking for placement,
    code execution, images or writes the platform does not allow here ends before anything runs."""
    if draft.observed.trainer_job is not None:
        return True  # already training: a later policy change does not stop a run
    found = violations(draft.spec, limits, str(draft.metadata.get("namespace", "")), own_images(settings))
    if not found:
        return True
    message = "; ".join(found)[:4096]
    draft.set(conditions.VALIDATED, "False", conditions.POLICY_VIOLATION, message)
    draft.finish(False, conditions.POLICY_VIOLATION, message)
    return False


def _admission(draft: _Draft, limits: NamespaceLimits, spec: FineTuneJobSpec) -> quota.Admission:
    """Whether the trainer may run now under the namespace's quota; `spec` is the job's spec with
    `gpus: auto` resolved (`resolved_spec`), so the quota counts what the trainer Job requests."""
    observed = draft.observed
    tjob = observed.trainer_job
    waiting_to_start = tjob is None or bool((tjob.get("spec") or {}).get("suspend"))
    if not waiting_to_start:
        return quota.ADMITTED  # it holds its share already; quota never stops a running trainer
    never = quota.never_fits(spec.resource_settings().job_gpus(), limits)
    if never and (tjob is None or not quota.queued(spec)):
        return quota.Admission(False, f"{never}; it starts only if the platform policy changes")
    if spec.suspend or quota.queued(spec):
        return quota.ADMITTED  # the user's suspend, or Kueue, decides
    me = dataclasses.replace(quota.usage_of(observed.job, spec, tjob), waiting=True)
    usage = quota.namespace_usage(observed.namespace_jobs, observed.namespace_trainer_jobs)
    return quota.admit(me, usage, limits)


# --- step 3: credentials and config --------------------------------------------------

def _ensure_credentials(draft: _Draft, settings: OperatorSettings) -> None:
    if not settings.progress_url or draft.observed.progress_secret is not None:
        return
    key = reports.JobKey(draft.metadata.get("namespace", ""), draft.name, draft.metadata.get("uid", ""))
    token = reports.job_token(settings.secret_key, key)
    draft.actions.append(CreateChild(builders.progress_secret(draft.observed.job, token)))


def _ensure_config(draft: _Draft, rendered: render.RenderedConfig) -> None:
    desired = builders.trainer_configmap(draft.observed.job, rendered)
    actual = draft.observed.config_map
    if actual is None:
        draft.actions.append(CreateChild(desired))
    elif actual.get("data") != desired["data"] and draft.observed.trainer_job is None:
        # The spec changed before training started: the trainer will read the new config.
        draft.actions.append(PatchChild("v1", "ConfigMap", desired["metadata"]["name"], {
            "metadata": {"annotations": desired["metadata"]["annotations"]}, "data": desired["data"]}))


# --- step 4: dataset validation --------------------------------------------------------

def _validate_dataset(draft: _Draft, rendered: render.RenderedConfig, settings: OperatorSettings,
                      policy: PlatformPolicy) -> bool:
    """Returns True when training may go ahead."""
    observed = draft.observed
    if draft.is_true(conditions.VALIDATED) or observed.trainer_job is not None:
        if not draft.is_true(conditions.VALIDATED):
            draft.set(conditions.VALIDATED, "True", conditions.DATASET_VALID, "training already started")
        return True
    vjob = observed.validation_job
    desired_hash = builders.config_hash(rendered)
    if vjob is not None and _annotation(vjob, builders.ANNOTATION_CONFIG_HASH) not in (None, desired_hash):
        # The spec changed while validating: validate the new config instead.
        draft.actions.append(DeleteChild("batch/v1", "Job", vjob["metadata"]["name"]))
        vjob = None
    if vjob is None:
        if not any(isinstance(a, DeleteChild) for a in draft.actions):
            draft.actions.append(CreateChild(builders.validation_job(
                observed.job, draft.spec, rendered, settings,
                policy.limits_for(str(draft.metadata.get("namespace", ""))))))
        _waiting_for_validation(draft)
        return False
    outcome = job_outcome(vjob)
    if outcome == "Active" and validation_pod_succeeded(observed.validation_pods):
        outcome = "Complete"
    if outcome == "Complete":
        ended = latest_termination(observed.validation_pods, builders.VALIDATION_CONTAINER)
        detail = _summary_text(ended) if ended else ""
        if not _estimate_resources(draft, ended.summary if ended else {}, policy):
            return False
        draft.set(conditions.VALIDATED, "True", conditions.DATASET_VALID,
                  "dataset validated" + (f": {detail}" if detail else ""))
        return True
    if outcome == "Failed":
        reason, message = _validation_failure(vjob, observed.validation_pods)
        draft.set(conditions.VALIDATED, "False", reason, message)
        draft.finish(False, reason, message)
        return False
    missing = credentials_problem(observed.validation_pods)
    if missing:
        # The kubelet retries forever; the spec (or the Secret) must change: end here, pods released.
        message = (f"spec.credentials: the validation pod cannot start: {missing}; create the Secret with "
                   "that key in this namespace, or fix spec.credentials")[:1024]
        draft.actions.append(DeleteChild("batch/v1", "Job", vjob["metadata"]["name"]))
        draft.set(conditions.VALIDATED, "False", conditions.CREDENTIALS_UNAVAILABLE, message)
        draft.finish(False, conditions.CREDENTIALS_UNAVAILABLE, message)
        return False
    _waiting_for_validation(draft)
    return False


def validation_pod_succeeded(pods: tuple[Body, ...]) -> bool:
    """Whether a validation pod has succeeded with the trainer's `validated` summary: then its Job
    (one completion) is complete, whatever the Job controller has written yet. The Job controller
    batches pod updates for a second before it marks the Job Complete; acting on the pod saves that
    second on every job's way to its trainer (the trainer Job's pods wait for no one else)."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        ended = latest_termination((pod,), builders.VALIDATION_CONTAINER, exit_code=0)
        if ended is not None and ended.summary.get("outcome") == "validated":
            return True
    return False


def credentials_problem(pods: tuple[Body, ...]) -> str:
    """The kubelet's message when a pod cannot get its environment from a Secret (a missing Secret or
    key: waiting reason CreateContainerConfigError), else "". It names the Secret and key, never a value."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CreateContainerConfigError":
                return str(waiting.get("message") or "a Secret or key it names is missing")
    return ""


def _estimate_resources(draft: _Draft, summary: Body, policy: PlatformPolicy) -> bool:
    """`status.estimate` from the validation pod's sizing facts; False (job failed) when it cannot fit."""
    sizing = summary.get("sizing")
    resources = draft.spec.resource_settings()
    if not isinstance(sizing, dict):
        if resources.gpus_auto:
            draft.patch["estimate"] = {"gpus": _default_auto_gpus(policy), "message": (
                "the validation pod reported no sizing facts: gpus auto means one GPU when the platform lists "
                "GPU types, else CPU")}
        return True
    try:
        plan = estimate.plan_for_job(draft.spec, sizing, gpu_types=policy.gpu_types,
                                     target_seconds=policy.target_training_hours * 3600)
    except estimate.EstimateError as error:
        draft.patch["estimate"] = {"gpus": _default_auto_gpus(policy) if resources.gpus_auto
                                   else resources.gpu_count(), "message": f"no estimate: {error}"[:1024]}
        return True
    draft.plan = plan
    draft.patch["estimate"] = plan.to_status()
    if plan.fits:
        return True
    message = f"{plan.recommendation.message}; {plan.summary()}"[:1024]
    draft.set(conditions.VALIDATED, "False", conditions.INSUFFICIENT_RESOURCES, message)
    draft.finish(False, conditions.INSUFFICIENT_RESOURCES, message)
    return False


def _default_auto_gpus(policy: PlatformPolicy) -> int:
    return 1 if policy.gpu_types else 0


def resolved_spec(draft: _Draft, policy: PlatformPolicy) -> FineTuneJobSpec:
    """The spec with `resources.gpus: auto` replaced by the estimate's choice
    (`estimate.with_resolved_gpus`) and the chosen GPU type's node selector added (the user's own
    nodeSelector keys win): what the trainer Job is built from and the quota counts."""
    spec = draft.spec
    requested = spec.resource_settings()
    known = {**draft.status, **draft.patch}.get("estimate")
    known = known if isinstance(known, dict) else {}
    selector: dict[str, str] = {}
    if draft.plan is not None:
        selector = dict(draft.plan.recommendation.node_selector)
    elif requested.gpus_auto and known.get("gpuType"):
        selector = next((dict(t.node_selector) for t in policy.gpu_types if t.name == known["gpuType"]), {})
    if not requested.gpus_auto and not selector:
        return spec
    resources = estimate.with_resolved_gpus(requested, known.get("gpus"), _default_auto_gpus(policy))
    if selector:
        resources = dataclasses.replace(resources, node_selector=selector | dict(resources.node_selector or {}))
    return dataclasses.replace(spec, resources=resources)


VALIDATING_MESSAGE = "the dataset-validation pod checks the dataset"
"""The same from the validation Job's creation until its pod ends: each different message would cost a
status write (and a watch event to every watcher) on the way, and say nothing the child objects do not."""
PENDING_MESSAGE = "waiting for the trainer pod to start"
"""The same from the trainer Job's creation until its pod runs, for the same reason."""


def _waiting_for_validation(draft: _Draft) -> None:
    draft.set(conditions.VALIDATED, "Unknown", conditions.VALIDATING, VALIDATING_MESSAGE)
    draft.set(conditions.RUNNING, "False", conditions.WAITING_FOR_VALIDATION,
              "training starts once the dataset is validated")
    draft.set(conditions.SUCCEEDED, "False", conditions.NOT_FINISHED, "")
    draft.set(conditions.FAILED, "False", conditions.NOT_FINISHED, "")
    _set_suspended(draft, holding_pods=False)


_VALIDATION_REASONS = (conditions.INVALID_DATASET, conditions.MODEL_UNAVAILABLE, conditions.STORAGE_UNAVAILABLE)
"""Reasons a validation pod's summary may give for a permanent error."""


def _validation_failure(vjob: Body, pods: tuple[Body, ...]) -> tuple[str, str]:
    ended = latest_termination(pods, builders.VALIDATION_CONTAINER)
    if ended is not None and ended.exit_code == process.EXIT_PERMANENT:
        reason = ended.summary.get("reason")
        return (reason if reason in _VALIDATION_REASONS else conditions.INVALID_DATASET,
                _summary_text(ended) or "the dataset-validation pod rejected the data")
    condition = _job_condition(vjob, "Failed") or _job_condition(vjob, "FailureTarget") or {}
    if condition.get("reason") == "PodFailurePolicy":
        return conditions.INVALID_DATASET, (_summary_text(ended) if ended else "") or str(
            condition.get("message") or "the dataset-validation pod rejected the data")
    detail = _summary_text(ended) if ended else ""
    message = f"dataset validation failed ({condition.get('reason', 'unknown reason')}: " \
              f"{condition.get('message', '')})"
    return conditions.VALIDATION_ERROR, message + (f"; last pod said: {detail}" if detail else "")


# --- step 5: training ------------------------------------------------------------------

def _train(draft: _Draft, rendered: render.RenderedConfig, settings: OperatorSettings,
           limits: NamespaceLimits, policy: PlatformPolicy = NO_POLICY) -> None:
    observed = draft.observed
    tjob = observed.trainer_job
    spec = resolved_spec(draft, policy)
    admission = _admission(draft, limits, spec)
    if tjob is None and spec.suspend and quota.queued(spec):
        # Kueue admits a queued Job as soon as it sees it, before there is a Workload the operator could
        # deactivate: a trainer pod would start for a moment. Suspended from the start, the job gets its
        # trainer Job (and its place in the queue) when it is resumed.
        draft.set(conditions.RUNNING, "False", conditions.SUSPENDED_BY_USER,
                  "the job is suspended: its trainer Job is created, and queued, once spec.suspend is cleared")
        draft.set(conditions.SUCCEEDED, "False", conditions.NOT_FINISHED, "")
        draft.set(conditions.FAILED, "False", conditions.NOT_FINISHED, "")
        _set_suspended(draft, holding_pods=False)
        return
    if tjob is None:
        if admission.admitted or not quota.queued(spec):
            if spec.resource_settings().nodes > 1:  # the pods' DNS names, before the pods
                draft.actions.append(CreateChild(builders.rendezvous_service(observed.job)))
            draft.actions.append(CreateChild(builders.trainer_job(observed.job, spec, rendered, settings,
                                                                  admitted=admission.admitted, limits=limits)))
        if admission.admitted:
            draft.set(conditions.RUNNING, "False", conditions.PENDING, PENDING_MESSAGE)
        else:
            draft.set(conditions.RUNNING, "False", conditions.QUOTA_EXCEEDED, admission.message[:1024])
        draft.set(conditions.SUCCEEDED, "False", conditions.NOT_FINISHED, "")
        draft.set(conditions.FAILED, "False", conditions.NOT_FINISHED, "")
        _set_suspended(draft, holding_pods=False)
        return
    _sync_suspend(draft, tjob, admission.admitted)
    job_status = tjob.get("status") or {}
    # Pods of the Job stay until it is deleted: each one is an attempt (a retry, or a restart after a
    # preemption or a resume); the Job's counters cover pods already garbage-collected.
    counted = int(job_status.get("failed") or 0) + int(job_status.get("succeeded") or 0) + int(
        job_status.get("active") or 0)
    attempts = max(counted, len(observed.trainer_pods))
    if attempts > int(draft.status.get("attempts") or 0):
        draft.patch["attempts"] = attempts
    if job_status.get("startTime") and not draft.status.get("startTime"):
        draft.patch["startTime"] = job_status["startTime"]
    outcome = job_outcome(tjob)
    if outcome == "Complete":
        _succeed(draft, rendered, tjob)
    elif outcome == "Failed":
        reason, message = _training_failure(tjob, observed.trainer_pods)
        draft.finish(False, reason, message, job_status.get("completionTime"))
    else:
        _report_running(draft, tjob, admission)
    _track(draft)


def _track(draft: _Draft) -> None:
    """`status.tracking` and the `Tracked` condition (with `spec.tracking` only). While a trainer pod
    runs, its reports are the news (`status.tracking`, written by the progress endpoint); once none
    runs, the latest termination summary, which the pod itself wrote, is (a lost report changes nothing)."""
    mlflow = (draft.spec.tracking or TrackingSpec()).mlflow
    if mlflow is None:
        return
    pods = draft.observed.trainer_pods
    running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    ended = None if running else latest_termination(pods, builders.TRAINER_CONTAINER)
    tracking = reports.tracking_status(ended.summary.get("tracking")) if ended else {}
    if tracking and tracking != draft.status.get("tracking"):
        draft.patch["tracking"] = tracking
    tracking = tracking or reports.tracking_status(draft.status.get("tracking"))
    if not tracking:
        return
    uri = mlflow.tracking_uri
    if tracking["state"] == "ok":
        draft.set(conditions.TRACKED, "True", conditions.TRACKING_ACTIVE,
                  f"run {tracking.get('runId', '')} at {tracking.get('url') or uri}"[:1024])
    else:
        message = str(tracking.get("message") or "")
        if uri not in message:
            message = f"MLflow tracking server {uri}: {message or 'unavailable'}"
        draft.set(conditions.TRACKED, "False", conditions.TRACKING_UNAVAILABLE, message[:1024])


def _sync_suspend(draft: _Draft, tjob: Body, admitted: bool) -> None:
    want = draft.spec.suspend or not admitted
    have = bool((tjob.get("spec") or {}).get("suspend"))
    if quota.queued(draft.spec) and draft.observed.kueue_workloads:
        # With a queue, Kueue owns `suspend`: it unsuspends an admitted Job at once, so patching the Job
        # would fight it. The user's suspend deactivates the Workload instead (`spec.active: false`):
        # Kueue evicts it and suspends the Job itself; resuming reactivates it and Kueue readmits it.
        _sync_workload_active(draft)
        return
    # Without a Workload (Kueue has not seen the Job yet, or is not installed) only suspending is ours:
    # with a queue, Kueue unsuspends the Job when it admits it.
    if want != have and (want or not quota.queued(draft.spec)):
        draft.actions.append(PatchChild("batch/v1", "Job", tjob["metadata"]["name"], {"spec": {"suspend": want}}))


KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
ANNOTATION_DEACTIVATED = "kubetune.io/deactivated-for"
"""Set on a Kueue Workload the operator deactivated for the user's `spec.suspend`: only such a Workload is
reactivated on resume (one Kueue deactivated itself, e.g. after too many evictions, stays as it is)."""


def _sync_workload_active(draft: _Draft) -> None:
    suspend = draft.spec.suspend
    for workload in draft.observed.kueue_workloads:
        metadata = workload.get("metadata") or {}
        active = (workload.get("spec") or {}).get("active", True) is not False
        ours = ANNOTATION_DEACTIVATED in (metadata.get("annotations") or {})
        if suspend and active:
            patch: Body = {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: "spec.suspend"}},
                           "spec": {"active": False}}
        elif not suspend and not active and ours:
            patch = {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}}
        else:
            continue
        draft.actions.append(PatchChild(KUEUE_API_VERSION, "Workload", str(metadata.get("name", "")), patch))


def _kueue_hold(draft: _Draft, queue: str) -> str:
    """Why Kueue holds the trainer Job, from its Workload's conditions: evicted (preempted) or not admitted."""
    where = f"waiting for Kueue to admit the trainer Job from LocalQueue {queue}"
    for workload in draft.observed.kueue_workloads:
        found = list((workload.get("status") or {}).get("conditions") or [])
        evicted = conditions.find(found, "Evicted")
        active = (workload.get("spec") or {}).get("active", True) is not False
        # Evicted stays True (reason Deactivated) after a Workload is reactivated, until Kueue admits it
        # again: that eviction was the user's suspend, over now; the job simply waits in the queue.
        if evicted is not None and evicted.get("status") == "True" and not (
                active and evicted.get("reason") == "Deactivated"):
            return (f"evicted by Kueue ({evicted.get('reason', '')}: {evicted.get('message', '')}); {where}; "
                    "checkpoints are kept and training resumes from the latest")
        reserved = conditions.find(found, "QuotaReserved")
        if reserved is not None and reserved.get("status") == "False" and reserved.get("message"):
            return f"{where}: {reserved['message']}"
    return where


def _set_suspended(draft: _Draft, *, holding_pods: bool) -> None:
    if draft.spec.suspend:
        message = "suspended: no trainer pod runs; checkpoints are kept and resuming continues from the latest"
        draft.set(conditions.SUSPENDED, "True", conditions.SUSPENDED_BY_USER,
                  message if not holding_pods else "suspending: stopping the trainer pod")
    else:
        draft.set(conditions.SUSPENDED, "False", conditions.NOT_SUSPENDED, "")


def _report_running(draft: _Draft, tjob: Body, admission: quota.Admission) -> None:
    pods = draft.observed.trainer_pods
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    draft.set(conditions.SUCCEEDED, "False", conditions.NOT_FINISHED, "")
    draft.set(conditions.FAILED, "False", conditions.NOT_FINISHED, "")
    suspended = draft.spec.suspend
    _set_suspended(draft, holding_pods=suspended and bool(live))
    attempt = _attempt_of(running[0] if running else live[0]) if live else None
    queue = draft.spec.resource_settings().queue_name
    if suspended:
        draft.set(conditions.RUNNING, "False", conditions.SUSPENDED_BY_USER, "the job is suspended")
    elif queue and (tjob.get("spec") or {}).get("suspend"):
        draft.set(conditions.RUNNING, "False", conditions.QUEUED_BY_KUEUE, _kueue_hold(draft, queue)[:1024])
    elif not admission.admitted:
        draft.set(conditions.RUNNING, "False", conditions.QUOTA_EXCEEDED, admission.message[:1024])
    elif running:
        draft.set(conditions.RUNNING, "True", conditions.TRAINING, f"training (attempt {attempt})")
        _check_stall(draft, running[0])
        return
    elif live and attempt:
        last = latest_termination(pods, builders.TRAINER_CONTAINER)
        why = f" after exit code {last.exit_code}: {_summary_text(last)}" if last else ""
        draft.set(conditions.RUNNING, "False", conditions.RESUMING,
                  f"attempt {attempt} resumes from the latest checkpoint{why}"[:1024])
    else:
        draft.set(conditions.RUNNING, "False", conditions.PENDING, PENDING_MESSAGE)
    if draft.spec.training.stall_timeout_seconds and not draft.is_true(conditions.RUNNING) \
            and not _restarting_after_stall(draft):
        draft.set(conditions.STALLED, "False", conditions.NOT_TRAINING, "no trainer pod is running")


STALL_GRACE_SECONDS = 30
"""Grace period of a stalled trainer pod's deletion: a hung trainer will not write a checkpoint in its
300 s, and the devices it holds sit idle meanwhile; its replacement resumes from the latest one."""


def _restarting_after_stall(draft: _Draft) -> bool:
    """Whether the operator deleted a stalled pod and its replacement has not moved a step yet: `Stalled`
    stays True (RestartedFromCheckpoint) until then, so the restart is visible in status, not only in
    an Event, and a replacement that hangs as well is not reported as healthy."""
    current = conditions.find(draft.conditions, conditions.STALLED)
    return (current is not None and current.get("status") == "True" and current.get("reason") == conditions.STALL_RESTART
            and not draft.spec.suspend)


def _check_stall(draft: _Draft, pod: Body) -> None:
    """`Stalled` when the running pod's step has not advanced for `training.stallTimeoutSeconds`. The
    step comes from the reports (status.progress); when it was first seen is kept in
    `status.lastProgress`, so an operator restart does not reset the clock."""
    timeout = draft.spec.training.stall_timeout_seconds
    if not timeout:
        return
    pod_name = str((pod.get("metadata") or {}).get("name", ""))
    progress = draft.status.get("progress") or {}
    step = progress.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else 0
    last = draft.status.get("lastProgress") or {}
    since = _parse_time(last.get("time"))
    new_pod = last.get("pod") != pod_name or since is None
    start = progress.get("startStep")
    if progress.get("attempt") == _attempt_of(pod) and isinstance(start, int) and not isinstance(start, bool):
        # The pod's own reports say where it started (0 or its checkpoint): a fast trainer can be several
        # steps in before the operator first sees its pod running, and may freeze right there.
        moved = step > start
    else:  # the step in status is still its predecessor's
        moved = not new_pod and (bool(last.get("armed")) or last.get("step") != step)
    if not moved:
        # Loading the model and the baseline evaluation come before the first step and take as long as
        # they take; the clock starts once the pod has moved the step (activeDeadlineSeconds bounds the rest).
        if new_pod:
            draft.patch["lastProgress"] = {"pod": pod_name, "step": step, "time": draft.now, "armed": False}
        if not _restarting_after_stall(draft):
            draft.set(conditions.STALLED, "False", conditions.PROGRESSING,
                      f"waiting for the first step of pod {pod_name}; stall timeout {timeout}s")
        return
    if new_pod or since is None or not last.get("armed") or last.get("step") != step:
        draft.patch["lastProgress"] = {"pod": pod_name, "step": step, "time": draft.now, "armed": True}
        draft.set(conditions.STALLED, "False", conditions.PROGRESSING,
                  f"step {step} of pod {pod_name}; stall timeout {timeout}s")
        draft.requeue_after = float(timeout)
        return
    idle = (draft.observed.now - since).total_seconds()
    if idle < timeout:
        draft.set(conditions.STALLED, "False", conditions.PROGRESSING,
                  f"step {step} of pod {pod_name}; stall timeout {timeout}s")
        draft.requeue_after = timeout - idle
        return
    message = (f"the trainer pod {pod_name} has stayed at step {step} since {last['time']}, longer than "
               f"spec.training.stallTimeoutSeconds ({timeout}s)")
    if draft.limits.restart_stalled_training:
        draft.actions.append(DeleteChild("v1", "Pod", pod_name, grace_seconds=STALL_GRACE_SECONDS))
        draft.set(conditions.STALLED, "True", conditions.STALL_RESTART,
                  f"{message}; deleted it (platform policy restartStalledTraining): its replacement resumes "
                  "from the latest checkpoint")
    else:
        draft.set(conditions.STALLED, "True", conditions.NO_PROGRESS,
                  f"{message}; it keeps its resources until it ends or is deleted")


def _account_usage(draft: _Draft) -> None:
    """`status.usage` brought up to date from the pods and serving Deployment observed in this pass."""
    observed = draft.observed
    updated = usage.update(draft.status.get("usage"), now=observed.now, training_pods=observed.trainer_pods,
                           validation_pods=observed.validation_pods, trainer_container=builders.TRAINER_CONTAINER,
                           validation_container=builders.VALIDATION_CONTAINER, serving=observed.serving_deployment)
    if updated.get("attempts") or updated.get("servingSlices") or draft.status.get("usage"):
        draft.patch["usage"] = updated


def _attempt_of(pod: Body) -> int:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(builders.ANNOTATION_ATTEMPT, "0")
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _succeed(draft: _Draft, rendered: render.RenderedConfig, tjob: Body) -> None:
    ended = latest_termination(draft.observed.trainer_pods, builders.TRAINER_CONTAINER, exit_code=0)
    summary = ended.summary if ended else {}
    # The termination message finishes the status even when the last report push was lost.
    model = dict(draft.status.get("model") or {})
    model.setdefault("uri", rendered.model_uri)
    if isinstance(summary.get("modelDigest"), str) and summary["modelDigest"]:
        model["digest"] = summary["modelDigest"]
    draft.patch["model"] = model
    if isinstance(summary.get("results"), dict) and summary["results"]:
        draft.patch["results"] = summary["results"]
    resolved = reports.resolved_hyperparameters(summary.get("resolved"))
    if resolved:
        draft.patch["resolved"] = resolved
    progress = dict(draft.status.get("progress") or {})
    if isinstance(summary.get("step"), int):
        progress["step"] = summary["step"]
    progress["percent"] = 100.0
    progress["etaSeconds"] = 0
    draft.patch["progress"] = progress
    if isinstance(summary.get("valLoss"), (int, float)) and not isinstance(summary.get("valLoss"), bool):
        metrics = dict(draft.status.get("metrics") or {})
        metrics.setdefault("valLoss", summary["valLoss"])
        draft.patch["metrics"] = metrics
    message = f"model written to {model['uri']}"
    if summary.get("message"):
        message += f": {summary['message']}"
    if not conditions.is_true(draft.before, conditions.SUCCEEDED):
        # Once, when the job succeeds: the first sample answer, from the full report's samples or
        # else the termination summary's excerpt (status.samples itself comes from the report only).
        samples = reports.sample_answers(draft.status.get("samples")) or reports.sample_answers(summary.get("samples"))
        if samples:
            draft.extra_events.append(Event("Normal", "SampleAnswers", sample_excerpt(samples)))
    draft.finish(True, conditions.TRAINING_COMPLETE, message[:1024],
                 (tjob.get("status") or {}).get("completionTime"))
    _set_suspended(draft, holding_pods=False)


def sample_excerpt(samples: list[Body], limit: int = 1024) -> str:
    """`Q: … | base: … | tuned: …` for the first sample answer, at most `limit` characters."""
    first = samples[0]
    parts = [f"{label}: {' '.join(str(first[key]).split())}"
             for key, label in (("prompt", "Q"), ("base", "base"), ("tuned", "tuned")) if key in first]
    head = f"sample 1 of {len(samples)}: " if len(samples) > 1 else ""
    text = head + " | ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_FAILURE_REASONS = {
    "PodFailurePolicy": conditions.PERMANENT_ERROR,
    "BackoffLimitExceeded": conditions.BACKOFF_LIMIT_EXCEEDED,
    "FailedIndexes": conditions.BACKOFF_LIMIT_EXCEEDED,
    "MaxFailedIndexesExceeded": conditions.BACKOFF_LIMIT_EXCEEDED,
    "DeadlineExceeded": conditions.DEADLINE_EXCEEDED,
}


def _training_failure(tjob: Body, pods: tuple[Body, ...]) -> tuple[str, str]:
    condition = _job_condition(tjob, "Failed") or _job_condition(tjob, "FailureTarget") or {}
    job_reason = str(condition.get("reason") or "")
    reason = _FAILURE_REASONS.get(job_reason, conditions.TRAINER_JOB_FAILED)
    ended = latest_termination(pods, builders.TRAINER_CONTAINER, failed_only=True)
    if ended is not None and ended.exit_code == process.EXIT_PERMANENT:
        reason = conditions.PERMANENT_ERROR
    detail = _summary_text(ended) if ended else ""
    if reason == conditions.PERMANENT_ERROR:
        message = f"the trainer stopped with a permanent error (no retry): {detail or condition.get('message', '')}"
    elif reason == conditions.BACKOFF_LIMIT_EXCEEDED:
        limit = (tjob.get("spec") or {}).get("backoffLimitPerIndex", (tjob.get("spec") or {}).get("backoffLimit"))
        message = f"retryable failures used up backoffLimit ({limit})" + (f"; last: {detail}" if detail else "")
    elif reason == conditions.DEADLINE_EXCEEDED:
        message = f"the run exceeded activeDeadlineSeconds " \
                  f"({(tjob.get('spec') or {}).get('activeDeadlineSeconds')})"
    else:
        message = f"the trainer Job failed ({job_reason}: {condition.get('message', '')})"
    return reason, message[:1024]


# --- step 1: finished jobs ----------------------------------------------------------------

def _expire_training_children(draft: _Draft) -> None:
    ttl = draft.spec.ttl_seconds_after_finished
    completion = _parse_time(draft.status.get("completionTime") or draft.patch.get("completionTime"))
    if ttl is None or completion is None:
        return
    due = completion + timedelta(seconds=ttl)
    if draft.observed.now < due:
        draft.requeue_after = (due - draft.observed.now).total_seconds()
        return
    observed = draft.observed
    present = [("batch/v1", "Job", observed.trainer_job), ("batch/v1", "Job", observed.validation_job),
               ("v1", "ConfigMap", observed.config_map), ("v1", "Secret", observed.progress_secret)]
    removed = []
    for api_version, kind, child in present:
        if child is not None:
            draft.actions.append(DeleteChild(api_version, kind, child["metadata"]["name"]))
            removed.append(f"{kind} {child['metadata']['name']}")
    if removed:
        draft.extra_events.append(Event("Normal", "TrainingChildrenRemoved",
                                        f"ttlSecondsAfterFinished ({ttl}s) passed: removed {', '.join(removed)}; "
                                        "the FineTuneJob, the model and serving stay"))


# --- step 6: serving ----------------------------------------------------------------------

def _decide_serving(draft: _Draft, settings: OperatorSettings, limits: NamespaceLimits) -> None:
    """Converge the serving Deployment and Service, and say in `ServingReady` how serving is."""
    serving = draft.spec.serving_settings()
    if not serving.enabled:
        _remove_serving(draft)
        draft.set(conditions.SERVING_READY, "False", conditions.SERVING_DISABLED, "spec.serving.enabled is false")
        return
    if not draft.is_true(conditions.SUCCEEDED):
        _remove_serving(draft)
        if draft.is_true(conditions.FAILED):
            draft.set(conditions.SERVING_READY, "False", conditions.NO_MODEL, "training failed: no model to serve")
        else:
            draft.set(conditions.SERVING_READY, "False", conditions.WAITING_FOR_MODEL,
                      "serving starts once training succeeds")
        return
    if serving.share_with:
        _decide_shared_serving(draft, settings, serving.share_with)
        return
    image = (serving.image or "").strip()
    refusal = limits.serving_image_refusal(image, own_images(settings), str(draft.metadata.get("namespace", ""))) \
        if image else ""
    if refusal:
        _remove_serving(draft)
        draft.set(conditions.SERVING_READY, "False", conditions.IMAGE_NOT_ALLOWED, refusal)
        return
    try:
        model = render.model_location(draft.observed.job)
    except render.SpecError as error:
        _remove_serving(draft)
        draft.set(conditions.SERVING_READY, "False", conditions.SERVING_INVALID, "; ".join(error.problems))
        return
    job = draft.observed.job
    known = {**draft.status, **draft.patch}.get("model") or {}
    digest = str(known.get("digest") or "") if isinstance(known, dict) else ""
    guests = serving_guests(job, draft.observed.serving_guests)
    deployment = builders.serving_deployment(job, draft.spec, model, digest, settings, limits,
                                             key_digest=_serving_key(draft), guests=guests)
    _converge_adapters_config_map(draft, guests)
    if draft.status.get("servedBy"):
        draft.patch["servedBy"] = None  # no longer shared: served by its own Deployment
    actual = draft.observed.serving_deployment
    if actual is None:
        draft.actions.append(CreateChild(deployment))
    elif _annotation(actual, builders.ANNOTATION_SERVING_HASH) != \
            deployment["metadata"]["annotations"][builders.ANNOTATION_SERVING_HASH]:
        # Replace, not merge: a field the new manifest leaves out (a GPU limit, an argument) must go.
        draft.actions.append(ReplaceChild(deployment, str(actual["metadata"].get("resourceVersion") or "")))
    service = builders.serving_service(job)
    actual_service = draft.observed.serving_service
    if actual_service is None:
        draft.actions.append(CreateChild(service))
    elif _service_drifted(actual_service, service):
        draft.actions.append(PatchChild("v1", "Service", service["metadata"]["name"], {"spec": {
            "selector": service["spec"]["selector"], "ports": service["spec"]["ports"]}}))
    endpoint = builders.serving_endpoint(job, settings)
    if draft.status.get("endpoint") != endpoint:
        draft.patch["endpoint"] = endpoint
    status, reason, message = serving_readiness(actual, serving.replicas, digest)
    draft.set(conditions.SERVING_READY, status, reason, message)


def shared_serving_plan(guest: Body, spec: FineTuneJobSpec, host: Body | None) -> tuple[str, str] | list[str]:
    """For a job with `spec.serving.shareWith` (`guest`, its typed `spec`): (model name, adapter folder
    in the host's pods) when the named job's serving can load its adapter, else the problems, each
    naming the field."""
    share = spec.serving_settings().share_with or ""
    name = str((guest.get("metadata") or {}).get("name", ""))
    field = "spec.serving.shareWith"
    if share == name:
        return [f"{field}: names this job itself; name the job whose serving Deployment should load this adapter"]
    if host is None:
        namespace = (guest.get("metadata") or {}).get("namespace", "")
        return [f"{field}: there is no FineTuneJob {share!r} in namespace {namespace!r} (only a job in the same "
                "namespace can be named)"]
    try:
        host_spec = spec_of(host)
    except ValidationError as error:
        return [f"{field}: the spec of {share!r} is not valid ({'; '.join(error.problems)})"[:1024]]
    host_serving = host_spec.serving_settings()
    problems: list[str] = []
    if host_serving.share_with:
        problems.append(f"{field}: {share!r} itself shares the serving of {host_serving.share_with!r}; "
                        "name the job whose own Deployment serves")
    elif not host_serving.enabled:
        problems.append(f"{field}: {share!r} has spec.serving.enabled false, so there is no Deployment to load "
                        "this adapter into")
    if not spec.method.saves_adapter():
        problems.append(f"{field}: this job's output is a merged model, not an adapter another server can load; "
                        "set method.lora.merge: false")
    if not host_spec.method.saves_adapter():
        problems.append(f"{field}: {share!r} serves a merged or fully fine-tuned model, not the base model this "
                        f"adapter applies to; share with a job whose method.lora.merge is false")
    if spec.model != host_spec.model:
        problems.append(f"{field}: {share!r} is trained on base model "
                        f"{host_spec.model.source!r} and this job on "
                        f"{spec.model.source!r} (spec.model must be the same): an adapter "
                        "only applies to the base model it was trained on")
    if problems:
        return problems
    try:
        location, host_location = render.model_location(guest), render.model_location(host)
    except render.SpecError as error:
        return [f"{field}: {problem}" for problem in error.problems]
    missing = sorted(set(location.claims) - set(host_location.claims))
    if missing:
        return [f"{field}: this job's adapter is on claim(s) {', '.join(missing)}, which the serving pods of "
                f"{share!r} do not mount (they mount {', '.join(host_location.claims)}); write spec.output.storage "
                "to a claim they mount"]
    return name, location.path


def serving_guests(host: Body, candidates: tuple[Body, ...]) -> list[tuple[str, str]]:
    """(model name, adapter folder) of every job that shares the serving of `host` and can be served:
    its spec parses, it succeeded, has serving enabled, and `shared_serving_plan` finds no problem."""
    guests = []
    for guest in candidates:
        found = list((guest.get("status") or {}).get("conditions") or [])
        if not conditions.is_true(found, conditions.SUCCEEDED):
            continue
        try:
            spec = spec_of(guest)
        except ValidationError:
            continue  # its own reconcile reports the spec (Validated=False InvalidSpec)
        if not spec.serving_settings().enabled:
            continue
        plan = shared_serving_plan(guest, spec, host)
        if isinstance(plan, tuple):
            guests.append(plan)
    return sorted(guests)


def _converge_adapters_config_map(draft: _Draft, guests: list[tuple[str, str]]) -> None:
    """The ConfigMap the serving pods re-read to load guests' adapters (builtin server over an adapter)."""
    actual = draft.observed.serving_adapters_config_map
    if not builders.serving_takes_adapters(draft.spec):
        if actual is not None:
            draft.actions.append(DeleteChild("v1", "ConfigMap", actual["metadata"]["name"]))
        return
    desired = builders.serving_adapters_config_map(draft.observed.job, guests)
    if actual is None:
        draft.actions.append(CreateChild(desired))
    elif (actual.get("data") or {}) != desired["data"]:
        draft.actions.append(PatchChild("v1", "ConfigMap", desired["metadata"]["name"], {"data": desired["data"]}))


def _decide_shared_serving(draft: _Draft, settings: OperatorSettings, share_with: str) -> None:
    """`spec.serving.shareWith`: no serving objects of its own; the named job's serving pods load
    the adapter (that job's reconcile lists it). Status says where it is served and whether it is."""
    _remove_serving(draft)
    host = draft.observed.serving_host
    plan = shared_serving_plan(draft.observed.job, draft.spec, host)
    if isinstance(plan, list):
        reason = conditions.WAITING_FOR_SERVING_HOST if host is None else conditions.SERVING_INVALID
        draft.set(conditions.SERVING_READY, "False", reason, "; ".join(plan)[:1024])
        return
    assert host is not None
    host_conditions = list((host.get("status") or {}).get("conditions") or [])
    if not conditions.is_true(host_conditions, conditions.SUCCEEDED):
        draft.set(conditions.SERVING_READY, "False", conditions.WAITING_FOR_SERVING_HOST,
                  f"spec.serving.shareWith: {share_with!r} has not finished training; its serving starts once it "
                  "succeeds")
        return
    deployment = names.serving(share_with)
    draft.patch["endpoint"] = builders.serving_endpoint(host, settings)
    draft.patch["servedBy"] = deployment
    host_ready = conditions.find(host_conditions, conditions.SERVING_READY)
    if host_ready is not None and host_ready.get("status") == "True":
        draft.set(conditions.SERVING_READY, "True", conditions.SHARED_SERVING,
                  f"served as model {plan[0]!r} by Deployment {deployment} of {share_with!r} "
                  f"({host_ready.get('message', '')}); its pods load the adapter listed in ConfigMap "
                  f"{names.serving_adapters(share_with)} without a restart (clients use {share_with!r}'s API key)")
    else:
        why = (host_ready.get("message") if host_ready is not None else None) or "not started"
        draft.set(conditions.SERVING_READY, "False", conditions.WAITING_FOR_SERVING_HOST,
                  f"spec.serving.shareWith: the serving of {share_with!r} is not available: {why}"[:1024])


def serving_readiness(deployment: Body | None, replicas: int, digest: str) -> tuple[conditions.Status, str, str]:
    """`ServingReady` from the serving Deployment as observed: (status, reason, message)."""
    if replicas == 0:
        return "False", conditions.SCALED_TO_ZERO, "spec.serving.replicas is 0: the Service stays, nothing answers"
    if deployment is None:
        return "False", conditions.DEPLOYMENT_PROGRESSING, "the serving Deployment was created"
    state = deployment.get("status") or {}
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    current = int(state.get("observedGeneration") or 0) >= generation
    available = int(state.get("availableReplicas") or 0)
    updated = int(state.get("updatedReplicas") or 0)
    if current and available >= min(1, replicas):
        message = f"{available}/{replicas} serving replicas available"
        if updated < replicas:
            message += f"; rolling out model {digest or '(no digest)'} ({updated}/{replicas} updated)"
        return "True", conditions.SERVING_AVAILABLE, message
    for condition in state.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return "False", conditions.DEPLOYMENT_STALLED, \
                f"the serving Deployment made no progress: {condition.get('message', '')}"[:1024]
    return "False", conditions.DEPLOYMENT_PROGRESSING, \
        f"waiting for a serving replica to become ready ({available}/{replicas} available)"


def _service_drifted(actual: Body, desired: Body) -> bool:
    spec = actual.get("spec") or {}
    ports = [{k: p.get(k) for k in ("name", "port", "targetPort", "protocol")} for p in spec.get("ports") or []]
    return bool(spec.get("selector") != desired["spec"]["selector"] or ports != desired["spec"]["ports"])


def _serving_key(draft: _Draft) -> str:
    """The API key's digest for the pod template ("" with `auth: none`); creates the key's Secret
    with a random key when it is missing (deleting the Secret rotates the key)."""
    job = draft.observed.job
    if draft.spec.serving_settings().auth != builders.AUTH_API_KEY:
        return ""
    secret = draft.observed.serving_key_secret
    if secret is not None:
        # Read as metadata only: the digest the operator annotated it with when it made the key
        # (deleting the Secret rotates the key). Without the annotation, its resourceVersion.
        metadata = secret.get("metadata") or {}
        digest = (metadata.get("annotations") or {}).get(builders.ANNOTATION_API_KEY_DIGEST)
        return str(digest) if digest else f"rv-{metadata.get('resourceVersion', '')}"
    key = secrets.token_urlsafe(32)
    draft.actions.append(CreateChild(builders.serving_key_secret(job, key)))
    return builders.api_key_digest(key)


def _remove_serving(draft: _Draft) -> None:
    """Serving is off (or there is no model): delete its objects and forget the endpoint."""
    observed = draft.observed
    for api_version, kind, child in (("apps/v1", "Deployment", observed.serving_deployment),
                                     ("v1", "Service", observed.serving_service),
                                     ("v1", "ConfigMap", observed.serving_adapters_config_map)):
        if child is not None:
            draft.actions.append(DeleteChild(api_version, kind, child["metadata"]["name"]))
    for field in ("endpoint", "servedBy"):
        if draft.status.get(field):
            draft.patch[field] = None  # merge-patch null removes the field


# --- reading children ---------------------------------------------------------------------

def _job_condition(job: Body, type_: str) -> Body | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def job_outcome(job: Body) -> str:
    """`Complete`, `Failed` or `Active` for a batch/v1 Job (terminal as soon as the controller decides)."""
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return "Complete"
    if _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        return "Failed"
    return "Active"


def latest_termination(pods: tuple[Body, ...], container: str, *, exit_code: int | None = None,
                       failed_only: bool = False) -> Termination | None:
    """How the most recently finished container of that name ended, optionally filtered."""
    found: list[Termination] = []
    for pod in pods:
        conditions_ = (pod.get("status") or {}).get("conditions") or []
        disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions_)
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if status.get("name") != container or not isinstance(terminated, dict):
                continue
            code = int(terminated.get("exitCode", -1))
            if (exit_code is not None and code != exit_code) or (failed_only and code == 0):
                continue
            message = str(terminated.get("message") or "")
            found.append(Termination(exit_code=code, message=message, summary=_parse_summary(message),
                                     finished_at=str(terminated.get("finishedAt") or ""), disrupted=disrupted))
    if not found:
        return None
    return max(found, key=lambda t: t.finished_at)


def _parse_summary(message: str) -> Body:
    try:
        parsed = json.loads(message)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _summary_text(ended: Termination) -> str:
    if ended.summary:
        text = ended.summary.get("message")
        return str(text)[:1000] if text else ""
    return ended.message.strip()[-1000:]


def _annotation(obj: Body, key: str) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(key)
    return str(value) if value is not None else None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def state_of(status: Body) -> str:
    """One word for a job's state, for metrics and printer columns."""
    found: list[Condition] = list(status.get("conditions") or [])
    if conditions.is_true(found, conditions.SUCCEEDED):
        return "Succeeded"
    if conditions.is_true(found, conditions.FAILED):
        failed = conditions.find(found, conditions.FAILED)
        return "Pruned" if failed is not None and failed.get("reason") == conditions.PRUNED else "Failed"
    if conditions.is_true(found, conditions.SUSPENDED):
        return "Suspended"
    if conditions.is_true(found, conditions.RUNNING):
        return "Running"
    validated = conditions.find(found, conditions.VALIDATED)
    if validated is None or validated.get("status") == "Unknown":
        return "Validating"
    return "Pending"


def child_names(job_name: str) -> dict[str, str]:
    """The names of every child of a job (for the client to read them)."""
    return {
        "config_map": names.config_map(job_name),
        "progress_secret": names.progress_secret(job_name),
        "validation_job": names.validation_job(job_name),
        "trainer_job": names.trainer_job(job_name),
        "serving": names.serving(job_name),
        "serving_key": names.serving_key(job_name),
        "serving_adapters": names.serving_adapters(job_name),
    }
