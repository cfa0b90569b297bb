"""Credentials by reference (`spec.credentials`) and training on from an earlier job (`spec.model.fromJob`):
what reaches the pods, what the operator decides while the source job is not ready, and how a missing
Secret or an unreachable model or bucket ends validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed
from kubetune.operator.platform import policy
from kubetune.operator.platform.policy import NamespaceLimits
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]

CREDENTIALS = {
    "hub": {"secretName": "hub-token"},
    "s3": {"secretName": "bucket-keys", "sessionTokenKey": "session", "endpointKey": "endpoint",
           "regionKey": "region"},
}


def condition(decision: reconcile.Decision, type_: str) -> dict[str, Any]:
    found = conditions.find(decision.status_patch["conditions"], type_)
    assert found is not None, f"no {type_} condition"
    return dict(found)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in container["env"]}


def all_pods(job: dict[str, Any], settings: OperatorSettings, limits: NamespaceLimits) -> dict[str, dict[str, Any]]:
    rendered = render.trainer_config_for(job)
    return {
        "validation": builders.validation_job(job, typed(job), rendered, settings, limits)["spec"]["template"]["spec"],
        "trainer": builders.trainer_job(job, typed(job), rendered, settings, limits=limits)["spec"]["template"]["spec"],
        "serving": builders.serving_deployment(job, typed(job), render.model_location(job), "sha256:x", settings,
                                               limits)["spec"]["template"]["spec"],
    }


class TestCredentialsReachEveryPodByReference:
    @pytest.mark.parametrize("pod", ["validation", "trainer", "serving"])
    def test_each_value_is_a_secret_key_ref_with_the_sdk_variable_name(
            self, make_job: MakeJob, settings: OperatorSettings, pod: str) -> None:
        job = make_job(credentials=CREDENTIALS)
        env = env_of(all_pods(job, settings, NamespaceLimits())[pod]["containers"][0])
        expected = {
            "HF_TOKEN": ("hub-token", "token"),
            "AWS_ACCESS_KEY_ID": ("bucket-keys", "accessKeyId"),
            "AWS_SECRET_ACCESS_KEY": ("bucket-keys", "secretAccessKey"),
            "AWS_SESSION_TOKEN": ("bucket-keys", "session"),
            "AWS_ENDPOINT_URL": ("bucket-keys", "endpoint"),
            "AWS_REGION": ("bucket-keys", "region"),
        }
        for variable, (secret, key) in expected.items():
            assert env[variable] == {"secretKeyRef": {"name": secret, "key": key, "optional": False}}, variable

    def test_keys_left_out_are_not_asked_for(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(credentials={"s3": {"secretName": "bucket-keys"}})
        env = env_of(all_pods(job, settings, NamespaceLimits())["trainer"]["containers"][0])
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        assert not {"AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION", "HF_TOKEN"} & set(env)

    def test_no_credentials_no_secret_references_of_the_users(self, make_job: MakeJob,
                                                             settings: OperatorSettings) -> None:
        for spec in all_pods(make_job(), settings, NamespaceLimits()).values():
            env = env_of(spec["containers"][0])
            assert not {"HF_TOKEN", "AWS_ACCESS_KEY_ID"} & set(env)
            assert "serviceAccountName" not in spec

    def test_the_platforms_hub_mirror_reaches_every_pod(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        limits = NamespaceLimits(hf_endpoint="https://hf-mirror.internal")
        for spec in all_pods(make_job(), settings, limits).values():
            assert env_of(spec["containers"][0])["HF_ENDPOINT"] == "https://hf-mirror.internal"

    def test_a_service_account_runs_every_pod_without_mounting_an_api_token(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(credentials={"serviceAccountName": "s3-reader"})
        for spec in all_pods(job, settings, NamespaceLimits()).values():
            assert spec["serviceAccountName"] == "s3-reader"
            assert spec["automountServiceAccountToken"] is False

    def test_the_config_map_holds_no_credential_reference_values(self, make_job: MakeJob) -> None:
        job = make_job(credentials=CREDENTIALS)
        data = builders.trainer_configmap(job, render.trainer_config_for(job))["data"]
        assert "hub-token" not in json.dumps(data) and "bucket-keys" not in json.dumps(data)


class TestServiceAccountPolicy:
    def test_a_service_account_outside_the_allowed_list_is_a_policy_violation(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(credentials={"serviceAccountName": "admin"})
        platform = policy.policy_from_dict({"defaults": {"allowedServiceAccounts": ["s3-reader"]}})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, platform)
        validated = condition(decision, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", "PolicyViolation")
        assert "spec.credentials.serviceAccountName: 'admin' is not allowed" in validated["message"]
        assert "allowedServiceAccounts: s3-reader" in validated["message"]
        assert decision.actions == ()

    def test_an_allowed_service_account_goes_ahead(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(credentials={"serviceAccountName": "s3-reader"})
        platform = policy.policy_from_dict({"defaults": {"allowedServiceAccounts": ["s3-reader"]}})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, platform)
        assert condition(decision, "Validated")["reason"] == "ValidatingDataset"

    def test_none_allowed_by_default(self) -> None:
        assert not NamespaceLimits().service_account_allowed("default")

    @pytest.mark.parametrize("value", ["hf-mirror", "https://user:pw@mirror", "ftp://mirror"])
    def test_a_bad_hub_endpoint_is_named(self, value: str) -> None:
        with pytest.raises(policy.PolicyError, match="defaults.hfEndpoint: must be an http"):
            policy.policy_from_dict({"defaults": {"hfEndpoint": value}})


def validation_observation(job: dict[str, Any], settings: OperatorSettings, pod_status: dict[str, Any]) -> Observed:
    rendered = render.trainer_config_for(job)
    return Observed(job=job, now=NOW, config_map=builders.trainer_configmap(job, rendered),
                    progress_secret=builders.progress_secret(job, "t"),
                    validation_job={"metadata": {"name": "demo-validate", "annotations": {}}, "status": {}},
                    validation_pods=({"metadata": {"name": "demo-validate-x"}, "status": pod_status},))


class TestValidationEndsOnUnusableCredentialsModelsAndStorage:
    def test_a_missing_secret_key_is_credentials_unavailable_naming_spec_credentials(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        waiting = {"phase": "Pending", "containerStatuses": [{"name": "validate", "state": {"waiting": {
            "reason": "CreateContainerConfigError",
            "message": "couldn't find key secretAccessKey in Secret team-a/bucket-keys"}}}]}
        job = make_job(credentials=CREDENTIALS)
        decision = reconcile.reconcile(validation_observation(job, settings, waiting), settings)
        validated = condition(decision, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", "CredentialsUnavailable")
        assert validated["message"].startswith("spec.credentials: the validation pod cannot start: couldn't find "
                                               "key secretAccessKey in Secret team-a/bucket-keys")
        assert condition(decision, "Failed")["status"] == "True"
        assert DeleteChild("batch/v1", "Job", "demo-validate") in decision.actions
        assert not [a for a in decision.actions if isinstance(a, CreateChild)]

    @pytest.mark.parametrize("reason", ["ModelUnavailable", "StorageUnavailable"])
    def test_the_trainers_error_kind_becomes_the_reason(self, make_job: MakeJob, settings: OperatorSettings,
                                                        reason: str) -> None:
        summary = json.dumps({"outcome": "failed", "reason": reason, "message": "model.source: 401 Unauthorized"})
        ended = {"phase": "Failed", "containerStatuses": [{"name": "validate", "state": {"terminated": {
            "exitCode": 78, "message": summary, "finishedAt": "2026-03-01T11:00:00Z"}}}]}
        observed = validation_observation(make_job(), settings, ended)
        observed.validation_job["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                                             "reason": "PodFailurePolicy"}]}
        decision = reconcile.reconcile(observed, settings)
        validated = condition(decision, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", reason)
        assert validated["message"] == "model.source: 401 Unauthorized"

    def test_an_unknown_reason_from_a_pod_stays_invalid_dataset(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        summary = json.dumps({"outcome": "failed", "reason": "Anything", "message": "no"})
        ended = {"phase": "Failed", "containerStatuses": [{"name": "validate", "state": {"terminated": {
            "exitCode": 78, "message": summary, "finishedAt": "2026-03-01T11:00:00Z"}}}]}
        observed = validation_observation(make_job(), settings, ended)
        observed.validation_job["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                                             "reason": "PodFailurePolicy"}]}
        assert condition(reconcile.reconcile(observed, settings), "Validated")["reason"] == "InvalidDataset"


def source_job(*conds: tuple[str, str], model: dict[str, Any] | None = None,
               lineage: list[dict[str, str]] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": t, "status": s, "reason": "X", "message": ""}
                                             for t, s in conds]}
    if model is not None:
        status["model"] = model
    if lineage is not None:
        status["lineage"] = lineage
    return {"metadata": {"name": "first", "namespace": "team-a"},
            "spec": {"model": {"source": "hf://org/base"}}, "status": status}


SUCCEEDED = (("Succeeded", "True"), ("Failed", "False"))


class TestTrainingOnFromAnEarlierJob:
    def from_job(self, make_job: MakeJob, **status: Any) -> dict[str, Any]:
        return make_job(model={"fromJob": "first"}, **({"status": status} if status else {}))

    def test_a_missing_source_job_waits_with_source_job_not_ready(self, make_job: MakeJob,
                                                                   settings: OperatorSettings) -> None:
        decision = reconcile.reconcile(Observed(job=self.from_job(make_job), now=NOW), settings)
        validated = condition(decision, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", "SourceJobNotReady")
        assert "spec.model.fromJob: FineTuneJob 'first' does not exist" in validated["message"]
        assert condition(decision, "Failed")["status"] == "False"  # it waits, it does not fail
        assert decision.actions == ()
        assert decision.requeue_after == reconcile.SOURCE_JOB_RETRY_SECONDS

    def test_a_running_source_job_waits(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        running = source_job(("Running", "True"), ("Succeeded", "False"))
        decision = reconcile.reconcile(Observed(job=self.from_job(make_job), now=NOW, source_job=running), settings)
        assert condition(decision, "Validated")["reason"] == "SourceJobNotReady"
        assert "has not Succeeded (it is Running)" in condition(decision, "Validated")["message"]
        assert decision.actions == ()

    def test_a_succeeded_source_job_is_resolved_to_its_model_and_lineage(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        done = source_job(*SUCCEEDED, model={"uri": "pvc://models/finetunes/first/model", "digest": "sha256:a"})
        decision = reconcile.reconcile(Observed(job=self.from_job(make_job), now=NOW, source_job=done), settings)
        lineage = [{"uri": "hf://org/base"},
                   {"job": "first", "uri": "pvc://models/finetunes/first/model", "digest": "sha256:a"}]
        assert decision.status_patch["lineage"] == lineage
        config_map = next(a.manifest for a in decision.actions
                          if isinstance(a, CreateChild) and a.manifest["kind"] == "ConfigMap")
        config = json.loads(config_map["data"][render.CONFIG_FILE_NAME])
        assert config["model"]["source"] == "/mnt/pvc/models/finetunes/first/model"
        assert "fromJob" not in config["model"]  # the trainer gets the resolved source; the chain is in job.lineage
        assert config["job"]["lineage"] == lineage
        validation = next(a.manifest for a in decision.actions
                          if isinstance(a, CreateChild) and a.manifest["kind"] == "Job")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in validation["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert "models" in claims

    def test_a_chain_extends_the_source_jobs_lineage(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        earlier = [{"uri": "hf://org/base"}, {"job": "zeroth", "uri": "pvc://m/zeroth/model", "digest": "sha256:0"}]
        done = source_job(*SUCCEEDED, model={"uri": "pvc://m/first/model", "digest": "sha256:1"}, lineage=earlier)
        decision = reconcile.reconcile(Observed(job=self.from_job(make_job), now=NOW, source_job=done), settings)
        assert decision.status_patch["lineage"] == earlier + [
            {"job": "first", "uri": "pvc://m/first/model", "digest": "sha256:1"}]

    def test_a_resolved_lineage_pins_the_model_even_when_the_source_job_is_gone(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        lineage = [{"uri": "hf://org/base"}, {"job": "first", "uri": "pvc://m/first/model", "digest": "sha256:1"}]
        job = self.from_job(make_job, lineage=lineage)
        decision = reconcile.reconcile(Observed(job=job, now=NOW, source_job=None), settings)
        assert condition(decision, "Validated")["reason"] == "ValidatingDataset"
        assert "lineage" not in decision.status_patch

    def test_policy_on_model_sources_does_not_block_a_namespaces_own_output(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        done = source_job(*SUCCEEDED, model={"uri": "pvc://m/first/model"})
        platform = policy.policy_from_dict({"defaults": {"allowedModelSources": ["hf://org/*"]}})
        decision = reconcile.reconcile(Observed(job=self.from_job(make_job), now=NOW, source_job=done),
                                       settings, platform)
        assert condition(decision, "Validated")["reason"] == "ValidatingDataset"


class TestServingAnAdapterTrainedOnFromAnEarlierJob:
    """An unmerged adapter of a `fromJob` job is served on the base model of its chain."""

    def adapter_job(self, make_job: MakeJob, lineage: list[dict[str, Any]] | None) -> dict[str, Any]:
        job = make_job(model={"fromJob": "first"}, method={"type": "lora", "lora": {"merge": False}},
                       serving={"enabled": True})
        if lineage is not None:
            job["status"] = {"lineage": lineage}
        return job

    @pytest.mark.parametrize(("lineage", "base"), [
        # base -> first (adapter) -> this (the same adapter trained on): the original base
        ([{"uri": "pvc://models/base/tiny"}, {"job": "first", "uri": "pvc://models/finetunes/first/adapter"}],
         "/mnt/pvc/models/base/tiny"),
        # base -> first (merged) -> this (a new adapter): first's merged model
        ([{"uri": "pvc://models/base/tiny"}, {"job": "first", "uri": "pvc://tuned/finetunes/first/model"}],
         "/mnt/pvc/tuned/finetunes/first/model"),
        # base -> zeroth (merged) -> first (adapter) -> this: zeroth's model
        ([{"uri": "hf://org/base"}, {"job": "zeroth", "uri": "pvc://tuned/zeroth/model"},
          {"job": "first", "uri": "pvc://models/first/adapter"}], "/mnt/pvc/tuned/zeroth/model"),
    ], ids=["adapter-on-adapter", "adapter-on-merged", "longer-chain"])
    def test_the_base_is_the_newest_merged_model_of_the_lineage(
            self, make_job: MakeJob, settings: OperatorSettings, lineage: list[dict[str, Any]], base: str) -> None:
        job = self.adapter_job(make_job, lineage)
        location = render.model_location(job)
        assert location.base_path == base
        assert base.split("/")[3] in location.claims  # the serving pod mounts the base's claim
        server = builders.serving_deployment(job, typed(job), location, "sha256:x", settings)[
            "spec"]["template"]["spec"]["containers"][0]
        assert server["command"][server["command"].index("--model") + 1] == location.path

    def test_a_base_on_the_hub_is_refused_naming_the_lineage(self, make_job: MakeJob) -> None:
        job = self.adapter_job(make_job, [{"uri": "hf://org/base"},
                                          {"job": "first", "uri": "pvc://models/first/adapter"}])
        with pytest.raises(render.SpecError) as refused:
            render.model_location(job)
        assert "status.lineage[0].uri" in refused.value.problems[0]
        assert "'hf://org/base'" in refused.value.problems[0]

    def test_an_unresolved_chain_is_refused_not_crashed_on(self, make_job: MakeJob) -> None:
        with pytest.raises(render.SpecError) as refused:
            render.model_location(self.adapter_job(make_job, None))
        assert refused.value.problems[0].startswith("spec.model.fromJob")


class TestOutputInObjectStorage:
    def test_the_trainer_writes_to_scratch_and_mirrors_to_the_bucket(self, make_job: MakeJob) -> None:
        job = make_job(output={"storage": "s3://models/finetunes"}, credentials=CREDENTIALS)
        rendered = render.trainer_config_for(job)
        assert rendered.config["output"] == {"dir": "/tmp/kubetune-output", "checkpointDir": "/tmp/kubetune-output/checkpoints",
                                             "uri": "s3://models/finetunes/demo"}
        assert rendered.model_uri == "s3://models/finetunes/demo/model"
        assert rendered.claims == ("data", "models")  # the sources' claims; none for the output

    def test_serving_downloads_the_model_in_an_init_container_with_the_credentials(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(output={"storage": "s3://models/finetunes"}, credentials=CREDENTIALS,
                       serving={"enabled": True})
        location = render.model_location(job)
        assert location.path == render.SERVING_MODEL_DIR
        pod = builders.serving_deployment(job, typed(job), location, "sha256:x", settings)["spec"]["template"]["spec"]
        (fetch,) = pod["initContainers"]
        assert fetch["command"] == ["python", "-m", "kubetune.trainer.objectstore", "s3://models/finetunes/demo/model",
                                    render.SERVING_MODEL_DIR]
        assert env_of(fetch)["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "bucket-keys",
                                                                           "key": "secretAccessKey", "optional": False}}
        server = pod["containers"][0]
        assert server["command"][server["command"].index("--model") + 1] == render.SERVING_MODEL_DIR
        assert {"name": builders.MODEL_VOLUME, "mountPath": render.SERVING_MODEL_DIR, "readOnly": True} \
            in server["volumeMounts"]
        assert {"name": builders.MODEL_VOLUME, "emptyDir": {}} in pod["volumes"]

    def test_a_model_on_a_claim_needs_no_init_container(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(serving={"enabled": True})
        pod = builders.serving_deployment(job, typed(job), render.model_location(job), "sha256:x",
                                          settings)["spec"]["template"]["spec"]
        assert "initContainers" not in pod
