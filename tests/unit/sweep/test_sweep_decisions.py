"""The sweep's reconcile decision: what to create, stop and serve, and the status, from what exists now."""

from __future__ import annotations

from typing import Any

from kubetune.operator.sweeps import reconcile as sweep
from tests.unit.sweep.sweep_fixtures import sweep_body, trial

LR = "hyperparameters.learningRate"


def decide(body: dict[str, Any], *children: dict[str, Any]) -> sweep.SweepDecision:
    return sweep.decide(body, list(children), now="2025-01-02T00:00:00Z")


def condition(decision: sweep.SweepDecision, type_: str) -> dict[str, Any]:
    return next(c for c in decision.status["conditions"] if c["type"] == type_)


def created_names(decision: sweep.SweepDecision) -> list[str]:
    return [m["metadata"]["name"] for m in decision.create]


class TestCreatingTrials:
    def test_a_new_sweep_starts_parallel_trials(self) -> None:
        decision = decide(sweep_body())
        assert created_names(decision) == ["lr-t0", "lr-t1"]
        assert decision.status["counts"] == {"total": 4, "created": 2, "pending": 2, "running": 0, "succeeded": 0,
                                             "failed": 0, "stopped": 0, "pruned": 0, "completed": 0}
        assert condition(decision, "Running")["reason"] == sweep.WAITING_FOR_TRIALS

    def test_a_trial_is_the_template_with_its_parameters_owned_and_labelled(self) -> None:
        body = sweep_body()
        manifest = decide(body).create[1]
        assert manifest["kind"] == "FineTuneJob" and manifest["metadata"]["namespace"] == "team"
        assert manifest["metadata"]["labels"]["kubetune.io/sweep"] == "lr"
        assert manifest["metadata"]["labels"]["kubetune.io/trial"] == "1"
        assert manifest["metadata"]["ownerReferences"] == [{
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "name": "lr", "uid": "uid-sweep",
            "controller": True, "blockOwnerDeletion": True}]
        assert manifest["spec"]["hyperparameters"] == {"learningRate": 3e-4}
        assert manifest["spec"]["serving"] == {"enabled": False, "replicas": 2}, "trials never serve on their own"
        assert manifest["spec"]["model"] == body["spec"]["template"]["model"]

    def test_unfinished_trials_hold_their_places_including_those_waiting_for_quota(self) -> None:
        body = sweep_body()
        assert created_names(decide(body, trial(body, 0, "Running"), trial(body, 1, "QuotaExceeded"))) == []

    def test_a_finished_trial_frees_its_place_for_the_next_index(self) -> None:
        body = sweep_body()
        decision = decide(body, trial(body, 0, "Succeeded", val_loss=2.0), trial(body, 1, "Running"))
        assert created_names(decision) == ["lr-t2"]

    def test_a_missing_lower_index_is_created_first(self) -> None:
        body = sweep_body()
        assert created_names(decide(body, trial(body, 1, "Failed"))) == ["lr-t0", "lr-t2"]

    def test_nothing_beyond_the_total(self) -> None:
        body = sweep_body()
        children = [trial(body, i, "Succeeded", val_loss=1.0) for i in range(3)] + [trial(body, 3, "Running")]
        assert created_names(decide(body, *children)) == []

    def test_long_sweep_names_give_trial_names_within_63_characters(self) -> None:
        body = sweep_body(name="a" * 100)
        names = created_names(decide(body))
        assert all(len(n) <= 63 and n.endswith(f"-t{i}") for i, n in enumerate(names))
        assert names[0] != names[1]


class TestBestTrial:
    def test_lowest_validation_loss_wins_when_minimizing(self) -> None:
        body = sweep_body()
        decision = decide(body, trial(body, 0, "Succeeded", val_loss=2.5), trial(body, 1, "Succeeded", val_loss=1.5),
                          trial(body, 2, "Succeeded", val_loss=1.9), trial(body, 3, "Running", val_loss=0.1))
        assert decision.status["bestTrial"] == {"name": "lr-t1", "index": 1, "parameters": {LR: 3e-4},
                                                "objective": 1.5}

    def test_highest_f1_wins_for_a_maximized_metric(self) -> None:
        body = sweep_body(objective={"metric": "testF1"})
        decision = decide(body, trial(body, 0, "Succeeded", results={"f1": 0.7}),
                          trial(body, 1, "Succeeded", results={"f1": 0.9}), trial(body, 2, "Succeeded", results={}))
        assert decision.status["bestTrial"]["name"] == "lr-t1"
        assert decision.status["goal"] == "maximize"
        assert [t.get("objective") for t in decision.status["trials"][:3]] == [0.7, 0.9, None]

    def test_an_explicit_goal_overrides_the_metrics_nature(self) -> None:
        body = sweep_body(objective={"metric": "valLoss", "goal": "maximize"})
        decision = decide(body, trial(body, 0, "Succeeded", val_loss=1.0), trial(body, 1, "Succeeded", val_loss=3.0))
        assert decision.status["bestTrial"]["name"] == "lr-t1"

    def test_ties_go_to_the_lower_index(self) -> None:
        body = sweep_body()
        decision = decide(body, trial(body, 1, "Succeeded", val_loss=1.0), trial(body, 0, "Succeeded", val_loss=1.0))
        assert decision.status["bestTrial"]["index"] == 0

    def test_failed_and_stopped_trials_never_win(self) -> None:
        body = sweep_body()
        decision = decide(body, trial(body, 0, "Failed", val_loss=0.1), trial(body, 1, "Stopped", val_loss=0.2))
        assert "bestTrial" not in decision.status


class TestOutcome:
    def test_succeeded_when_every_trial_is_done_and_one_succeeded(self) -> None:
        body = sweep_body()
        decision = decide(body, trial(body, 0, "Failed"), trial(body, 1, "Succeeded", val_loss=1.2),
                          trial(body, 2, "Stopped"), trial(body, 3, "Succeeded", val_loss=1.1))
        assert condition(decision, "Succeeded")["status"] == "True"
        assert "best trial lr-t3" in condition(decision, "Succeeded")["message"]
        assert condition(decision, "Running")["status"] == "False"
        assert decision.status["phase"] == "Succeeded" and decision.status["counts"]["completed"] == 4

    def test_failed_when_every_trial_is_done_and_none_succeeded(self) -> None:
        body = sweep_body()
        decision = decide(body, *[trial(body, i, "Failed") for i in range(4)])
        assert condition(decision, "Failed")["reason"] == sweep.NO_TRIAL_SUCCEEDED

    def test_more_failures_than_allowed_fail_the_sweep_and_stop_unfinished_trials(self) -> None:
        body = sweep_body(maxFailedTrials=1, parallelTrials=4)
        decision = decide(body, trial(body, 0, "Failed"), trial(body, 1, "Failed"), trial(body, 2, "Running"))
        assert condition(decision, "Failed")["status"] == "True"
        assert condition(decision, "Failed")["reason"] == sweep.TOO_MANY_FAILED_TRIALS
        assert [s.name for s in decision.stop] == ["lr-t2"]
        assert created_names(decision) == [], "a failed sweep starts nothing"
        assert decision.status["counts"]["failed"] == 2 and decision.status["counts"]["stopped"] == 1

    def test_failures_up_to_the_limit_are_counted_and_the_sweep_goes_on(self) -> None:
        body = sweep_body(maxFailedTrials=1)
        decision = decide(body, trial(body, 0, "Failed"), trial(body, 1, "Running"))
        assert condition(decision, "Failed")["status"] == "False"
        assert decision.status["counts"]["failed"] == 1 and created_names(decision) == ["lr-t2"]

    def test_a_failed_sweep_stays_failed(self) -> None:
        body = sweep_body(maxFailedTrials=0)
        failed = decide(body, trial(body, 0, "Failed"))
        body["status"] = failed.status
        body["spec"]["maxFailedTrials"] = 5
        again = decide(body, trial(body, 0, "Failed"), trial(body, 1, "Stopped"))
        assert again.status["phase"] == "Failed" and again.create == []

    def test_running_again_after_the_actions_changes_nothing(self) -> None:
        body = sweep_body()
        first = decide(body)
        body["status"] = first.status
        children = [{**m, "metadata": {**m["metadata"], "uid": "x"}, "status": {}} for m in first.create]
        second = decide(body, *children)
        assert second.create == [] and second.stop == [] and second.serve == []
        assert not sweep.status_changed(body["status"], second.status)

    def test_an_invalid_space_fails_the_sweep_naming_the_problem(self) -> None:
        body = sweep_body(parameters=[{"name": LR, "type": "categorical", "values": [5.0]}])
        decision = decide(body)
        assert decision.create == []
        assert condition(decision, "Failed")["reason"] == sweep.INVALID_SPEC
        assert "learningRate" in condition(decision, "Failed")["message"]


def losses(*points: tuple[int, float]) -> list[dict[str, Any]]:
    return [{"step": step, "valLoss": value} for step, value in points]


class TestMedianPruning:
    """medianStop is Optuna's MedianPruner, fed by every validation in `status.metrics.evaluations`."""

    def body(self, **rule: Any) -> dict[str, Any]:
        return sweep_body(parallelTrials=4, maxTrials=4,
                          earlyTermination={"type": "medianStop", "startAfterTrials": 2, **rule})

    def completed(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return [trial(body, 0, "Succeeded", val_loss=1.0, curve=losses((10, 2.0), (20, 1.5), (30, 1.0))),
                trial(body, 1, "Succeeded", val_loss=1.2, curve=losses((10, 2.2), (20, 1.7), (30, 1.2)))]

    def test_a_trial_worse_than_the_median_at_its_step_is_pruned(self) -> None:
        body = self.body()
        decision = decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((10, 2.05), (20, 1.9))))
        assert [p.name for p in decision.prune] == ["lr-t2"] and decision.stop == []
        reason = decision.prune[0].reason
        assert reason == "pruned by sweep (medianStop) at step 20: valLoss 1.9; best so far 1.9 at step 20"
        pruned = decision.status["trials"][2]
        assert pruned["state"] == "Pruned" and pruned["message"] == reason
        assert decision.status["counts"]["pruned"] == 1
        assert created_names(decision) == ["lr-t3"], "the pruned trial's place goes to the next one"
        assert {"event": "tell", "trial": 2, "state": "Pruned"} in decision.status["study"]["events"]

    def test_a_trial_better_than_the_median_runs_on(self) -> None:
        body = self.body()
        decision = decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((10, 2.05), (20, 1.55))))
        assert decision.prune == []

    def test_the_whole_curve_counts_not_only_the_checkpoints_kept_in_status(self) -> None:
        # The succeeded trials kept no checkpoints in status (only their last 5 would be there);
        # their evaluations at step 10 still decide.
        body = self.body()
        decision = decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((10, 2.6))))
        assert [p.name for p in decision.prune] == ["lr-t2"]
        assert "at step 10: valLoss 2.6" in decision.prune[0].reason

    def test_nothing_is_pruned_before_enough_trials_succeeded(self) -> None:
        body = self.body(startAfterTrials=3)
        assert decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((20, 9.0)))).prune == []

    def test_nothing_is_pruned_before_min_steps(self) -> None:
        body = self.body(minSteps=30)
        assert decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((20, 9.0)))).prune == []

    def test_no_comparison_at_a_step_the_succeeded_trials_did_not_evaluate(self) -> None:
        body = self.body()
        assert decide(body, *self.completed(body), trial(body, 2, "Running", curve=losses((5, 9.0)))).prune == []

    def test_the_objectives_validation_counterpart_is_compared_for_a_maximized_metric(self) -> None:
        body = sweep_body(parallelTrials=4, maxTrials=4, objective={"metric": "valF1"},
                          earlyTermination={"type": "medianStop", "startAfterTrials": 2})
        f1 = [{"step": 10, "valLoss": 1.0, "valF1": 0.8}]
        children = [trial(body, 0, "Succeeded", curve=f1), trial(body, 1, "Succeeded", curve=[{**f1[0], "valF1": 0.6}]),
                    trial(body, 2, "Running", curve=[{"step": 10, "valLoss": 9.0, "valF1": 0.75}]),
                    trial(body, 3, "Running", curve=[{"step": 10, "valLoss": 0.1, "valF1": 0.5}])]
        children[0]["status"]["metrics"]["valF1"], children[1]["status"]["metrics"]["valF1"] = 0.8, 0.6
        decision = decide(body, *children)
        assert [p.name for p in decision.prune] == ["lr-t3"], "lower F1 than the median 0.7 loses; loss is ignored"
        assert decision.status["study"]["intermediateMetric"] == "valF1"

    def test_off_by_default(self) -> None:
        body = sweep_body(parallelTrials=4)
        children = TestMedianPruning().completed(body) + [trial(body, 2, "Running", curve=losses((20, 9.0)))]
        assert decide(body, *children).prune == []

    def test_a_pruned_trial_is_pruned_again_until_it_carries_the_annotation(self) -> None:
        # The log says pruned (written first) but the annotation patch was lost: the next pass repeats it.
        body = self.body()
        children = [*self.completed(body), trial(body, 2, "Running", curve=losses((10, 2.5), (20, 1.9)))]
        first = decide(body, *children)
        body["status"] = first.status
        again = decide(body, *children)
        assert [p.name for p in again.prune] == ["lr-t2"]
        assert again.status["study"]["events"] == first.status["study"]["events"], "nothing new is told"


class TestAshaPruning:
    """asha is Optuna's SuccessiveHalvingPruner: at rung steps keep the best 1/reductionFactor."""

    def body(self) -> dict[str, Any]:
        return sweep_body(parallelTrials=4, maxTrials=4,
                          earlyTermination={"type": "asha", "minResource": 10, "reductionFactor": 2})

    def test_a_trial_in_the_worse_half_at_a_rung_is_pruned_the_better_half_runs_on(self) -> None:
        body = self.body()
        children = [trial(body, 0, "Running", curve=losses((10, 1.0))), trial(body, 1, "Running", curve=losses((10, 3.0)))]
        decision = decide(body, *children)
        assert [p.name for p in decision.prune] == ["lr-t1"]
        assert decision.prune[0].reason.startswith("pruned by sweep (asha) at step 10: valLoss 3")

    def test_before_the_first_rung_nothing_is_pruned(self) -> None:
        body = self.body()
        children = [trial(body, 0, "Running", curve=losses((5, 1.0))), trial(body, 1, "Running", curve=losses((5, 3.0)))]
        assert decide(body, *children).prune == []


class TestPrunedTrials:
    def test_a_trial_the_finetunejob_operator_ended_as_pruned_is_pruned_and_finished(self) -> None:
        body = sweep_body()
        child = trial(body, 0, "Running")
        child["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "Pruned", "message": "m"}]
        decision = decide(body, child)
        assert decision.status["trials"][0]["state"] == "Pruned"
        assert decision.status["counts"]["failed"] == 0, "pruning is not a failure (maxFailedTrials)"
        assert created_names(decision) == ["lr-t1", "lr-t2"], "its place goes to the next trials"


class TestPromoteBest:
    def finished(self, body: dict[str, Any], serving_on: int | None = None) -> list[dict[str, Any]]:
        losses = [1.4, 1.1, 1.3, 1.2]
        return [trial(body, i, "Succeeded", val_loss=loss, serving=(i == serving_on)) for i, loss in enumerate(losses)]

    def test_the_winner_is_served_with_the_templates_serving_settings(self) -> None:
        body = sweep_body(promoteBest=True)
        decision = decide(body, *self.finished(body))
        assert decision.serve == [sweep.SetServing("lr-t1", {"enabled": True, "replicas": 2})]

    def test_nothing_is_served_while_the_sweep_runs(self) -> None:
        body = sweep_body(promoteBest=True)
        children = self.finished(body)[:3] + [trial(body, 3, "Running")]
        assert decide(body, *children).serve == []

    def test_any_other_served_trial_is_turned_off(self) -> None:
        body = sweep_body(promoteBest=True)
        decision = decide(body, *self.finished(body, serving_on=2))
        assert sorted(decision.serve, key=lambda s: s.name) == [
            sweep.SetServing("lr-t1", {"enabled": True, "replicas": 2}), sweep.SetServing("lr-t2", {"enabled": False})]

    def test_once_served_nothing_more_changes(self) -> None:
        body = sweep_body(promoteBest=True)
        assert decide(body, *self.finished(body, serving_on=1)).serve == []

    def test_without_promote_best_serving_is_left_alone(self) -> None:
        body = sweep_body(promoteBest=False)
        assert decide(body, *self.finished(body, serving_on=2)).serve == []
