"""Which parameters each trial tries: grid and seeded random search, as pure functions of spec and index."""

from __future__ import annotations

import math

import pytest

from kubetune.operator.sweeps import reconcile as sweep
from tests.unit.sweep.sweep_fixtures import sweep_body, spec_of

LR = "hyperparameters.learningRate"
RANK = "method.lora.rank"
EPOCHS = "hyperparameters.epochs"


def all_trials(body: dict[str, object]) -> list[dict[str, sweep.Value]]:
    spec = spec_of(body)  # type: ignore[arg-type]
    return [sweep.trial_parameters(spec, i) for i in range(sweep.trial_count(spec))]


class TestGridSearch:
    def test_every_combination_once_with_the_last_parameter_varying_fastest(self) -> None:
        body = sweep_body(maxTrials=100, parameters=[
            {"name": LR, "type": "categorical", "values": [1e-4, 1e-3]},
            {"name": RANK, "type": "int", "min": 4, "max": 16, "step": 4}])
        assert all_trials(body) == [
            {LR: 1e-4, RANK: 4}, {LR: 1e-4, RANK: 8}, {LR: 1e-4, RANK: 12}, {LR: 1e-4, RANK: 16},
            {LR: 1e-3, RANK: 4}, {LR: 1e-3, RANK: 8}, {LR: 1e-3, RANK: 12}, {LR: 1e-3, RANK: 16}]

    def test_log_uniform_points_are_evenly_spaced_in_log_space_ends_included(self) -> None:
        body = sweep_body(maxTrials=10, algorithm={"type": "grid", "gridPoints": 3},
                          parameters=[{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-3}])
        assert all_trials(body) == [{LR: 1e-5}, {LR: 1e-4}, {LR: 1e-3}]

    def test_uniform_points_are_evenly_spaced(self) -> None:
        body = sweep_body(maxTrials=10, algorithm={"type": "grid", "gridPoints": 5},
                          parameters=[{"name": "hyperparameters.warmupRatio", "type": "uniform", "min": 0, "max": 0.2}])
        assert [t["hyperparameters.warmupRatio"] for t in all_trials(body)] == [0.0, 0.05, 0.1, 0.15, 0.2]

    def test_max_trials_caps_the_grid(self) -> None:
        body = sweep_body(maxTrials=3)  # the fixture's grid has 4 learning rates
        assert all_trials(body) == [{LR: 1e-4}, {LR: 3e-4}, {LR: 1e-3}]

    def test_integer_categorical_values_stay_integers(self) -> None:
        body = sweep_body(parameters=[{"name": EPOCHS, "type": "categorical", "values": [1, 2]}])
        values = [t[EPOCHS] for t in all_trials(body)]
        assert values == [1, 2] and all(isinstance(v, int) for v in values)


class TestRandomSearch:
    SPACE = [{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-2},
             {"name": RANK, "type": "int", "min": 2, "max": 64, "step": 2},
             {"name": "method.lora.dropout", "type": "uniform", "min": 0.0, "max": 0.3},
             {"name": "hyperparameters.batchSize", "type": "categorical", "values": [4, 8, 16]}]

    def body(self, seed: int, trials: int = 20) -> dict[str, object]:
        return sweep_body(maxTrials=trials, algorithm={"type": "random", "seed": seed}, parameters=self.SPACE)

    def test_the_same_seed_gives_the_same_trials(self) -> None:
        assert all_trials(self.body(7)) == all_trials(self.body(7))

    def test_another_seed_gives_other_trials(self) -> None:
        assert all_trials(self.body(7)) != all_trials(self.body(8))

    def test_a_trial_does_not_depend_on_how_many_trials_there_are(self) -> None:
        assert all_trials(self.body(7, trials=5)) == all_trials(self.body(7, trials=20))[:5]

    def test_values_stay_in_their_space(self) -> None:
        trials = all_trials(self.body(3, trials=200))
        assert all(1e-5 <= t[LR] <= 1e-2 for t in trials)
        assert all(isinstance(t[RANK], int) and t[RANK] % 2 == 0 and 2 <= t[RANK] <= 64 for t in trials)
        assert all(0.0 <= t["method.lora.dropout"] <= 0.3 for t in trials)
        assert {t["hyperparameters.batchSize"] for t in trials} == {4, 8, 16}

    def test_log_uniform_spreads_evenly_over_decades(self) -> None:
        logs = [math.log10(t[LR]) for t in all_trials(self.body(11, trials=300))]
        below = sum(v < -3.5 for v in logs) / len(logs)  # half the log range lies below 10^-3.5
        assert 0.4 < below < 0.6

    def test_known_values_for_a_known_seed(self) -> None:
        # Pinned literals, so that a change to the draw (which would change running sweeps on upgrade)
        # is noticed: sha256("42/<index>/<name>")[:8] / 2^64 mapped onto each range.
        spec = spec_of(self.body(42))  # type: ignore[arg-type]
        assert sweep.trial_parameters(spec, 0) == {LR: 1.96681e-05, RANK: 62, "method.lora.dropout": 0.250535,
                                                   "hyperparameters.batchSize": 4}
        assert sweep.trial_parameters(spec, 1) == {LR: 0.00132124, RANK: 34, "method.lora.dropout": 0.059644,
                                                   "hyperparameters.batchSize": 4}


class TestSpecChecks:
    def test_integer_parameters_need_whole_categorical_values(self) -> None:
        body = sweep_body(parameters=[{"name": EPOCHS, "type": "categorical", "values": [1, 2.5]}])
        with pytest.raises(sweep.SweepSpecError, match=r"spec.parameters\[0\].values: hyperparameters.epochs"):
            sweep.check_spec(spec_of(body))

    def test_a_value_outside_the_finetunejob_bounds_names_the_trial_and_field(self) -> None:
        body = sweep_body(parameters=[{"name": LR, "type": "categorical", "values": [1e-3, 2.0]}])
        with pytest.raises(sweep.SweepSpecError) as raised:
            sweep.check_spec(spec_of(body))
        assert "trial 1" in str(raised.value) and "spec.template.hyperparameters.learningRate" in str(raised.value)

    def test_a_valid_space_passes(self) -> None:
        sweep.check_spec(spec_of(sweep_body()))
