"""Status conditions of a FineTuneJob: types, reasons, and the one way to set them.

Conditions follow the Kubernetes API conventions: `lastTransitionTime` moves
only when a condition's `status` flips; `reason` is a CamelCase constant from
this module; `message` is for humans. Functions here are pure: they return new
lists and never mutate their input.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class Condition(TypedDict):
    """One entry of `status.conditions`."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    observedGeneration: int
    lastTransitionTime: str


Status = Literal["True", "False", "Unknown"]

# --- condition types -------------------------------------------------------------

VALIDATED = "Validated"
"""The spec renders into a valid trainer config and the dataset passed validation."""
RUNNING = "Running"
"""A trainer pod is running."""
SUCCEEDED = "Succeeded"
"""Training finished and the model was written (terminal)."""
FAILED = "Failed"
"""Training ended without a model (terminal)."""
SUSPENDED = "Suspended"
"""The user suspended the job (`spec.suspend: true`); checkpoints are kept."""
SERVING_READY = "ServingReady"
"""The finished model is served."""
STALLED = "Stalled"
"""A running trainer's step has not advanced for `spec.training.stallTimeoutSeconds` (set only when
that is on)."""
TRACKED = "Tracked"
"""The run is logged to the experiment tracking server of `spec.tracking` (set only when that is on)."""

ALL_TYPES = (VALIDATED, RUNNING, SUCCEEDED, FAILED, SUSPENDED, SERVING_READY, STALLED, TRACKED)

# --- reasons -----------------------------------------------------------------------

INVALID_SPEC = "InvalidSpec"
"""The spec cannot be rendered into a trainer config (names the field)."""
VALIDATING = "ValidatingDataset"
"""The dataset-validation pod has not finished yet."""
DATASET_VALID = "DatasetValid"
"""The dataset-validation pod passed."""
INVALID_DATASET = "InvalidDataset"
"""The dataset-validation pod (or the trainer) found a problem with the data."""
INSUFFICIENT_RESOURCES = "InsufficientResources"
"""The job cannot fit in the resources it asked for (per the memory estimate); nothing was started."""
VALIDATION_ERROR = "ValidationError"
"""The dataset-validation pod failed for a reason other than the data (retries exhausted)."""
WAITING_FOR_VALIDATION = "WaitingForValidation"
PENDING = "Pending"
"""The trainer Job exists but no pod runs yet (scheduling, image pull, queue)."""
TRAINING = "Training"
"""A trainer pod is running."""
RESUMING = "Resuming"
"""A retryable failure happened; a new pod resumes from the latest checkpoint."""
NOT_FINISHED = "NotFinished"
TRAINING_COMPLETE = "TrainingComplete"
"""The trainer exited 0 and wrote the model."""
PERMANENT_ERROR = "PermanentError"
"""The trainer exited with the permanent-error code: bad config, data or model; no retry."""
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
"""Retryable failures used up `spec.backoffLimit`."""
DEADLINE_EXCEEDED = "DeadlineExceeded"
"""The run exceeded `spec.activeDeadlineSeconds`."""
TRAINER_JOB_FAILED = "TrainerJobFailed"
PRUNED = "Pruned"
"""A FineTuneSweep pruned the trial (annotation `kubetune.io/pruned-by-sweep`): its trainer Job is deleted and it
ends Failed=True, Succeeded=False with this reason, so every "finished" check holds without a new state."""
"""The trainer Job failed for another reason (named in the message)."""
TRAINER_JOB_MISSING = "TrainerJobMissing"
"""The trainer Job disappeared before the outcome was known."""
CHILD_NAME_CONFLICT = "ChildNameConflict"
"""An object with a child's name exists that the job does not own; nothing is created while it is there."""
WAITING_FOR_OLD_CHILDREN = "WaitingForOldChildren"
"""Children of a deleted job of the same name are still being garbage-collected; nothing is created yet."""
POLICY_VIOLATION = "PolicyViolation"
"""The spec asks for something the platform policy does not allow in this namespace (tolerations, node
selectors, priority class, trustRemoteCode, generator model, output claim, image); names field and rule."""
QUOTA_EXCEEDED = "QuotaExceeded"
"""The namespace's quota (platform policy) has no room for this job's trainer yet; it starts when room
frees up, oldest waiting job first."""
MODEL_SOURCE_NOT_ALLOWED = "ModelSourceNotAllowed"
"""The platform policy does not allow `spec.model.source` in this namespace (permanent)."""
IMAGE_NOT_ALLOWED = "ImageNotAllowed"
"""The platform policy does not allow the image named in the spec (`spec.serving.image`)."""
SOURCE_JOB_NOT_READY = "SourceJobNotReady"
"""`spec.model.fromJob` names a FineTuneJob that is missing or has not Succeeded yet (waits for it)."""
CREDENTIALS_UNAVAILABLE = "CredentialsUnavailable"
"""A Secret or key named in `spec.credentials` is missing: the pod could not get its environment
(the kubelet's CreateContainerConfigError)."""
MODEL_UNAVAILABLE = "ModelUnavailable"
"""The validation pod could not reach or read the base model (not found, 401/403, unreachable)."""
STORAGE_UNAVAILABLE = "StorageUnavailable"
"""The validation pod could not reach an object-store location (missing bucket or key, wrong
credentials, unreachable endpoint); the message names the field."""
SUSPENDED_BY_USER = "SuspendedByUser"
QUEUED_BY_KUEUE = "QueuedByKueue"
"""Running=False: Kueue holds the trainer Job suspended (`resources.queueName`): not admitted yet, or
evicted (preempted) and waiting to be admitted again; the message names the LocalQueue. The user's
own suspension is `Suspended=True` (SuspendedByUser), never this."""
NOT_SUSPENDED = "NotSuspended"
SERVING_DISABLED = "ServingDisabled"
"""`spec.serving.enabled` is false."""
WAITING_FOR_MODEL = "WaitingForModel"
"""Serving waits until training succeeds."""
NO_MODEL = "NoModel"
"""Training failed: there is no model to serve."""
DEPLOYMENT_PROGRESSING = "DeploymentProgressing"
"""The serving Deployment exists but no replica is available yet (scheduling, pulling, loading)."""
DEPLOYMENT_STALLED = "DeploymentStalled"
"""The serving Deployment exceeded its progress deadline (crash loop, unschedulable, bad image)."""
SERVING_AVAILABLE = "ServingAvailable"
"""At least one serving replica is available behind the Service."""
SCALED_TO_ZERO = "ScaledToZero"
"""`spec.serving.replicas` is 0: the Service stays, nothing answers."""
SERVING_INVALID = "ServingInvalid"
"""The serving objects cannot be built from the spec (named in the message)."""
SHARED_SERVING = "SharedServing"
"""`spec.serving.shareWith`: the adapter is listed for the other job's serving Deployment, which is available."""
WAITING_FOR_SERVING_HOST = "WaitingForServingHost"
"""`spec.serving.shareWith`: the other job's serving is not available (yet)."""
TRACKING_ACTIVE = "TrackingActive"
"""Tracked=True: the trainer logs the run to the tracking server."""
TRACKING_UNAVAILABLE = "TrackingUnavailable"
"""Tracked=False: the tracking server could not be reached or refused; training goes on."""
NO_PROGRESS = "NoProgress"
"""Stalled=True: the trainer pod runs but its step has not advanced for the stall timeout."""
STALL_RESTART = "RestartedFromCheckpoint"
"""Stalled=True: the stalled trainer pod was deleted (platform policy `restartStalledTraining`); its
replacement resumes from the latest checkpoint."""
PROGRESSING = "Progressing"
"""Stalled=False: the step advanced within the stall timeout (or training has not started)."""
NOT_TRAINING = "NotTraining"
"""Stalled=False: no trainer pod is running (pending, suspended or finished)."""


def find(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of that type, or None."""
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    """Whether the condition of that type exists and has status True."""
    found = find(conditions, type_)
    return found is not None and found.get("status") == "True"


def set_condition(conditions: list[Condition], type_: str, status: Status, reason: str,
                  message: str, *, generation: int, now: str) -> list[Condition]:
    """A new list with that condition set; `lastTransitionTime` moves only when `status` flips."""
    previous = find(conditions, type_)
    transition = now
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    updated: Condition = {
        "type": type_, "status": status, "reason": reason, "message": message,
        "observedGeneration": generation, "lastTransitionTime": transition,
    }
    result = [c for c in conditions if c.get("type") != type_]
    result.append(updated)
    order = {t: i for i, t in enumerate(ALL_TYPES)}
    result.sort(key=lambda c: order.get(c.get("type", ""), len(order)))
    return result


def changes(before: list[Condition], after: list[Condition]) -> list[Condition]:
    """Conditions of `after` whose status or reason differ from `before` (what deserves an Event)."""
    changed = []
    for condition in after:
        old = find(before, condition["type"])
        if old is None or old.get("status") != condition["status"] or old.get("reason") != condition["reason"]:
            changed.append(condition)
    return changed
