"""The FineTuneSweep API (`kubetune.io/v1alpha1`): typed spec and status models of a hyperparameter sweep.

A FineTuneSweep runs several FineTuneJobs ("trials") from one template, each
with other values for a few hyperparameters, and picks the best by an
objective metric the trials report. `kubetune.operator.crd` generates
`crds/finetunesweeps.kubetune.io.yaml` from these classes the same way it does
for the FineTuneJob (`apischema`): field docstrings are descriptions, bounds
and CEL rules ride on the types. The template *is* `models.FineTuneJobSpec`,
so a template is validated exactly like a FineTuneJob.

Pure: no kopf, no kubernetes client. The sweep's behaviour is in `sweep`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Final, Literal, TypedDict

from kubetune.api import finetunejob as models, schema as apischema
from kubetune.api.schema import (
    Immutable,
    ListType,
    MaxItems,
    MaxLength,
    MaxProperties,
    Maximum,
    MinItems,
    Minimum,
    Rule,
    rules,
)

GROUP = models.GROUP
VERSION = models.VERSION
KIND = "FineTuneSweep"
PLURAL = "finetunesweeps"

# --- what may be swept ----------------------------------------------------------------------

INTEGER_PARAMETERS: Final = (
    "hyperparameters.epochs",
    "hyperparameters.batchSize",
    "hyperparameters.gradientAccumulationSteps",
    "hyperparameters.maxSeqLength",
    "hyperparameters.seed",
    "method.lora.rank",
)
"""Parameters whose values are integers (types `int` or `categorical` with whole numbers)."""
NUMBER_PARAMETERS: Final = (
    "hyperparameters.learningRate",
    "hyperparameters.weightDecay",
    "hyperparameters.warmupRatio",
    "hyperparameters.dropout",
    "method.lora.alpha",
    "method.lora.dropout",
)
"""Parameters whose values are real numbers (any type)."""

ParameterName = Literal[
    "hyperparameters.epochs", "hyperparameters.batchSize", "hyperparameters.gradientAccumulationSteps",
    "hyperparameters.maxSeqLength", "hyperparameters.seed", "method.lora.rank",
    "hyperparameters.learningRate", "hyperparameters.weightDecay", "hyperparameters.warmupRatio",
    "hyperparameters.dropout", "method.lora.alpha", "method.lora.dropout",
]
ParameterType = Literal["categorical", "uniform", "logUniform", "int"]
AlgorithmType = Literal["grid", "random", "tpe", "cmaes"]
ObjectiveMetric = Literal[
    "valLoss", "valPerplexity", "bestValLoss", "trainLoss", "valAccuracy", "valF1", "testLoss", "testPerplexity",
    "testTokenAccuracy", "testAccuracy", "testPrecision", "testRecall", "testF1",
]
Goal = Literal["minimize", "maximize"]
EarlyTerminationType = Literal["none", "medianStop", "asha"]
TrialState = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped", "Pruned"]
SweepPhase = Literal["Pending", "Running", "Succeeded", "Failed"]

_INTEGER_LIST = "[" + ", ".join(f"'{name}'" for name in INTEGER_PARAMETERS) + "]"
_FIXED = "it defines the trials; create a new FineTuneSweep to change it"


# --- spec --------------------------------------------------------------------------------------


@rules(
    Rule("self.type == 'categorical' ? has(self.values) && !has(self.min) && !has(self.max) "
         ": !has(self.values) && has(self.min) && has(self.max)",
         "type categorical takes `values` (and no min/max); uniform, logUniform and int take `min` and `max` "
         "(and no values)", reason="FieldValueInvalid"),
    Rule("!has(self.min) || !has(self.max) || self.min < self.max", "min must be below max",
         field_path=".max"),
    Rule("self.type != 'logUniform' || !has(self.min) || self.min > 0.0",
         "logUniform needs min > 0 (it samples evenly in log space)", field_path=".min"),
    Rule("!has(self.step) || self.type == 'int'", "step applies only to type int", field_path=".step",
         reason="FieldValueForbidden"),
    Rule(f"self.type != 'int' || self.name in {_INTEGER_LIST}",
         "type int is for integer parameters (epochs, batchSize, gradientAccumulationSteps, maxSeqLength, "
         "seed, method.lora.rank); use uniform or logUniform for real numbers", field_path=".type"),
    Rule(f"!(self.type in ['uniform', 'logUniform']) || !(self.name in {_INTEGER_LIST})",
         "an integer parameter takes type int or categorical", field_path=".type"),
    Rule("self.type != 'int' || (self.min == double(int(self.min)) && self.max == double(int(self.max)))",
         "type int needs whole-number min and max", field_path=".min"),
)
@dataclasses.dataclass(frozen=True)
class SearchParameter:
    """One hyperparameter of the search space and the values it may take."""

    name: ParameterName
    """The FineTuneJob spec field to vary, as a dotted path, e.g. `hyperparameters.learningRate` or
    `method.lora.rank` (LoRA fields need `template.method.type: lora`)."""
    type: ParameterType
    """`categorical`: one of `values`. `uniform`: a real number in [min, max]. `logUniform`: a real
    number in [min, max], evenly spread in log space (learning rates). `int`: a whole number in
    [min, max] (every `step`-th)."""
    values: Annotated[list[float], MinItems(1), MaxItems(64), ListType("atomic")] | None = None
    """The values to try (type `categorical`), e.g. `[1.0e-4, 3.0e-4, 1.0e-3]`; in this order for
    grid search."""
    min: float | None = None
    """Lower bound (types uniform, logUniform, int), inclusive."""
    max: float | None = None
    """Upper bound (types uniform, logUniform, int), inclusive."""
    step: Annotated[int, Minimum(1), Maximum(1_000_000)] | None = None
    """Type int: only every `step`-th value from `min` is tried. Absent: 1."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """How trial parameters are chosen. Grid and random: trial i's parameters are a pure function of
    the spec and i. TPE and CMA-ES (Optuna): of the seed and the results of earlier trials, replayed
    from `status.study` after an operator restart. A created trial never changes."""

    type: AlgorithmType = "random"
    """`grid`: every combination of the parameters' grid values, the last parameter varying
    fastest, at most `maxTrials` of them. `random`: independent draws per trial and parameter,
    reproducible from `seed`. `tpe`: Optuna's Tree-structured Parzen Estimator, a model of which
    values did well (after `startupTrials` random trials). `cmaes`: Optuna's CMA-ES, an evolution
    strategy for real and integer parameters (categorical ones are drawn at random)."""
    seed: Annotated[int, Minimum(0), Maximum(2**31 - 1)] = 0
    """Seed of random search and of the TPE and CMA-ES samplers: the same seed, spec and results give
    the same trials."""
    startup_trials: Annotated[int, Minimum(1), Maximum(500)] = 5
    """TPE and CMA-ES: trials drawn at random before the model is used (Optuna's `n_startup_trials`);
    a small budget wants a small number."""
    grid_points: Annotated[int, Minimum(2), Maximum(64)] = 3
    """Grid search: values per uniform or logUniform parameter, evenly spaced from min to max (in
    log space for logUniform) inclusive. Type int uses every `step`-th integer, categorical its
    values."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """What makes a trial better."""

    metric: ObjectiveMetric = "valLoss"
    """The figure read from each succeeded trial's status: `valLoss`, `valPerplexity`, `trainLoss`,
    and for classification `valAccuracy` and `valF1` (macro-F1) (`status.metrics`, the last
    validation), `bestValLoss` (`status.metrics.bestCheckpoint.valLoss`), or test-split
    results (`status.results`): `testLoss`, `testPerplexity`, `testTokenAccuracy`, and for
    classification `testAccuracy`, `testPrecision`, `testRecall`, `testF1`."""
    goal: Goal | None = None
    """`minimize` or `maximize` (Optuna's study direction). Absent: minimize losses and perplexities,
    maximize accuracies, precision, recall and F1."""


@dataclasses.dataclass(frozen=True)
class EarlyTermination:
    """Stop trials that are unlikely to win."""

    type: EarlyTerminationType = "none"
    """Pruning on whole learning curves (every validation of every trial, the validation form of the
    objective metric, from the trial's `status.metrics.evaluations`), by Optuna's pruners.
    `medianStop`: prune a running trial whose best value so far is worse than the median of the
    succeeded trials' values at the same step. `asha`: asynchronous successive halving: at steps
    `minResource * reductionFactor^k` keep only the best 1/`reductionFactor` of the trials that got
    there. A pruned trial's trainer Job is deleted and it ends `Succeeded=False, reason Pruned`.
    `none`: every trial runs to its end."""
    start_after_trials: Annotated[int, Minimum(1), Maximum(1000)] = 3
    """medianStop: prune nothing until this many trials succeeded, and compare only when this many
    have a value at the step in question."""
    min_steps: Annotated[int, Minimum(0), Maximum(10_000_000)] = 0
    """medianStop: never prune a trial before this optimizer step."""
    min_resource: Annotated[int, Minimum(1), Maximum(10_000_000)] | None = None
    """asha: optimizer steps of the first rung. Absent: Optuna's `auto` (1/100 of the steps of the
    first trial to finish; nothing is pruned before one finished)."""
    reduction_factor: Annotated[int, Minimum(2), Maximum(16)] = 3
    """asha: each rung keeps the best 1/reductionFactor of its trials."""


@rules(
    Rule("self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))",
         "parameter names must be unique", field_path=".parameters"),
    Rule("self.parallelTrials <= self.maxTrials", "parallelTrials must not exceed maxTrials",
         field_path=".parallelTrials"),
    Rule("!self.parameters.exists(p, p.name.startsWith('method.lora.')) || "
         "(has(self.template.method) && self.template.method.type == 'lora')",
         "method.lora.* parameters need template.method.type lora", field_path=".parameters"),
)
@dataclasses.dataclass(frozen=True)
class FineTuneSweepSpec:
    """FineTuneSweepSpec is a hyperparameter search: a FineTuneJob template, a search space, how to
    pick trials, how many, and the objective that ranks them."""

    template: models.FineTuneJobSpec
    """The FineTuneJob spec every trial starts from; each trial sets its own values of
    `parameters` in it. Trials never serve (`serving.enabled` is false) unless `promoteBest`
    chooses them; `serving` here then configures the winner's serving."""
    parameters: Annotated[list[SearchParameter], MinItems(1), MaxItems(16), ListType("atomic"),
                          Immutable(_FIXED)]
    """The search space: one entry per hyperparameter to vary, names unique."""
    algorithm: Annotated[Algorithm, Immutable(_FIXED)] = dataclasses.field(default_factory=Algorithm)
    """Grid or seeded random search."""
    objective: Annotated[Objective, Immutable(_FIXED)] = dataclasses.field(default_factory=Objective)
    """The metric that ranks succeeded trials, and whether lower or higher wins."""
    max_trials: Annotated[int, Minimum(1), Maximum(500)] = 10
    """Trials to run at most (grid search: fewer when the grid is smaller)."""
    parallel_trials: Annotated[int, Minimum(1), Maximum(500)] = 2
    """Trials not yet finished at any time, at most (waiting for quota counts as not finished)."""
    max_failed_trials: Annotated[int, Minimum(0), Maximum(500)] | None = None
    """The sweep fails once more trials than this have failed (its unfinished trials are stopped).
    Absent: failures never end the sweep early; it fails only when no trial succeeds."""
    early_termination: EarlyTermination = dataclasses.field(default_factory=EarlyTermination)
    """Prune trials that trail the others (`medianStop`, `asha`)."""
    promote_best: bool = False
    """When the sweep succeeds, serve the best trial: its `spec.serving.enabled` is set to true
    (with the template's other serving settings), so exactly one trial is served."""

    @classmethod
    def from_dict(cls, data: Any, path: str = "spec") -> FineTuneSweepSpec:
        """The typed spec of `body["spec"]`, defaults applied; ValidationError names every bad field."""
        return apischema.parse(cls, data, path)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (camelCase keys); `from_dict` reads it back unchanged."""
        result: dict[str, Any] = apischema.to_dict(self)
        return result


# --- status ------------------------------------------------------------------------------------

ParameterValues = Annotated[dict[str, float], MaxProperties(16)]
"""A trial's parameter values by name."""


class Trial(TypedDict, total=False):
    """One trial: a child FineTuneJob."""

    name: Annotated[str, MaxLength(63)]
    """The trial's FineTuneJob (`<sweep>-t<index>`)."""
    index: Annotated[int, Minimum(0)]
    """Trial number, from 0; its parameters are a function of the spec and this number."""
    parameters: ParameterValues
    """The values this trial uses."""
    state: TrialState
    """Pending (created, not training yet: validating, queued or waiting for quota), Running,
    Succeeded, Failed, Pruned (ended by early termination) or Stopped (suspended after the sweep
    failed)."""
    objective: float
    """The objective metric's value (succeeded trials that report it)."""
    step: Annotated[int, Minimum(0)]
    """Optimizer steps the trial has done."""
    valLoss: float
    """The trial's latest validation loss."""
    message: Annotated[str, MaxLength(1024)]
    """Why the trial failed, was stopped or pruned."""
    duration: Annotated[int, Minimum(0)]
    """Seconds from the trial's creation to its end (finished trials)."""


class BestTrial(TypedDict, total=False):
    """The succeeded trial with the best objective so far."""

    name: Annotated[str, MaxLength(63)]
    """Its FineTuneJob."""
    index: Annotated[int, Minimum(0)]
    """Its trial number."""
    parameters: ParameterValues
    """Its parameter values."""
    objective: float
    """Its objective value."""


class TrialCounts(TypedDict, total=False):
    """Trials by state."""

    total: Annotated[int, Minimum(0)]
    """Trials the sweep will run: maxTrials, or the grid's size when smaller."""
    created: Annotated[int, Minimum(0)]
    """Trials created so far."""
    pending: Annotated[int, Minimum(0)]
    """Created, not training yet."""
    running: Annotated[int, Minimum(0)]
    """Training."""
    succeeded: Annotated[int, Minimum(0)]
    """Finished with a model."""
    failed: Annotated[int, Minimum(0)]
    """Finished without a model."""
    stopped: Annotated[int, Minimum(0)]
    """Suspended after the sweep failed."""
    pruned: Annotated[int, Minimum(0)]
    """Ended early by pruning."""
    completed: Annotated[int, Minimum(0)]
    """Succeeded, failed, stopped or pruned."""


class FineTuneSweepStatus(TypedDict, total=False):
    """FineTuneSweepStatus is the observed state of the sweep, written by the operator only."""

    phase: SweepPhase
    """One word for `kubectl get`, derived from the conditions: Pending, Running, Succeeded or
    Failed."""
    conditions: Annotated[list[models.Condition], MaxItems(16), ListType("map", ("type",))]
    """Running, Succeeded and Failed, per the Kubernetes API conventions."""
    observedGeneration: Annotated[int, Minimum(0)]
    """The spec generation the status reflects."""
    trials: Annotated[list[Trial], MaxItems(500), ListType("atomic")]
    """Every created trial, by index."""
    bestTrial: BestTrial
    """The best succeeded trial so far."""
    counts: TrialCounts
    """Trials by state."""
    objectiveMetric: Annotated[str, MaxLength(64)]
    """The metric `bestTrial.objective` and each trial's `objective` are (from `spec.objective`)."""
    goal: Goal
    """Whether lower (`minimize`) or higher (`maximize`) objective values win."""
    study: Study
    """The search and pruning state (Optuna's study as an event log)."""


class StudyEvent(TypedDict, total=False):
    """One step of the search, in order: a trial asked for, an intermediate value reported, a trial told."""

    event: Literal["ask", "report", "tell"]
    """`ask`: the trial was asked for (before it was created); `report`: one validation value;
    `tell`: the trial ended."""
    trial: Annotated[int, Minimum(0)]
    """The trial index."""
    parameters: ParameterValues
    """ask: the values the trial got."""
    step: Annotated[int, Minimum(0)]
    """report: the optimizer step of the validation."""
    value: float
    """report: the intermediate value; tell Complete: the objective."""
    state: Literal["Complete", "Pruned", "Failed"]
    """tell: how the trial ended."""


class Study(TypedDict, total=False):
    """The search's state: replaying `events` into a fresh Optuna study with the seeded sampler gives the
    study an uninterrupted operator would have (so a restart continues the same search)."""

    intermediateMetric: Annotated[str, MaxLength(64)]
    """The validation metric reported during training that pruning compares (`report` values)."""
    events: Annotated[list[StudyEvent], MaxItems(20000), ListType("atomic")]
    """Every ask, report and tell, in order."""


def status_from_dict(data: Any, path: str = "status") -> FineTuneSweepStatus:
    """The status of `body["status"]`, checked against the schema; ValidationError names every bad field."""
    return apischema.parse(FineTuneSweepStatus, data, path)
