"""The FineTuneSweep's behaviour as pure functions: trial parameters, trial manifests, and one decision.

- `trial_count(spec)` and `trial_parameters(spec, index)`: what trial `index`
  tries under grid and random search. A pure function of the spec and the
  index (grid: a mixed-radix digit per parameter; random: a SHA-256 of seed,
  index and parameter name as the uniform draw), so an operator restart never
  changes or repeats a trial. TPE and CMA-ES trials come from the Optuna study
  (`sweep_study`), which also prunes trials for every algorithm.
- `trial_manifest(sweep, index)`: the child FineTuneJob (deterministic name
  `<sweep>-t<index>`, labels, controller owner reference, the template with the
  trial's values, serving off).
- `observe_trial(child)`: a child FineTuneJob's state, objective, step and
  learning curve, read from its status.
- `decide(sweep, children)`: level-based reconcile. From the sweep, its study
  log and the children that exist now: what the study learns (reports and
  tells), which trials to prune, which to create next (at most
  `parallelTrials` unfinished), which to stop (every unfinished one once the
  sweep failed), which to serve (`promoteBest`), and the sweep's status (with
  the study log, which must be written before the trials are created).

No kopf, no kubernetes client: `sweep_handlers` observes and carries out.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final

from kubetune.api import finetunejob as models, schema as apischema
from kubetune.operator import conditions, names
from kubetune.operator.sweeps import models as sweep_models, study as sweep_study
from kubetune.operator.sweeps.models import FineTuneSweepSpec, SearchParameter

Body = dict[str, Any]
Value = int | float

API_VERSION: Final = f"{sweep_models.GROUP}/{sweep_models.VERSION}"
LABEL_SWEEP: Final = "kubetune.io/sweep"
"""On every trial: the name of its sweep (what the operator selects trials by)."""
LABEL_TRIAL: Final = "kubetune.io/trial"
"""On every trial: its index."""
ANNOTATION_STOPPED: Final = "kubetune.io/stopped-by-sweep"
"""On a trial the sweep suspended: why (for humans; the suspension itself is `spec.suspend`)."""
ANNOTATION_PRUNED: Final = "kubetune.io/pruned-by-sweep"
"""On a trial the sweep pruned: why; the FineTuneJob operator then deletes its trainer Job and ends it
(`Failed=True, Succeeded=False, reason Pruned`). The same key as `reconcile.ANNOTATION_PRUNED`."""

SIGNIFICANT_DIGITS: Final = 6
"""Real-valued parameters are rounded to this many significant digits: readable manifests, and the
same number whichever machine computes it."""

MAXIMIZED_METRICS: Final = frozenset({"valAccuracy", "valF1", "testTokenAccuracy", "testAccuracy", "testPrecision",
                                      "testRecall", "testF1"})
"""Objective metrics where higher is better; every other metric (losses, perplexities) is minimised."""

OBJECTIVE_PATHS: Final[Mapping[str, tuple[str, ...]]] = {
    "valLoss": ("metrics", "valLoss"),
    "valPerplexity": ("metrics", "valPerplexity"),
    "trainLoss": ("metrics", "trainLoss"),
    "valAccuracy": ("metrics", "valAccuracy"),
    "valF1": ("metrics", "valF1"),
    "bestValLoss": ("metrics", "bestCheckpoint", "valLoss"),
    "testLoss": ("results", "loss"),
    "testPerplexity": ("results", "perplexity"),
    "testTokenAccuracy": ("results", "tokenAccuracy"),
    "testAccuracy": ("results", "accuracy"),
    "testPrecision": ("results", "precision"),
    "testRecall": ("results", "recall"),
    "testF1": ("results", "f1"),
}
"""Where each objective metric is in a FineTuneJob's status."""

INTERMEDIATE_METRICS: Final[Mapping[str, str]] = {
    "valLoss": "valLoss", "bestValLoss": "valLoss", "trainLoss": "valLoss", "testLoss": "valLoss",
    "valPerplexity": "valPerplexity", "testPerplexity": "valPerplexity",
    "testTokenAccuracy": "valTokenAccuracy", "valAccuracy": "valAccuracy", "testAccuracy": "valAccuracy",
    "valF1": "valF1", "testF1": "valF1", "testPrecision": "valF1", "testRecall": "valF1",
}
"""The figure of each validation during training that pruning compares, per objective metric: the
objective itself or its validation counterpart, better in the same direction."""

FINISHED_STATES: Final = frozenset({"Succeeded", "Failed", "Stopped", "Pruned"})

# Reasons of the sweep's conditions (CamelCase, per the API conventions).
TRIALS_RUNNING: Final = "TrialsRunning"
WAITING_FOR_TRIALS: Final = "WaitingForTrials"
ALL_TRIALS_DONE: Final = "AllTrialsDone"
NOT_FINISHED: Final = "NotFinished"
TOO_MANY_FAILED_TRIALS: Final = "TooManyFailedTrials"
NO_TRIAL_SUCCEEDED: Final = "NoTrialSucceeded"
INVALID_SPEC: Final = "InvalidSpec"
SWEEP_FINISHED: Final = "SweepFinished"


class SweepSpecError(ValueError):
    """The spec cannot produce valid trials; `problems` names each field ("spec.parameters[0]: …")."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# --- the search space ---------------------------------------------------------------------------


def is_integer_parameter(parameter: SearchParameter) -> bool:
    return parameter.name in sweep_models.INTEGER_PARAMETERS


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _int_values(parameter: SearchParameter) -> list[int]:
    assert parameter.min is not None and parameter.max is not None
    return list(range(int(parameter.min), int(parameter.max) + 1, parameter.step or 1))


def grid_values(parameter: SearchParameter, points: int) -> list[Value]:
    """The values grid search tries for one parameter, in order."""
    if parameter.type == "categorical":
        assert parameter.values is not None
        return [_as_value(parameter, v) for v in parameter.values]
    if parameter.type == "int":
        return list(_int_values(parameter))
    assert parameter.min is not None and parameter.max is not None
    low, high = parameter.min, parameter.max
    if parameter.type == "logUniform":
        low, high = math.log(low), math.log(high)
    spaced = [low + (high - low) * i / (points - 1) for i in range(points)]
    if parameter.type == "logUniform":
        spaced = [math.exp(v) for v in spaced]
    return [_round(v) for v in spaced]


def _as_value(parameter: SearchParameter, value: float) -> Value:
    return int(value) if is_integer_parameter(parameter) else value


def _uniform_draw(seed: int, index: int, name: str) -> float:
    """A number in [0, 1) that depends only on (seed, trial index, parameter name)."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def random_value(parameter: SearchParameter, seed: int, index: int) -> Value:
    """Trial `index`'s value of one parameter under random search."""
    u = _uniform_draw(seed, index, parameter.name)
    if parameter.type == "categorical":
        assert parameter.values is not None
        return _as_value(parameter, parameter.values[int(u * len(parameter.values))])
    if parameter.type == "int":
        choices = _int_values(parameter)
        return choices[int(u * len(choices))]
    assert parameter.min is not None and parameter.max is not None
    if parameter.type == "logUniform":
        low, high = math.log(parameter.min), math.log(parameter.max)
        return _round(math.exp(low + u * (high - low)))
    return _round(parameter.min + u * (parameter.max - parameter.min))


def grid_size(spec: FineTuneSweepSpec) -> int:
    return math.prod(len(grid_values(p, spec.algorithm.grid_points)) for p in spec.parameters)


def trial_count(spec: FineTuneSweepSpec) -> int:
    """How many trials the sweep runs: maxTrials, or the grid's size when smaller."""
    if spec.algorithm.type == "grid":
        return min(spec.max_trials, grid_size(spec))
    return spec.max_trials


def trial_parameters(spec: FineTuneSweepSpec, index: int) -> dict[str, Value]:
    """The parameter values of trial `index` (0-based), by parameter name, in the spec's order."""
    if spec.algorithm.type == "random":
        return {p.name: random_value(p, spec.algorithm.seed, index) for p in spec.parameters}
    grids = [grid_values(p, spec.algorithm.grid_points) for p in spec.parameters]
    digits: list[Value] = []
    rest = index
    for grid in reversed(grids):  # the last parameter varies fastest
        rest, digit = divmod(rest, len(grid))
        digits.append(grid[digit])
    return {p.name: v for p, v in zip(spec.parameters, reversed(digits))}


def apply_parameters(template: Mapping[str, Any], parameters: Mapping[str, Value]) -> Body:
    """A copy of a FineTuneJob spec with each dotted-path parameter set."""
    spec = copy.deepcopy(dict(template))
    for path, value in parameters.items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[leaf] = value
    return spec


def check_spec(spec: FineTuneSweepSpec) -> None:
    """What CEL cannot check: whole-number categorical values for integer parameters, and that
    every trial's spec is a valid FineTuneJob spec (bounds of the swept fields). SweepSpecError
    names every problem."""
    problems: list[str] = []
    for i, parameter in enumerate(spec.parameters):
        if parameter.type == "categorical" and is_integer_parameter(parameter):
            assert parameter.values is not None
            if any(not float(v).is_integer() for v in parameter.values):
                problems.append(f"spec.parameters[{i}].values: {parameter.name} is an integer; "
                                f"got {parameter.values}")
    if problems:
        raise SweepSpecError(problems)
    template = spec.template.to_dict()
    checked = range(trial_count(spec)) if spec.algorithm.type == "grid" else range(min(spec.max_trials, 50))
    for index in checked:
        values = trial_parameters(spec, index)
        try:
            models.FineTuneJobSpec.from_dict(apply_parameters(template, values), "spec.template")
        except apischema.ValidationError as error:
            raise SweepSpecError([f"trial {index} with {values}: {p}" for p in error.problems]) from None


# --- trials as FineTuneJobs ------------------------------------------------------------------------


def trial_name(sweep_name: str, index: int) -> str:
    """`<sweep>-t<index>`, shortened with a stable hash past 63 characters."""
    return names.child_name(sweep_name, f"t{index}")


def owner_reference(sweep: Body) -> Body:
    metadata = sweep["metadata"]
    return {"apiVersion": API_VERSION, "kind": sweep_models.KIND, "name": metadata["name"],
            "uid": metadata["uid"], "controller": True, "blockOwnerDeletion": True}


def trial_manifest(sweep: Body, spec: FineTuneSweepSpec, index: int,
                   parameters: Mapping[str, Value] | None = None) -> Body:
    """The FineTuneJob of trial `index`: the template with its parameters (grid/random: computed;
    TPE/CMA-ES: as the study asked), serving off."""
    metadata = sweep["metadata"]
    template = sweep["spec"]["template"]
    chosen = parameters if parameters is not None else trial_parameters(spec, index)
    child_spec = apply_parameters(template, chosen)
    child_spec["serving"] = {**(child_spec.get("serving") or {}), "enabled": False}
    child_spec["suspend"] = False
    return {
        "apiVersion": API_VERSION,
        "kind": models.KIND,
        "metadata": {
            "name": trial_name(metadata["name"], index),
            "namespace": metadata["namespace"],
            "labels": {LABEL_SWEEP: metadata["name"][:63], LABEL_TRIAL: str(index),
                       "app.kubernetes.io/part-of": "kubetune",
                       "app.kubernetes.io/managed-by": "kubetune-operator"},
            "ownerReferences": [owner_reference(sweep)],
        },
        "spec": child_spec,
    }


@dataclasses.dataclass(frozen=True)
class ObservedTrial:
    """What the sweep reads from one child FineTuneJob."""

    index: int
    name: str
    state: str
    """Pending, Running, Succeeded, Failed or Stopped."""
    status: Body
    """The child's status as the API server returned it."""
    serving_enabled: bool
    """The child's `spec.serving.enabled`."""
    message: str = ""
    """Why it failed, stopped or was pruned."""
    created: str = ""
    """The child's creationTimestamp (RFC 3339)."""

    def step(self) -> int | None:
        step = (self.status.get("progress") or {}).get("step")
        return step if isinstance(step, int) else None

    def val_loss(self) -> float | None:
        return _number((self.status.get("metrics") or {}).get("valLoss"))

    def metric(self, name: str) -> float | None:
        """An objective metric from the status (None when not reported)."""
        node: Any = self.status
        for key in OBJECTIVE_PATHS[name]:
            node = node.get(key) if isinstance(node, dict) else None
        return _number(node)

    def curve(self, metric: str = "valLoss") -> list[tuple[int, float]]:
        """(step, value) of every validation (`status.metrics.evaluations`), by step; for valLoss, the
        checkpoints' values fill in what an older operator did not record there."""
        points: dict[int, float] = {}
        if metric == "valLoss":
            for c in self.status.get("checkpoints") or []:
                if isinstance(c, dict) and isinstance(c.get("step"), int) and _number(c.get("valLoss")) is not None:
                    points[c["step"]] = float(c["valLoss"])
        for e in (self.status.get("metrics") or {}).get("evaluations") or []:
            value = _number(e.get(metric)) if isinstance(e, dict) else None
            if value is not None and isinstance(e.get("step"), int) and not isinstance(e.get("step"), bool):
                points[e["step"]] = value
        return sorted(points.items())


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def trial_index(child: Body) -> int | None:
    raw = ((child.get("metadata") or {}).get("labels") or {}).get(LABEL_TRIAL)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def observe_trial(child: Body) -> ObservedTrial | None:
    """The child's trial state; None when it carries no trial index."""
    index = trial_index(child)
    if index is None:
        return None
    status = child.get("status") or {}
    spec = child.get("spec") or {}
    found: list[conditions.Condition] = list(status.get("conditions") or [])
    message = ""
    annotations = (child.get("metadata") or {}).get("annotations") or {}
    failed = conditions.find(found, conditions.FAILED)
    failed_reason = failed.get("reason") if failed is not None else None
    if conditions.is_true(found, conditions.SUCCEEDED):
        state = "Succeeded"
    elif annotations.get(ANNOTATION_PRUNED) or failed_reason == conditions.PRUNED:
        state = "Pruned"
        message = str(annotations.get(ANNOTATION_PRUNED) or "pruned")
    elif conditions.is_true(found, conditions.FAILED):
        state = "Failed"
        failed = conditions.find(found, conditions.FAILED)
        if failed is not None:
            message = f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": ")
    elif spec.get("suspend"):
        state = "Stopped"
        message = annotations.get(ANNOTATION_STOPPED, "suspended")
    elif conditions.is_true(found, conditions.RUNNING):
        state = "Running"
    else:
        state = "Pending"
    return ObservedTrial(index=index, name=child["metadata"]["name"], state=state, status=status,
                         serving_enabled=bool((spec.get("serving") or {}).get("enabled")), message=message[:1024],
                         created=str((child.get("metadata") or {}).get("creationTimestamp") or ""))


# --- the decision -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StopTrial:
    """Suspend a trial (`spec.suspend: true`) and record why."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PruneTrial:
    """End a trial early: annotate it with why; the FineTuneJob operator deletes its trainer Job."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class SetServing:
    """Set a trial's `spec.serving` (promotion of the winner, or demotion of another)."""

    name: str
    serving: Body


@dataclasses.dataclass
class SweepDecision:
    """What reconcile wants: trials to create, stop, (un)serve, and the status to merge-patch."""

    create: list[Body] = dataclasses.field(default_factory=list)
    stop: list[StopTrial] = dataclasses.field(default_factory=list)
    prune: list[PruneTrial] = dataclasses.field(default_factory=list)
    serve: list[SetServing] = dataclasses.field(default_factory=list)
    status: Body = dataclasses.field(default_factory=dict)


def goal_of(spec: FineTuneSweepSpec) -> str:
    """`minimize` or `maximize`: as given, else by the metric's nature."""
    if spec.objective.goal:
        return spec.objective.goal
    return "maximize" if spec.objective.metric in MAXIMIZED_METRICS else "minimize"


def best_trial(trials: Iterable[ObservedTrial], metric: str, goal: str) -> ObservedTrial | None:
    """The succeeded trial with the best objective; ties go to the lower index."""
    scored = [(t.metric(metric), t) for t in trials if t.state == "Succeeded"]
    candidates = [(v, t) for v, t in scored if v is not None]
    if not candidates:
        return None
    sign = 1.0 if goal == "minimize" else -1.0
    return min(candidates, key=lambda pair: (sign * pair[0], pair[1].index))[1]


def intermediate_metric(spec: FineTuneSweepSpec) -> str:
    """The validation figure pruning compares (see INTERMEDIATE_METRICS)."""
    return INTERMEDIATE_METRICS[spec.objective.metric]


def fixed_parameters(spec: FineTuneSweepSpec) -> sweep_study.FixedValues:
    """For the study: trial i's values under grid/random search; None (the sampler chooses) otherwise."""
    if spec.algorithm.type in sweep_study.MODEL_BASED:
        return lambda index: None
    return lambda index: trial_parameters(spec, index)


def _best_so_far(values: Sequence[tuple[int, float]], goal: str) -> tuple[int, float]:
    sign = 1.0 if goal == "minimize" else -1.0
    return min(values, key=lambda pair: (sign * pair[1], pair[0]))


def learn(spec: FineTuneSweepSpec, study: sweep_study.ReplayedStudy, trials: Sequence[ObservedTrial],
          metric: str, goal: str) -> list[PruneTrial]:
    """Tell the study what the trials did since the last reconcile (new validations, outcomes) and
    prune the running trials its pruner rejects. Returns the trials to prune (also those the log
    already says were pruned but that do not carry the annotation yet: a crash in between)."""
    intermediate = intermediate_metric(spec)
    prunes: list[PruneTrial] = []
    for trial in trials:
        if trial.index not in study.trials:
            continue  # created before its ask was logged (an older operator): grid/random ask it below
        if trial.index not in study.told:
            last = study.reported.get(trial.index, -1)
            for step, value in trial.curve(intermediate):
                if step > last and study.report(trial.index, step, value) and trial.state == "Running":
                    break  # pruned at this validation: later ones are not the study's business
            if trial.state == "Succeeded":
                objective = trial.metric(metric)
                study.tell(trial.index, "Complete" if objective is not None else "Failed", objective)
            elif trial.state == "Failed":
                study.tell(trial.index, "Failed")
            elif trial.state in ("Stopped", "Pruned"):
                study.tell(trial.index, "Pruned")
            elif trial.state == "Running" and study.should_prune(trial.index):
                step = study.reported[trial.index]
                curve = sorted(study.intermediate_values(trial.index).items())
                best_step, best = _best_so_far(curve, goal)
                rule = spec.early_termination.type
                study.tell(trial.index, "Pruned")
                prunes.append(PruneTrial(trial.name, (
                    f"pruned by sweep ({rule}) at step {step}: {intermediate} {dict(curve)[step]:.6g}; "
                    f"best so far {best:.6g} at step {best_step}")))
        if study.told.get(trial.index) == "Pruned" and trial.state not in FINISHED_STATES:
            if not any(p.name == trial.name for p in prunes):
                prunes.append(PruneTrial(trial.name, f"pruned by sweep ({spec.early_termination.type})"))
    return prunes


def _duration(trial: ObservedTrial) -> int | None:
    """Seconds from creation to completion of a finished trial (None while it runs: a figure that
    changed every second would rewrite the status on every pass)."""
    started = _parse_time(trial.created)
    ended = _parse_time(str(trial.status.get("completionTime") or ""))
    if trial.state not in FINISHED_STATES or started is None or ended is None:
        return None
    return max(0, int((ended - started).total_seconds()))


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _trial_entry(trial: ObservedTrial, parameters: Mapping[str, Value], metric: str) -> Body:
    entry: Body = {"name": trial.name, "index": trial.index, "parameters": dict(parameters), "state": trial.state}
    objective = trial.metric(metric) if trial.state == "Succeeded" else None
    if objective is not None:
        entry["objective"] = objective
    step, loss = trial.step(), trial.val_loss()
    if step is not None:
        entry["step"] = step
    if loss is not None:
        entry["valLoss"] = loss
    if trial.message:
        entry["message"] = trial.message
    duration = _duration(trial)
    if duration is not None:
        entry["duration"] = duration
    return entry


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_state(trial: ObservedTrial, state: str, message: str) -> ObservedTrial:
    return dataclasses.replace(trial, state=state, message=message[:1024])


ConditionValue = tuple[conditions.Status, str, str]
SetConditions = Callable[[ConditionValue, ConditionValue, ConditionValue], None]


def decide(sweep: Body, children: Iterable[Body], now: str | None = None,
           studies: sweep_study.StudyCache | None = None) -> SweepDecision:
    """The level-based reconcile of one sweep: from the sweep (with its study log) and its child
    FineTuneJobs now, what to create, prune, stop and serve, and the status. Running it again after
    its actions changes nothing. `studies` keeps replayed studies between calls (a speed-up only: the
    answer is the same without it). The status must be written before the trials are created: it
    holds the study's `ask` of each new trial."""
    now = now or _now()
    metadata = sweep["metadata"]
    generation = int(metadata.get("generation") or 0)
    status = sweep.get("status") or {}
    before = list(status.get("conditions") or [])
    decision = SweepDecision()
    patch: Body = {"observedGeneration": generation}

    def set_conditions(running: ConditionValue, succeeded: ConditionValue, failed: ConditionValue) -> None:
        found = before
        for type_, (value, reason, message) in ((conditions.RUNNING, running), (conditions.SUCCEEDED, succeeded),
                                                (conditions.FAILED, failed)):
            found = conditions.set_condition(found, type_, value, reason, message, generation=generation, now=now)
        patch["conditions"] = found
        patch["phase"] = phase_of(found)

    try:
        spec = FineTuneSweepSpec.from_dict(sweep.get("spec") or {})
        check_spec(spec)
    except (apischema.ValidationError, SweepSpecError) as error:
        problems = error.problems
        return _invalid(decision, patch, set_conditions, problems)

    total, metric, goal = trial_count(spec), spec.objective.metric, goal_of(spec)
    events = list(((status.get("study") or {}).get("events")) or [])
    try:
        if studies is not None:
            study = studies.study(str(metadata.get("uid", "")), spec, goal, events, fixed_parameters(spec))
        else:
            study = sweep_study.replay(spec, goal, events, fixed_parameters(spec))
    except (sweep_study.StudyError, KeyError, ValueError, TypeError) as error:
        return _invalid(decision, patch, set_conditions, [f"status.study: cannot replay the study: {error}"])
    trials = sorted((t for t in map(observe_trial, children) if t is not None and t.index < total),
                    key=lambda t: t.index)
    # Trials an older operator created before the study log existed (grid/random: their values are known).
    if spec.algorithm.type not in sweep_study.MODEL_BASED and trials:
        while len(study.trials) <= trials[-1].index:
            study.ask(len(study.trials), trial_parameters(spec, len(study.trials)))
    by_name = {t.name: t for t in trials}

    # Pruning first: a pruned trial frees its place for the next one.
    for prune in learn(spec, study, trials, metric, goal):
        decision.prune.append(prune)
        by_name[prune.name] = _with_state(by_name[prune.name], "Pruned", prune.reason)
    trials = [by_name[t.name] for t in trials]
    return _decide_rest(sweep, spec, study, trials, decision, patch, set_conditions, before, now)


def _invalid(decision: SweepDecision, patch: Body, set_conditions: SetConditions, problems: list[str]) -> SweepDecision:
    """The sweep fails with InvalidSpec naming every problem; nothing is created."""
    set_conditions(("False", INVALID_SPEC, "the spec cannot produce valid trials"),
                   ("False", INVALID_SPEC, ""), ("True", INVALID_SPEC, "; ".join(problems)[:4096]))
    decision.status = patch
    return decision


def _decide_rest(sweep: Body, spec: FineTuneSweepSpec, study: sweep_study.ReplayedStudy,
                 trials: list[ObservedTrial], decision: SweepDecision, patch: Body, set_conditions: SetConditions,
                 before: list[conditions.Condition], now: str) -> SweepDecision:
    """Failures, new trials, counts, the best trial, conditions and promotion."""
    total = trial_count(spec)
    metric, goal = spec.objective.metric, goal_of(spec)
    by_name = {t.name: t for t in trials}

    failed = sum(t.state == "Failed" for t in trials)
    too_many_failures = spec.max_failed_trials is not None and failed > spec.max_failed_trials
    finished_before = conditions.is_true(before, conditions.SUCCEEDED) or conditions.is_true(before, conditions.FAILED)
    if too_many_failures:
        reason = f"sweep failed: {failed} trials failed, more than maxFailedTrials {spec.max_failed_trials}"
        for trial in trials:
            if trial.state not in FINISHED_STATES:
                decision.stop.append(StopTrial(trial.name, reason))
                by_name[trial.name] = _with_state(trial, "Stopped", reason)
        trials = [by_name[t.name] for t in trials]
    elif not finished_before:
        existing = {t.index for t in trials}
        unfinished = sum(t.state not in FINISHED_STATES for t in trials)
        for index in range(total):
            if unfinished >= spec.parallel_trials:
                break
            if index in existing:
                continue
            if index not in study.trials:
                study.ask(index, fixed_parameters(spec)(index))  # the next index: asks go in order
            manifest = trial_manifest(sweep, spec, index, study.asked_parameters[index])
            decision.create.append(manifest)
            trials.append(ObservedTrial(index=index, name=manifest["metadata"]["name"], state="Pending",
                                        status={}, serving_enabled=False))
            unfinished += 1
        trials.sort(key=lambda t: t.index)

    counts = {state.lower(): sum(t.state == state for t in trials)
              for state in ("Pending", "Running", "Succeeded", "Failed", "Stopped", "Pruned")}
    counts.update(total=total, created=len(trials),
                  completed=counts["succeeded"] + counts["failed"] + counts["stopped"] + counts["pruned"])
    best = best_trial(trials, metric, goal)
    all_done = len(trials) == total and counts["completed"] == total
    parameters = {t.index: study.asked_parameters.get(t.index) or trial_parameters(spec, t.index) for t in trials}
    patch.update(
        trials=[_trial_entry(t, parameters[t.index], metric) for t in trials],
        counts=counts, objectiveMetric=metric, goal=goal,
        study={"intermediateMetric": intermediate_metric(spec), "events": [dict(e) for e in study.events]})
    if best is not None:
        objective = best.metric(metric)
        assert objective is not None
        patch["bestTrial"] = {"name": best.name, "index": best.index,
                              "parameters": parameters[best.index], "objective": objective}

    if conditions.is_true(before, conditions.FAILED):
        patch["conditions"], patch["phase"] = before, "Failed"  # a failed sweep stays failed
    elif too_many_failures:
        set_conditions(("False", TOO_MANY_FAILED_TRIALS, "the sweep failed"), ("False", TOO_MANY_FAILED_TRIALS, ""),
                       ("True", TOO_MANY_FAILED_TRIALS,
                        f"{failed} of {total} trials failed, more than maxFailedTrials {spec.max_failed_trials}"))
    elif all_done and counts["succeeded"] == 0:
        set_conditions(("False", NO_TRIAL_SUCCEEDED, "the sweep failed"), ("False", NO_TRIAL_SUCCEEDED, ""),
                       ("True", NO_TRIAL_SUCCEEDED,
                        f"no trial succeeded ({counts['failed']} failed, {counts['pruned']} pruned, "
                        f"{counts['stopped']} stopped)"))
    elif all_done or finished_before:
        found_best = (f"best trial {best.name} with {metric} {best.metric(metric):.6g}" if best is not None
                      else f"no succeeded trial reported {metric}")
        set_conditions(("False", SWEEP_FINISHED, "every trial finished"),
                       ("True", ALL_TRIALS_DONE, f"{counts['succeeded']} of {total} trials succeeded; {found_best}"),
                       ("False", NOT_FINISHED, ""))
    else:
        active = counts["pending"] + counts["running"]
        reason = TRIALS_RUNNING if counts["running"] else WAITING_FOR_TRIALS
        set_conditions(("True", reason, f"{active} trials unfinished, {counts['completed']} of {total} done"),
                       ("False", NOT_FINISHED, ""), ("False", NOT_FINISHED, ""))

    succeeded_now = conditions.is_true(patch["conditions"], conditions.SUCCEEDED)
    decision.serve = _serving_changes(spec, sweep, trials, best if succeeded_now else None)
    decision.status = patch
    return decision


def _serving_changes(spec: FineTuneSweepSpec, sweep: Body, trials: Sequence[ObservedTrial],
                     winner: ObservedTrial | None) -> list[SetServing]:
    """With promoteBest, serve the winner (once the sweep succeeded) and nothing else."""
    if not spec.promote_best:
        return []
    template_serving = dict((sweep["spec"]["template"].get("serving") or {}))
    changes = []
    for trial in trials:
        want = winner is not None and trial.index == winner.index
        if want and not trial.serving_enabled:
            changes.append(SetServing(trial.name, {**template_serving, "enabled": True}))
        elif not want and trial.serving_enabled:
            changes.append(SetServing(trial.name, {"enabled": False}))
    return changes


def phase_of(found: list[conditions.Condition]) -> str:
    """One word for the Status column."""
    if conditions.is_true(found, conditions.SUCCEEDED):
        return "Succeeded"
    if conditions.is_true(found, conditions.FAILED):
        return "Failed"
    if conditions.is_true(found, conditions.RUNNING):
        return "Running"
    return "Pending"


def status_changed(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether merge-patching `patch` would change `current` (to skip needless writes)."""
    return any(current.get(key) != value for key, value in patch.items())
