"""The Optuna study behind TPE, CMA-ES and pruning survives an operator restart.

The claim under test: replaying the stored event log (asks, reports, tells, in
order) into a fresh study with the seeded sampler leaves it in the state of a
study that was never interrupted, so the next trials are the ones the
uninterrupted study would ask for. It is checked against a plain Optuna study
driven live, and in a fresh Python process (nothing shared in memory).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from kubetune.operator.sweeps import reconcile as sweep, study as sweep_study
from tests.unit.sweep.sweep_fixtures import condition, spec_of, sweep_body

LR = "hyperparameters.learningRate"
RANK = "method.lora.rank"
WARMUP = "hyperparameters.warmupRatio"
SPACE = [{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-2},
         {"name": RANK, "type": "int", "min": 2, "max": 32, "step": 2},
         {"name": WARMUP, "type": "uniform", "min": 0.0, "max": 0.2}]
REPO = Path(__file__).resolve().parents[3]


def loss_of(params: dict[str, Any], step: int) -> float:
    """A made-up learning curve: best near lr 3e-4, rank 16, warmup 0.05; lower with more steps."""
    distance = (math.log10(params[LR]) + 3.5) ** 2 + ((params[RANK] - 16) / 16) ** 2 + (params[WARMUP] - 0.05) ** 2
    return 1.0 + distance + 2.0 / (1 + step / 10)


def body_for(algorithm: str, **spec: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"maxTrials": 30, "parallelTrials": 2, "parameters": SPACE,
                              "algorithm": {"type": algorithm, "seed": 11, "startupTrials": 3}}
    return sweep_body(**{**fields, **spec})


def drive_live(algorithm: str, trials: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A plain Optuna study, two trials in flight, reports at steps 10 and 20: its asks and our event log."""
    spec = spec_of(body_for(algorithm))
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=11, n_startup_trials=3) if algorithm == "tpe"
        else optuna.samplers.CmaEsSampler(seed=11, n_startup_trials=3, warn_independent_sampling=False))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    space = sweep_study.distributions(spec)
    events: list[dict[str, Any]] = []
    asked: list[dict[str, Any]] = []
    running: list[tuple[int, optuna.Trial]] = []

    def ask() -> None:
        trial = study.ask(space)
        params = {k: sweep_study.rounded(v) for k, v in trial.params.items()}
        asked.append(params)
        events.append({"event": "ask", "trial": trial.number, "parameters": params})
        running.append((trial.number, trial))

    ask()
    ask()
    while len(asked) < trials:
        index, trial = running.pop(0)
        for step in (10, 20):
            value = loss_of(trial.params, step)
            trial.report(value, step)
            events.append({"event": "report", "trial": index, "step": step, "value": value})
        value = loss_of(trial.params, 30)
        study.tell(trial, value)
        events.append({"event": "tell", "trial": index, "state": "Complete", "value": value})
        ask()
    return asked, events


@pytest.mark.parametrize("algorithm", ["tpe", "cmaes"])
class TestReplayEqualsAnUninterruptedStudy:
    def test_the_replayed_study_asks_what_the_live_study_asked_next(self, algorithm: str) -> None:
        asked, events = drive_live(algorithm, trials=14)
        spec = spec_of(body_for(algorithm))
        cut = max(i for i, e in enumerate(events) if e["event"] == "ask" and e["trial"] == 9)
        replayed = sweep_study.replay(spec, "minimize", events[:cut], lambda i: None)
        assert replayed.ask(9) == asked[9]
        assert sweep_study.replay(spec, "minimize", events, lambda i: None).events == events

    def test_a_fresh_process_replaying_the_log_asks_the_same_next_trial(self, algorithm: str, tmp_path: Path) -> None:
        asked, events = drive_live(algorithm, trials=12)
        cut = max(i for i, e in enumerate(events) if e["event"] == "ask" and e["trial"] == 11)
        log = tmp_path / "events.json"
        log.write_text(json.dumps({"spec": body_for(algorithm)["spec"], "events": events[:cut]}))
        program = (
            "import json, sys\n"
            "from kubetune.operator.sweeps import study as sweep_study\n"
            "from kubetune.operator.sweeps.models import FineTuneSweepSpec\n"
            "data = json.load(open(sys.argv[1]))\n"
            "spec = FineTuneSweepSpec.from_dict(data['spec'])\n"
            "study = sweep_study.replay(spec, 'minimize', data['events'], lambda i: None)\n"
            "print(json.dumps(study.ask(11)))\n")
        result = subprocess.run([sys.executable, "-c", program, str(log)], capture_output=True, text=True,
                                cwd=REPO, check=True, timeout=120)
        assert json.loads(result.stdout) == asked[11]

    def test_the_model_is_used_after_the_startup_trials(self, algorithm: str) -> None:
        # Not a replay of random draws only: the seeded sampler's later asks depend on the results told.
        # (CMA-ES updates its distribution once per generation: 7 trials for 3 parameters.)
        last = 9 if algorithm == "tpe" else 19
        asked, events = drive_live(algorithm, trials=last + 1)
        spec = spec_of(body_for(algorithm))
        cut = max(i for i, e in enumerate(events) if e["event"] == "ask" and e["trial"] == last)
        other = [dict(e, value=-e["value"]) if e["event"] in ("tell", "report") else e for e in events[:cut]]
        assert sweep_study.replay(spec, "minimize", other, lambda i: None).ask(last) != asked[last]


class World:
    """Trials as the FineTuneJob operator would leave them: running trials report two validations per
    pass, then succeed with the made-up loss."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.children: dict[str, dict[str, Any]] = {}
        self.passes = 0

    def advance(self) -> None:
        for child in self.children.values():
            status = child.setdefault("status", {})
            if any(c["type"] in ("Succeeded", "Failed") and c["status"] == "True" for c in status.get("conditions", [])):
                continue
            if (child["metadata"].get("annotations") or {}).get(sweep.ANNOTATION_PRUNED):
                status["conditions"] = [condition("Failed", reason="Pruned")]
                continue
            params = {k: _get(child["spec"], k) for k in (LR, RANK, WARMUP)}
            curve = status.setdefault("metrics", {}).setdefault("evaluations", [])
            step = len(curve) * 10 + 10
            curve.append({"step": step, "valLoss": loss_of(params, step)})
            status["progress"] = {"step": step}
            status["conditions"] = [condition("Running")]
            if step >= 30:
                status["conditions"] = [condition("Succeeded")]
                status["metrics"]["valLoss"] = loss_of(params, step)

    def reconcile(self, studies: sweep_study.StudyCache | None, *, lose_creates: bool = False) -> sweep.SweepDecision:
        decision = sweep.decide(self.body, list(self.children.values()), now="2025-01-02T00:00:00Z", studies=studies)
        self.body["status"] = {**(self.body.get("status") or {}), **decision.status}  # written first
        if not lose_creates:
            for manifest in decision.create:
                self.children[manifest["metadata"]["name"]] = manifest
        for prune in decision.prune:
            self.children[prune.name]["metadata"].setdefault("annotations", {})[sweep.ANNOTATION_PRUNED] = prune.reason
        self.advance()
        self.passes += 1
        return decision

    def parameters(self) -> list[dict[str, Any]]:
        by_index = sorted(self.children.values(), key=lambda c: int(c["metadata"]["labels"][sweep.LABEL_TRIAL]))
        return [{k: _get(c["spec"], k) for k in (LR, RANK, WARMUP)} for c in by_index]


def _get(spec: dict[str, Any], path: str) -> Any:
    node: Any = spec
    for key in path.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("algorithm", ["tpe", "cmaes"])
class TestOperatorRestart:
    def run(self, algorithm: str, restart_at: set[int], lose_creates_at: set[int] = frozenset()) -> World:  # type: ignore[assignment]
        world = World(body_for(algorithm, maxTrials=10, earlyTermination={"type": "asha", "minResource": 10,
                                                                          "reductionFactor": 2}))
        studies = sweep_study.StudyCache()
        for n in range(40):
            if n in restart_at:
                studies = sweep_study.StudyCache()  # a new operator process: nothing in memory
            world.reconcile(studies, lose_creates=n in lose_creates_at)
        return world

    def test_restarts_mid_sweep_give_the_trials_an_uninterrupted_operator_creates(self, algorithm: str) -> None:
        uninterrupted = self.run(algorithm, restart_at=set())
        restarted = self.run(algorithm, restart_at={3, 7, 8, 12, 20})
        assert len(uninterrupted.parameters()) == 10
        assert restarted.parameters() == uninterrupted.parameters()
        assert restarted.body["status"]["study"] == uninterrupted.body["status"]["study"]
        assert restarted.body["status"]["counts"]["pruned"] > 0, "ASHA pruned some trials on the way"

    def test_a_crash_between_storing_the_ask_and_creating_the_trial_creates_the_same_trial(self, algorithm: str) -> None:
        uninterrupted = self.run(algorithm, restart_at=set())
        crashed = self.run(algorithm, restart_at={5, 6}, lose_creates_at={5})
        assert crashed.parameters() == uninterrupted.parameters()


class TestGridAndRandomKeepTheirTrials:
    def test_random_search_with_pruning_still_creates_the_pure_draws(self) -> None:
        body = sweep_body(maxTrials=4, parallelTrials=4, parameters=SPACE, algorithm={"type": "random", "seed": 3},
                          earlyTermination={"type": "asha", "minResource": 10})
        decision = sweep.decide(body, [], now="2025-01-02T00:00:00Z")
        spec = spec_of(body)
        assert [m["spec"]["hyperparameters"]["learningRate"] for m in decision.create] == [
            sweep.trial_parameters(spec, i)[LR] for i in range(4)]


class TestAReplayThatDoesNotFit:
    def test_a_log_from_another_space_fails_the_sweep_naming_the_study(self) -> None:
        body = body_for("tpe")
        body["status"] = {"study": {"events": [{"event": "report", "trial": 0, "step": 10, "value": 1.0}]}}
        decision = sweep.decide(body, [], now="2025-01-02T00:00:00Z")
        failed = next(c for c in decision.status["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and "status.study: cannot replay the study" in failed["message"]
        assert decision.create == []


def test_the_operator_loads_optuna_with_its_first_study_not_at_start() -> None:
    """Optuna and numpy are ~16 MiB of resident memory that an operator running no sweep does not need."""
    program = (
        "import sys\n"
        "import kubetune.operator.__main__\n"
        "from kubetune.operator.jobs import handlers\n"
        "from kubetune.operator.sweeps import handlers as sweep_handlers, study\n"
        "from kubetune.operator.sweeps.models import FineTuneSweepSpec\n"
        "from tests.unit.sweep.sweep_fixtures import sweep_body\n"
        "assert 'optuna' not in sys.modules and 'numpy' not in sys.modules, 'loaded at import'\n"
        "spec = FineTuneSweepSpec.from_dict(sweep_body(algorithm={'type': 'tpe', 'seed': 1})['spec'])\n"
        "study.new_study(spec, 'minimize').ask(0)\n"
        "assert 'optuna' in sys.modules\n")
    subprocess.run([sys.executable, "-c", program], cwd=REPO, check=True, timeout=120)
