"""FineTuneSweep on the real control plane: trials created, bounded, ranked, failed, stopped and promoted.

The whole operator runs as a real process; each trial is a real FineTuneJob
that the operator trains as far as the API server can tell: the tests play the
kubelet (pod phases, exit codes, termination messages) and the trainer
(authenticated progress reports over HTTP). The sweep reads the outcomes from
the trials' status, as it would in a cluster.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.operator.sweeps import reconcile as sweep
from kubetune.operator.sweeps.models import FineTuneSweepSpec
from tests.integration.operator.conftest import Kube, OperatorProcess, wait_for
from tests.integration.operator.test_operator_lifecycle import metric
from tests.integration.sweep.conftest import Sweeps, sweep_manifest

LR = "hyperparameters.learningRate"


class ParallelismWatch:
    """Samples the sweep's unfinished trials in the background; remembers the most seen at once."""

    def __init__(self, sweeps: Sweeps, name: str) -> None:
        self.sweeps, self.name, self.most = sweeps, name, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.most = max(self.most, len(self.sweeps.unfinished(self.name)))
            except ApiException:
                pass
            time.sleep(0.1)

    def __enter__(self) -> ParallelismWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def crds_only(crds: None) -> Iterator[None]:
    yield


def test_grid_sweep_runs_each_value_once_within_parallel_trials_and_picks_the_lowest_loss(
        sweeps: Sweeps, kube: Kube, operator: OperatorProcess, namespace: str, cluster: Any) -> None:
    created = sweeps.create(sweep_manifest("grid"))
    losses = {"grid-t0": 2.4, "grid-t1": 1.7, "grid-t2": 1.9, "grid-t3": 2.8}
    with ParallelismWatch(sweeps, "grid") as watch:
        wait_for(lambda: len(sweeps.trials("grid")) == 2, "the first two trials")
        sweeps.wait_reconciled("grid")  # the operator looked again, and must not have created more
        assert [t["metadata"]["name"] for t in sweeps.trials("grid")] == ["grid-t0", "grid-t1"]
        for name in ("grid-t0", "grid-t1", "grid-t2", "grid-t3"):
            sweeps.run(name, val_loss=losses[name])
        wait_for(lambda: sweeps.condition_is("grid", "Succeeded", "True", sweep.ALL_TRIALS_DONE), "sweep Succeeded")
    assert watch.most == 2, f"at most parallelTrials (2) unfinished at once, saw {watch.most}"

    trials = sweeps.trials("grid")
    assert [t["spec"]["hyperparameters"]["learningRate"] for t in trials] == [1e-4, 3e-4, 1e-3, 3e-3]
    for trial in trials:
        assert trial["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert trial["spec"]["serving"]["enabled"] is False
        assert trial["spec"]["model"]["source"] == "pvc://models/base/tiny-gpt2"
    status = sweeps.status("grid")
    assert status["bestTrial"] == {"name": "grid-t1", "index": 1, "parameters": {LR: 3e-4}, "objective": 1.7}
    assert [(t["name"], t["state"], t["objective"]) for t in status["trials"]] == [
        (name, "Succeeded", loss) for name, loss in losses.items()]
    assert status["counts"] == {"total": 4, "created": 4, "pending": 0, "running": 0, "succeeded": 4, "failed": 0,
                                "stopped": 0, "pruned": 0, "completed": 4}
    assert status["phase"] == "Succeeded" and status["observedGeneration"] == 1

    # kubectl shows the printer columns; the short name and the category find it.
    table = cluster.kubectl("get", "fts", "grid", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "STATUS", "BEST", "DONE", "TOTAL", "AGE"]
    assert row.split()[:5] == ["grid", "Succeeded", "1.7", "4", "4"]
    assert "finetunesweep.kubetune.io/grid" in cluster.kubectl("get", "kubetune", "-n", namespace, "-o", "name").stdout

    text = operator.metrics()
    assert metric(text, "kubetune_sweep_trials", namespace=namespace, sweep="grid", state="Succeeded") == 4
    assert metric(text, "kubetune_sweep_best_objective", namespace=namespace, sweep="grid", metric="valLoss") == 1.7

    # Deleting the sweep deletes its trials (owner references, garbage collector).
    kube.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunesweeps", "grid",
                                                propagation_policy="Foreground")
    wait_for(lambda: not sweeps.trials("grid"), "the trials to be deleted with the sweep", timeout=90)


def test_seeded_random_sweep_creates_the_trials_its_seed_defines(sweeps: Sweeps) -> None:
    parameters = [{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-2},
                  {"name": "hyperparameters.batchSize", "type": "int", "min": 2, "max": 32, "step": 2},
                  {"name": "hyperparameters.warmupRatio", "type": "uniform", "min": 0.0, "max": 0.2}]
    body = sweep_manifest("rand", parameters=parameters, algorithm={"type": "random", "seed": 1234},
                          maxTrials=3, parallelTrials=3, objective={"metric": "testF1"})
    sweeps.create(body)
    trials = wait_for(lambda: (found := sweeps.trials("rand")) and len(found) == 3 and found, "three trials")
    spec = FineTuneSweepSpec.from_dict(sweeps.get("rand")["spec"])
    seen = []
    for index, trial in enumerate(trials):
        expected = sweep.trial_parameters(spec, index)
        hyper = trial["spec"]["hyperparameters"]
        got = {LR: hyper["learningRate"], "hyperparameters.batchSize": hyper["batchSize"],
               "hyperparameters.warmupRatio": hyper["warmupRatio"]}
        assert got == expected
        assert 1e-5 <= got[LR] <= 1e-2 and got["hyperparameters.batchSize"] % 2 == 0
        seen.append(got)
    assert len({tuple(sorted(s.items())) for s in seen}) == 3, "three different parameter sets"
    other_seed = FineTuneSweepSpec.from_dict({**sweeps.get("rand")["spec"], "algorithm": {"type": "random", "seed": 1}})
    assert [sweep.trial_parameters(other_seed, i) for i in range(3)] != seen

    # The objective is maximised: the highest test F1 wins.
    for name, f1 in (("rand-t0", 0.61), ("rand-t1", 0.83), ("rand-t2", 0.72)):
        sweeps.run(name, val_loss=1.0, results={"f1": f1, "perplexity": 3.0})
    wait_for(lambda: sweeps.condition_is("rand", "Succeeded", "True"), "sweep Succeeded")
    status = sweeps.status("rand")
    assert (status["bestTrial"]["name"], status["bestTrial"]["objective"], status["goal"]) == ("rand-t1", 0.83,
                                                                                              "maximize")
    assert status["bestTrial"]["parameters"] == seen[1]


def test_failures_are_counted_and_the_sweep_fails_past_max_failed_trials(sweeps: Sweeps) -> None:
    sweeps.create(sweep_manifest("flaky", maxFailedTrials=1, parallelTrials=2))
    sweeps.run("flaky-t0", exit_code=78)
    wait_for(lambda: sweeps.status("flaky").get("counts", {}).get("failed") == 1, "one failed trial counted")
    assert sweeps.condition_is("flaky", "Failed", "False"), "one failure is within maxFailedTrials"
    wait_for(lambda: len(sweeps.trials("flaky")) == 3, "a third trial in the failed one's place")
    sweeps.start("flaky-t2")
    sweeps.run("flaky-t1", exit_code=78)
    wait_for(lambda: sweeps.condition_is("flaky", "Failed", "True", sweep.TOO_MANY_FAILED_TRIALS), "sweep Failed")
    # The still-running trial is stopped (suspended), and nothing new starts.
    wait_for(lambda: sweeps.kube.ftj(sweeps.namespace, "flaky-t2")["spec"]["suspend"] is True, "flaky-t2 suspended")
    status = sweeps.status("flaky")
    assert status["counts"]["failed"] == 2 and status["counts"]["stopped"] == 1 and status["phase"] == "Failed"
    assert [t["state"] for t in status["trials"]] == ["Failed", "Failed", "Stopped"]
    assert "PermanentError" in status["trials"][0]["message"]
    sweeps.wait_reconciled("flaky")
    assert len(sweeps.trials("flaky")) == 3


def test_median_pruning_ends_a_trial_that_trails_the_median_at_its_step(sweeps: Sweeps, kube: Kube) -> None:
    sweeps.create(sweep_manifest("median", maxTrials=3, parallelTrials=3,
                                 earlyTermination={"type": "medianStop", "startAfterTrials": 2}))
    # Eight validations each: more than the 5 checkpoints a trial keeps in status; the curve has them all.
    curves = {"median-t0": [(s, 2.0 - s / 100) for s in range(10, 90, 10)],
              "median-t1": [(s, 2.2 - s / 100) for s in range(10, 90, 10)]}
    for name, curve in curves.items():
        sweeps.start(name)
        sweeps.validate(name, curve)
        sweeps.finish(name, val_loss=curve[-1][1])
    sweeps.start("median-t2")
    seq = sweeps.validate("median-t2", [(10, 1.95)])  # better than the median 2.0 of 1.9 and 2.1: runs on
    wait_for(lambda: sweeps.study_has("median", event="report", trial=2, step=10), "the study saw step 10")
    sweeps.wait_reconciled("median")
    assert not (kube.ftj(sweeps.namespace, "median-t2")["metadata"].get("annotations") or {}).get(
        sweep.ANNOTATION_PRUNED)
    sweeps.validate("median-t2", [(20, 1.97)], first_seq=seq)  # best so far 1.95 > the median 1.9 at step 20
    wait_for(lambda: kube.condition_is(sweeps.namespace, "median-t2", "Failed", "True"), "median-t2 ended")
    trial = kube.ftj(sweeps.namespace, "median-t2")
    found = {c["type"]: c for c in trial["status"]["conditions"]}
    assert (found["Succeeded"]["status"], found["Succeeded"]["reason"]) == ("False", "Pruned")
    assert found["Failed"]["reason"] == "Pruned" and trial["status"]["phase"] == "Pruned"
    assert found["Succeeded"]["message"] == ("pruned by sweep (medianStop) at step 20: valLoss 1.97; "
                                             "best so far 1.95 at step 10")
    assert trial["spec"]["suspend"] is False, "pruned, not suspended"
    # The FineTuneJob operator deleted the trainer Job (its pods go with it).
    wait_for(lambda: kube.job(sweeps.namespace, "median-t2-train") is None, "the trainer Job deleted")
    wait_for(lambda: sweeps.condition_is("median", "Succeeded", "True"), "sweep Succeeded")
    status = sweeps.status("median")
    pruned = status["trials"][2]
    assert pruned["state"] == "Pruned" and pruned["message"].startswith("pruned by sweep (medianStop) at step 20")
    assert status["counts"]["pruned"] == 1 and status["counts"]["failed"] == 0
    assert status["bestTrial"]["name"] == "median-t0"
    reports = [e for e in status["study"]["events"] if e["event"] == "report" and e["trial"] == 0]
    assert [e["step"] for e in reports] == list(range(10, 90, 10)), "every validation of the curve"


def test_tpe_after_an_operator_restart_asks_what_an_uninterrupted_study_asks(
        sweeps: Sweeps, operator: OperatorProcess) -> None:
    parameters = [{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-2},
                  {"name": "hyperparameters.warmupRatio", "type": "uniform", "min": 0.0, "max": 0.2}]
    sweeps.create(sweep_manifest("tpe", parameters=parameters, maxTrials=5, parallelTrials=1,
                                 algorithm={"type": "tpe", "seed": 7, "startupTrials": 2}))

    def run(index: int) -> None:
        name = f"tpe-t{index}"
        lr = sweeps.wait_trial(name)["spec"]["hyperparameters"]["learningRate"]
        loss = 1.0 + abs(math.log10(lr) + 3.5)  # best near 3e-4
        sweeps.start(name)
        seq = sweeps.validate(name, [(10, loss + 0.5)])
        sweeps.validate(name, [(20, loss)], first_seq=seq)
        sweeps.finish(name, val_loss=loss)

    run(0)
    run(1)
    wait_for(lambda: len(sweeps.trials("tpe")) == 3, "the first trial TPE's model chose")
    operator.kill()  # mid-sweep: the third trial is created, nothing of it is told yet
    operator.start()
    for index in (2, 3, 4):
        run(index)
    wait_for(lambda: sweeps.condition_is("tpe", "Succeeded", "True"), "sweep Succeeded")

    # The trials are the asks of the log, and a plain Optuna study driven through the same asks,
    # reports and tells, never interrupted, asks exactly those values.
    status = sweeps.status("tpe")
    events = status["study"]["events"]
    created = [{LR: t["spec"]["hyperparameters"]["learningRate"],
                "hyperparameters.warmupRatio": t["spec"]["hyperparameters"]["warmupRatio"]} for t in sweeps.trials("tpe")]
    asks = [e["parameters"] for e in events if e["event"] == "ask"]
    assert asks == created and len(created) == 5
    live = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=7, n_startup_trials=2))
    space = {LR: optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
             "hyperparameters.warmupRatio": optuna.distributions.FloatDistribution(0.0, 0.2)}
    running: dict[int, optuna.Trial] = {}
    for event in events:
        if event["event"] == "ask":
            trial = live.ask(space)
            assert {k: float(f"{v:.6g}") for k, v in trial.params.items()} == event["parameters"]
            running[event["trial"]] = trial
        elif event["event"] == "report":
            running[event["trial"]].report(event["value"], event["step"])
        else:
            live.tell(running[event["trial"]], event.get("value"))
    assert status["bestTrial"]["objective"] == min(e["value"] for e in events if e["event"] == "tell")


def test_promote_best_serves_the_winner_and_nothing_else(sweeps: Sweeps, kube: Kube) -> None:
    body = sweep_manifest("promo", promoteBest=True, maxTrials=3, parallelTrials=3,
                          objective={"metric": "testPerplexity"})
    body["spec"]["template"]["serving"] = {"enabled": True, "replicas": 1}
    sweeps.create(body)
    for name, perplexity in (("promo-t0", 9.0), ("promo-t1", 7.5), ("promo-t2", 8.0)):
        sweeps.run(name, val_loss=2.0, results={"perplexity": perplexity})
    wait_for(lambda: sweeps.condition_is("promo", "Succeeded", "True"), "sweep Succeeded")

    def deployments() -> list[str]:
        return sorted(d.metadata.name for d in kube.apps.list_namespaced_deployment(sweeps.namespace).items)

    wait_for(lambda: deployments() == ["promo-t1-serving"], "exactly one serving Deployment, the winner's")
    winner = kube.ftj(sweeps.namespace, "promo-t1")
    assert winner["spec"]["serving"] == {"enabled": True, "replicas": 1, "runtime": "builtin",
                                         "auth": "apiKey"}
    assert [kube.ftj(sweeps.namespace, n)["spec"]["serving"]["enabled"] for n in ("promo-t0", "promo-t2")] == [
        False, False]
    sweeps.wait_reconciled("promo")
    assert deployments() == ["promo-t1-serving"]


def test_an_operator_restart_neither_repeats_nor_changes_trials(sweeps: Sweeps, operator: OperatorProcess) -> None:
    body = sweep_manifest("restart", parameters=[{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-3}],
                          algorithm={"type": "random", "seed": 5}, maxTrials=3, parallelTrials=2)
    sweeps.create(body)
    wait_for(lambda: len(sweeps.trials("restart")) == 2, "the first two trials")
    before = {t["metadata"]["name"]: (t["metadata"]["uid"], t["spec"]["hyperparameters"]["learningRate"])
              for t in sweeps.trials("restart")}
    operator.kill()
    operator.start()
    sweeps.run("restart-t0", val_loss=1.0)
    wait_for(lambda: len(sweeps.trials("restart")) == 3, "the third trial after the restart")
    after = {t["metadata"]["name"]: (t["metadata"]["uid"], t["spec"]["hyperparameters"]["learningRate"])
             for t in sweeps.trials("restart")}
    assert {name: after[name] for name in before} == before, "the same objects with the same values"
    spec = FineTuneSweepSpec.from_dict(sweeps.get("restart")["spec"])
    assert after["restart-t2"][1] == sweep.trial_parameters(spec, 2)[LR]


@pytest.mark.parametrize(("change", "message"), [
    ({"parameters": [{"name": LR, "type": "uniform", "min": 0.01, "max": 0.001}]}, "min must be below max"),
    ({"parameters": [{"name": LR, "type": "logUniform", "min": 0, "max": 0.01}]}, "logUniform needs min > 0"),
    ({"parameters": [{"name": LR, "type": "categorical", "values": [0.1]},
                     {"name": LR, "type": "categorical", "values": [0.2]}]}, "parameter names must be unique"),
    ({"parameters": [{"name": LR, "type": "uniform", "values": [0.1]}]}, "type categorical takes `values`"),
    ({"parameters": [{"name": "hyperparameters.epochs", "type": "uniform", "min": 1, "max": 3}]},
     "an integer parameter takes type int or categorical"),
    ({"parameters": [{"name": "method.lora.rank", "type": "int", "min": 4, "max": 8}]},
     "method.lora.* parameters need template.method.type lora"),
    ({"parameters": [{"name": "hyperparameters.scheduler", "type": "categorical", "values": [1]}]},
     "Unsupported value"),
    ({"maxTrials": 2, "parallelTrials": 3}, "parallelTrials must not exceed maxTrials"),
])
def test_the_api_server_rejects_a_bad_sweep_naming_the_problem(crds_only: None, kube: Kube, cluster: Any,
                                                               change: dict[str, Any], message: str) -> None:
    body = sweep_manifest("bad", **change)
    body["spec"]["template"]["method"] = {"type": "full"}
    with pytest.raises(ApiException) as raised:
        kube.custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "default", "finetunesweeps", body,
                                                    dry_run="All")
    assert raised.value.status == 422
    assert message in json.loads(raised.value.body)["message"], raised.value.body


def test_a_good_sweep_is_stored_with_its_defaults_equal_to_the_typed_models(crds_only: None, kube: Kube) -> None:
    stored = kube.custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "default", "finetunesweeps",
                                                         sweep_manifest("good"), dry_run="All")
    spec = FineTuneSweepSpec.from_dict(sweep_manifest("good")["spec"])
    assert stored["spec"] == spec.to_dict()


def test_the_example_sweep_is_accepted_and_stored_as_the_typed_model_reads_it(crds_only: None, kube: Kube) -> None:
    from pathlib import Path

    import yaml

    body = yaml.safe_load((Path(__file__).resolve().parents[3] / "examples" / "sweep-learning-rate.yaml").read_text())
    stored = kube.custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "default", "finetunesweeps",
                                                         body, dry_run="All")
    assert stored["spec"] == FineTuneSweepSpec.from_dict(body["spec"]).to_dict()
