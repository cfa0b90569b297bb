"""The messages a trainer sends the operator: progress reports and the termination summary.

Progress reports are JSON objects the trainer prints on stdout and POSTs to the operator's endpoint
(`process.ENV_PROGRESS_URL`); the termination summary is one JSON object in the pod's termination
message (at most 4 KiB), which finishes the status even when a report was lost. The trainer builds
both from these definitions (`trainer/reporting.py`); the operator checks them against these
definitions and the status schema (`operator/progress/reports.py`, `operator/jobs/reconcile.py`); the round-trip
tests generate messages from these TypedDicts and send them through both.

Types on the wire: `float` is any finite JSON number, `int` an integer >= 0, `str` a string; a field
whose value would be None is left out, at any depth (`compact`). New fields are added here, as
optional (`total=False`) keys, so an older operator ignores what it does not know.
"""

# No `from __future__ import annotations`: TypedDict sees Required[...] only in evaluated annotations.
import typing
from typing import Any, Literal, Required, TypedDict

ReportKind = Literal["started", "progress", "evaluation", "checkpoint", "completed", "failed"]
"""started: loading (or resumed); progress: every few seconds; evaluation: validation figures;
checkpoint: one was saved; completed: the model is saved; failed: the run stops with an error."""
KINDS: tuple[str, ...] = typing.get_args(ReportKind)
TERMINAL_KINDS: tuple[str, ...] = ("completed", "failed")
"""Kinds after which the attempt sends nothing more."""

Outcome = Literal["succeeded", "failed", "error", "preempted", "validated"]
"""The termination summary's outcome: succeeded (exit 0); failed: a permanent error (bad data,
config or model); error: an unexpected, retryable one; preempted: SIGTERM, checkpoint saved;
validated: the dataset-validation pod accepted the data."""
OUTCOMES: tuple[str, ...] = typing.get_args(Outcome)


class JobRef(TypedDict):
    """The FineTuneJob a report is for (its token is signed for exactly these three)."""

    namespace: str
    name: str
    uid: str


class CheckpointRef(TypedDict, total=False):
    """A checkpoint just saved."""

    step: Required[int]
    """The optimizer step it holds."""
    path: str
    """Its folder, as the trainer's pod sees it."""
    valLoss: float
    """Validation loss at that step, when it was evaluated."""


class ClassMetrics(TypedDict, total=False):
    """Test metrics of one class (classification)."""

    precision: float
    recall: float
    f1: float
    support: int
    """Test examples of this class."""


class ConfusionMatrix(TypedDict, total=False):
    """Counts of test examples by true label (row) and predicted label (column)."""

    labels: list[str]
    matrix: list[list[int]]


class TestMetrics(TypedDict, total=False):
    """One model's metrics on the test split. Further metric names map to numbers."""

    loss: float
    perplexity: float
    tokenAccuracy: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    examples: int
    perClass: dict[str, ClassMetrics]
    confusionMatrix: ConfusionMatrix


class Improvement(TypedDict, total=False):
    """The fine-tuned model against the base model on the same test split."""

    perplexityDrop: float
    lossDrop: float
    tokenAccuracyGain: float
    accuracyGain: float
    f1Gain: float


class TestResults(TestMetrics, total=False):
    """Test metrics of the fine-tuned model, with the base model's and the change."""

    baseline: TestMetrics
    improvement: Improvement


STRUCTURED_RESULTS: tuple[str, ...] = ("perClass", "confusionMatrix", "baseline", "improvement")
"""Keys of `TestResults` whose values are objects; every other key is a metric name with a number."""


class SampleAnswer(TypedDict, total=False):
    """One test prompt, answered by the base model and by the fine-tuned one."""

    prompt: str
    reference: str
    base: str
    tuned: str


class ModelRef(TypedDict, total=False):
    """The saved model: its folder as the pod sees it, and its content digest."""

    uri: str
    digest: str


class ResolvedHyperparameters(TypedDict, total=False):
    """The hyperparameters the run uses, `auto` resolved (camelCase names of the spec)."""

    epochs: float
    batchSize: int
    learningRate: float
    scheduler: str
    warmupRatio: float
    weightDecay: float
    dropout: float
    """Absent: the model's own dropout is kept."""
    maxSeqLength: int
    gradientAccumulationSteps: int
    seed: int
    automatic: list[str]
    """Names of the fields that were `auto`."""
    worldSize: int
    """Training processes of the run (devices per pod × pods)."""
    globalBatchSize: int
    """Sequences per optimizer step over the whole run: batchSize × worldSize × gradientAccumulationSteps."""


TrackingState = Literal["ok", "unavailable"]
"""ok: the run is logged to the tracking server; unavailable: the server could not be reached or refused,
and the trainer stopped logging to it for this attempt (training goes on)."""
TRACKING_STATES: tuple[str, ...] = typing.get_args(TrackingState)


class TrackingStatus(TypedDict, total=False):
    """Where the run is logged for experiment tracking (MLflow), and whether that works."""

    state: Required[TrackingState]
    message: str
    """Why it is unavailable (naming the tracking URI), or what was logged."""
    runId: str
    experimentId: str
    url: str
    """The run's page on the tracking server."""


class ReportFields(TypedDict, total=False):
    """What one progress report may carry besides its envelope; the trainer names these fields."""

    step: int
    totalSteps: int
    epoch: float
    tokensSeen: int
    trainLoss: float
    valLoss: float
    valPerplexity: float
    learningRate: float
    tokensPerSecond: float
    etaSeconds: float
    message: str
    checkpoint: CheckpointRef
    results: TestResults
    """completed: the test results; evaluation: further validation figures (valAccuracy, valF1, ...)."""
    samples: list[SampleAnswer]
    model: ModelRef
    resolved: ResolvedHyperparameters
    """Sent with `started` once the hyperparameters are resolved, and with `completed`."""
    tracking: TrackingStatus
    """With `spec.tracking`: every report once the tracking run is set up (a few hundred bytes)."""


class ProgressReport(ReportFields, total=False):
    """One progress report as sent: the envelope (who, which attempt, order, when, what) and fields."""

    job: Required[JobRef]
    attempt: Required[int]
    """Retry attempt of the trainer Job (`process.ENV_ATTEMPT`)."""
    seq: Required[int]
    """1, 2, ... within one trainer process; the operator rejects one not newer than the last."""
    time: Required[str]
    """RFC 3339 with a time zone."""
    kind: Required[ReportKind]


class SizingModel(TypedDict):
    """The model's shape, counted on a weightless instance of its architecture."""

    config: dict[str, Any]
    """The shape keys of the model's config, as config.json names them (`hidden_size`, `n_layer`, …)."""
    parameters: int
    """Exact parameter count."""
    loraInputsOutputs: int
    """Exact Σ(in + out features) of the modules LoRA adapts."""


class SizingData(TypedDict):
    """The training split as the trainer prepared it."""

    trainExamples: int
    """Training examples after cleaning, splitting and augmentation."""
    trainTokens: int
    """Their tokens, as the trainer tokenises them."""
    longestExample: int
    """Tokens of the longest training example."""


class SizingShape(TypedDict):
    """Epochs, micro-batch and sequence length as the trainer will resolve them on one kind of device."""

    epochs: float
    """Passes over the training split (fractional when `auto` caps a huge dataset)."""
    batchSize: int
    """Micro-batch per device, in sequences."""
    maxSeqLength: int
    """Tokens per sequence."""


class SizingHyperparameters(TypedDict):
    """The resolved shape for a CPU and for a GPU run (the operator has not chosen the device yet)."""

    cpu: SizingShape
    """On a CPU."""
    gpu: SizingShape
    """On one GPU."""


class SizingFacts(TypedDict):
    """What the validation pod reports for the operator's resource estimate (`status.estimate`): the
    operator cannot read a model on a PVC nor import torch, the validation pod can."""

    model: SizingModel
    """The model's shape and exact counts."""
    data: SizingData
    """The prepared training split."""
    hyperparameters: SizingHyperparameters
    """The resolved training shape per kind of device."""


class TerminationSummary(TypedDict, total=False):
    """The pod's termination message (JSON, at most `TERMINATION_MESSAGE_LIMIT` bytes)."""

    outcome: Required[Outcome]
    message: str
    reason: str
    """A permanent error's kind (`errors.PermanentError.reason`): the condition's reason."""
    step: int
    valLoss: float
    results: TestResults
    modelDigest: str
    samples: list[SampleAnswer]
    """At most one, each text cut short."""
    resolved: ResolvedHyperparameters
    sizing: SizingFacts
    """validated: the model and data facts the operator's resource estimate uses."""
    tokensProcessed: int
    """Training tokens this process trained on: what `status.usage` records (the pod writes it,
    unlike a progress report, which anyone holding the job's token could send)."""
    tracking: TrackingStatus
    """With `spec.tracking`: the tracking run and whether logging to it worked."""


TERMINATION_MESSAGE_LIMIT = 4096
"""Kubernetes keeps at most 4 KiB of a termination message."""


def field_types(message: type) -> dict[str, Any]:
    """A message's fields and their types (`ReportFields` -> {"step": int, ...})."""
    return typing.get_type_hints(message)


def number_fields(message: type) -> tuple[str, ...]:
    """The fields of `message` that are finite numbers."""
    return tuple(name for name, kind in field_types(message).items() if kind is float)


def count_fields(message: type) -> tuple[str, ...]:
    """The fields of `message` that are integers >= 0."""
    return tuple(name for name, kind in field_types(message).items() if kind is int)


def compact(value: Any) -> Any:
    """`value` with every None left out of its objects and arrays, at any depth (the wire's rule)."""
    if isinstance(value, dict):
        return {key: compact(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [compact(item) for item in value if item is not None]
    return value
