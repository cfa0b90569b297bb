"""The search and pruning engine of a FineTuneSweep: an Optuna study replayed from the sweep's event log.

Optuna (samplers TPE and CMA-ES, pruners median and successive halving) does
the statistics; this module makes it survive an operator restart. The sweep
keeps every step of its study as a short event in `status.study.events`:

- `ask`: trial *i* was asked for (with the parameters it got),
- `report`: trial *i* reported an intermediate value at a step (one validation),
- `tell`: trial *i* ended: `Complete` with its objective, `Pruned`, or `Failed`.

`replay(spec, events)` builds a fresh in-memory study with a seeded sampler
and applies the events in order. Optuna's samplers are deterministic given
their seed and the sequence of asks, reports and tells, so the replayed study
is in the same state as one that was never interrupted, and its next `ask`
gives the same parameters (tests check this for TPE and CMA-ES against one
live study). The operator writes an `ask` to the log *before* it creates the
trial, so a crash in between re-creates the same trial from the log.

Grid and random search keep their own pure draws (`sweep.trial_parameters`,
unchanged since before Optuna, so running sweeps keep their trials across an
upgrade); their trials are enqueued into the study so the pruners see them.

`StudyCache` keeps replayed studies between reconciles of a running operator
and applies only new events; it is used only when the stored log starts with
exactly the events the cached study has seen, so it never gives another answer
than a full replay.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from kubetune.operator.sweeps import models as sweep_models
from kubetune.operator.sweeps.models import FineTuneSweepSpec, SearchParameter

if TYPE_CHECKING:
    # Imported where a study is made, not with the module: Optuna (and numpy under it) is ~16 MiB of an
    # operator's resident memory, which an operator that runs no sweep does not need.
    import optuna
    from optuna.distributions import BaseDistribution

Body = dict[str, Any]
Value = int | float
Event = dict[str, Any]

log = logging.getLogger(__name__)

MODEL_BASED: Final = frozenset({"tpe", "cmaes"})
"""Algorithms whose trials depend on earlier results (Optuna samplers); grid and random do not."""

TELL_STATES: Final[Mapping[str, str]] = {"Complete": "COMPLETE", "Pruned": "PRUNED", "Failed": "FAIL"}
"""Event state -> the name of Optuna's `TrialState`."""


def distribution(parameter: SearchParameter) -> BaseDistribution:
    """The Optuna distribution of one search parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    integer = parameter.name in sweep_models.INTEGER_PARAMETERS
    if parameter.type == "categorical":
        assert parameter.values is not None
        return CategoricalDistribution([int(v) if integer else float(v) for v in parameter.values])
    assert parameter.min is not None and parameter.max is not None
    if parameter.type == "int":
        low, high, step = int(parameter.min), int(parameter.max), parameter.step or 1
        return IntDistribution(low, low + (high - low) // step * step, step=step)
    return FloatDistribution(parameter.min, parameter.max, log=parameter.type == "logUniform")


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    return {p.name: distribution(p) for p in spec.parameters}


def _sampler(spec: FineTuneSweepSpec) -> optuna.samplers.BaseSampler:
    import optuna

    algorithm = spec.algorithm
    if algorithm.type == "tpe":
        return optuna.samplers.TPESampler(seed=algorithm.seed, n_startup_trials=algorithm.startup_trials)
    if algorithm.type == "cmaes":
        # CMA-ES cannot sample categorical parameters; Optuna draws those with the seeded random sampler.
        return optuna.samplers.CmaEsSampler(seed=algorithm.seed, n_startup_trials=algorithm.startup_trials,
                                            warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=algorithm.seed)  # never samples: grid/random trials are enqueued


def _pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    import optuna

    rule = spec.early_termination
    if rule.type == "medianStop":
        return optuna.pruners.MedianPruner(n_startup_trials=rule.start_after_trials, n_warmup_steps=rule.min_steps,
                                           n_min_trials=rule.start_after_trials)
    if rule.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=rule.min_resource or "auto",
                                                      reduction_factor=rule.reduction_factor,
                                                      min_early_stopping_rate=0)
    return optuna.pruners.NopPruner()


def rounded(value: Any, significant: int = 6) -> Value:
    """A sampled value as trials carry it: ints stay ints, reals get `significant` digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, int):
        return value
    return float(f"{value:.{significant}g}")


class StudyError(RuntimeError):
    """The event log does not fit the spec (e.g. written by another spec); names the event."""


@dataclasses.dataclass
class ReplayedStudy:
    """An Optuna study in the state the event log describes, and the events it has seen."""

    spec: FineTuneSweepSpec
    study: optuna.Study
    events: list[Event] = dataclasses.field(default_factory=list)
    trials: dict[int, optuna.Trial] = dataclasses.field(default_factory=dict)
    told: dict[int, str] = dataclasses.field(default_factory=dict)
    """Trial index -> the state it was told (Complete, Pruned, Failed)."""
    reported: dict[int, int] = dataclasses.field(default_factory=dict)
    """Trial index -> the last step reported."""
    asked_parameters: dict[int, dict[str, Value]] = dataclasses.field(default_factory=dict)
    prune_verdicts: dict[int, bool] = dataclasses.field(default_factory=dict)
    """Trial index -> the pruner's answer at its latest report."""

    # --- recording (each also appends its event) -------------------------------------------------------

    def ask(self, index: int, fixed: Mapping[str, Value] | None = None) -> dict[str, Value]:
        """Ask trial `index` (the next one); `fixed`: its values (grid/random), else the sampler chooses."""
        if index != len(self.trials) or index in self.trials:
            raise StudyError(f"ask: trial {index} is not the next trial ({len(self.trials)})")
        if fixed is not None:
            self.study.enqueue_trial(dict(fixed), skip_if_exists=False)
        trial = self.study.ask(distributions(self.spec))
        self.trials[index] = trial
        parameters = {name: rounded(trial.params[name]) for name in distributions(self.spec)}
        self.asked_parameters[index] = parameters
        self.events.append({"event": "ask", "trial": index, "parameters": parameters})
        return parameters

    def report(self, index: int, step: int, value: float) -> bool:
        """Trial `index`'s intermediate value at `step` (steps only grow); returns whether the pruner
        stops the trial there. The pruner is asked at every report, as in a live Optuna study: some
        pruners (successive halving) record rung values on the trial when asked, so asking only now
        and then would give another study than the live one."""
        if index not in self.trials or index in self.told:
            raise StudyError(f"report: trial {index} is not running in the study")
        if step <= self.reported.get(index, -1) or not math.isfinite(value):
            raise StudyError(f"report: trial {index} step {step} is not after step {self.reported.get(index)}")
        self.trials[index].report(value, step)
        self.reported[index] = step
        self.events.append({"event": "report", "trial": index, "step": step, "value": value})
        self.prune_verdicts[index] = bool(self.trials[index].should_prune())
        return self.prune_verdicts[index]

    def tell(self, index: int, state: str, value: float | None = None) -> None:
        """Trial `index` ended: Complete (with `value`), Pruned or Failed."""
        if index not in self.trials or index in self.told:
            raise StudyError(f"tell: trial {index} is not running in the study")
        if state == "Complete" and (value is None or not math.isfinite(value)):
            raise StudyError(f"tell: trial {index} Complete needs a finite value")
        from optuna.trial import TrialState

        self.study.tell(self.trials[index], value if state == "Complete" else None,
                        state=TrialState[TELL_STATES[state]])
        self.told[index] = state
        event: Event = {"event": "tell", "trial": index, "state": state}
        if state == "Complete":
            event["value"] = value
        self.events.append(event)

    # --- reading ------------------------------------------------------------------------------------------

    def should_prune(self, index: int) -> bool:
        """Whether the pruner stopped running trial `index` at its latest reported step."""
        return index not in self.told and self.prune_verdicts.get(index, False)

    def intermediate_values(self, index: int) -> dict[int, float]:
        trial = self.trials.get(index)
        if trial is None:
            return {}
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        return dict(frozen.intermediate_values)


def new_study(spec: FineTuneSweepSpec, direction: str) -> ReplayedStudy:
    """An empty in-memory study: the spec's sampler (seeded) and pruner, `minimize` or `maximize`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial is noise in the operator's log
    study = optuna.create_study(direction=optuna.study.StudyDirection.MAXIMIZE if direction == "maximize"
                                else optuna.study.StudyDirection.MINIMIZE, sampler=_sampler(spec), pruner=_pruner(spec))
    return ReplayedStudy(spec=spec, study=study)


def apply_event(replayed: ReplayedStudy, event: Mapping[str, Any], fixed: Mapping[str, Value] | None) -> None:
    """Apply one stored event; `fixed` gives an `ask`'s values for grid/random search."""
    kind, index = event.get("event"), event.get("trial")
    if not isinstance(index, int):
        raise StudyError(f"event {event}: no trial index")
    if kind == "ask":
        got = replayed.ask(index, fixed)
        stored = event.get("parameters")
        if isinstance(stored, dict) and stored != got:
            # Another Optuna version samples differently: the created trial keeps its stored values.
            log.warning("replaying trial %d gave %s, the log says %s; keeping the stored values", index, got, stored)
            replayed.asked_parameters[index] = dict(stored)
            replayed.events[-1]["parameters"] = dict(stored)
    elif kind == "report":
        replayed.report(index, int(event["step"]), float(event["value"]))
    elif kind == "tell":
        value = event.get("value")
        replayed.tell(index, str(event.get("state")), float(value) if value is not None else None)
    else:
        raise StudyError(f"event {event}: unknown kind {kind!r}")


FixedValues = Callable[[Any], Mapping[str, Value] | None]
"""Trial index -> its values under grid/random search (None: the sampler chooses)."""


def replay(spec: FineTuneSweepSpec, direction: str, events: Sequence[Mapping[str, Any]],
           fixed: FixedValues) -> ReplayedStudy:
    """A fresh study with every event applied in order; `fixed(index)` gives grid/random values."""
    replayed = new_study(spec, direction)
    for event in events:
        apply_event(replayed, event, fixed(event.get("trial")) if event.get("event") == "ask" else None)
    return replayed


class StudyCache:
    """Replayed studies by sweep uid, kept between reconciles; a full replay when in doubt."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._studies: dict[str, ReplayedStudy] = {}
        self._lock = threading.Lock()

    def study(self, key: str, spec: FineTuneSweepSpec, direction: str, events: Sequence[Mapping[str, Any]],
              fixed: FixedValues) -> ReplayedStudy:
        """The study after `events`: the cached one advanced by the new events when the log extends
        what it has seen (with the same spec), else a full replay."""
        with self._lock:
            cached = self._studies.pop(key, None)
        seen = len(cached.events) if cached is not None else 0
        if (cached is not None and cached.spec == spec and cached.study.direction.name.lower() == direction
                and len(events) >= seen and list(events[:seen]) == cached.events):
            for event in events[seen:]:
                apply_event(cached, event, fixed(event.get("trial")) if event.get("event") == "ask" else None)
            result = cached
        else:
            result = replay(spec, direction, events, fixed)
        with self._lock:
            self._studies[key] = result
            while len(self._studies) > self.size:
                self._studies.pop(next(iter(self._studies)))
        return result

    def forget(self, key: str) -> None:
        with self._lock:
            self._studies.pop(key, None)
