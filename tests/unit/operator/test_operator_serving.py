"""Serving: the Deployment and Service that serve a finished model, and how `ServingReady` follows them."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions, names
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed, PatchChild, ReplaceChild
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]
DIGEST = "sha256:" + "ab" * 32

LABELS = {
    "app.kubernetes.io/name": "kubetune",
    "app.kubernetes.io/instance": "demo",
    "app.kubernetes.io/component": "serving",
    "app.kubernetes.io/part-of": "kubetune",
    "app.kubernetes.io/managed-by": "kubetune-operator",
}
SELECTOR = {"app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "serving",
            "app.kubernetes.io/managed-by": "kubetune-operator"}
OWNER = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "demo", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}
SCRATCH_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    {"name": "HF_HOME", "value": "/tmp/.cache/huggingface"},
    {"name": "MPLCONFIGDIR", "value": "/tmp/.cache/matplotlib"},
    {"name": "TRITON_CACHE_DIR", "value": "/tmp/.cache/triton"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]
MODEL_DIR = "/mnt/pvc/models/finetunes/demo/model"


def key_env(name: str) -> dict[str, Any]:
    """The API key from the job's serving-key Secret (serving.auth: apiKey, the default)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "demo-serving-key", "key": "api-key"}}}


def probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def served(make_job: MakeJob, **serving: Any) -> dict[str, Any]:
    """A job that succeeded, with `spec.serving` from the keywords."""
    status = {"conditions": [
        {"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "", "observedGeneration": 1,
         "lastTransitionTime": "2026-03-01T10:00:00Z"},
        {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
         "observedGeneration": 1, "lastTransitionTime": "2026-03-01T11:00:00Z"}],
        "completionTime": "2026-03-01T11:00:00Z",
        "model": {"uri": "pvc://models/finetunes/demo/model", "digest": DIGEST}}
    return make_job(status=status, serving={"enabled": True, **serving})


def deployment_for(job: dict[str, Any], settings: OperatorSettings, digest: str = DIGEST) -> dict[str, Any]:
    spec = typed(job)
    key_digest = builders.api_key_digest(API_KEY) if spec.serving_settings().auth == "apiKey" else ""
    return builders.serving_deployment(job, spec, render.model_location(job), digest, settings, key_digest=key_digest)


class TestTheBuiltinRuntime:
    def test_deployment_golden(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = served(make_job, replicas=2, resources={"cpu": "2", "memory": "4Gi", "gpus": 1})
        manifest = deployment_for(job, settings)
        annotations = manifest["metadata"].pop("annotations")
        assert list(annotations) == ["kubetune.io/serving-hash"]
        assert manifest == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "demo-serving", "namespace": "team-a", "labels": LABELS,
                         "ownerReferences": [OWNER]},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": SELECTOR},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "revisionHistoryLimit": 3,
                "template": {
                    "metadata": {"labels": LABELS, "annotations": {
                        "kubetune.io/model-digest": DIGEST,
                        "kubetune.io/api-key-digest": hashlib.sha256(API_KEY.encode()).hexdigest()[:16]}},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "terminationGracePeriodSeconds": 30,
                        "securityContext": POD_SECURITY,
                        "containers": [{
                            "name": "server",
                            "image": "trainer:test",
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-m", "kubetune.trainer.serve", "--model", MODEL_DIR,
                                        "--host", "$(POD_IP)", "--port", "8000", "--served-model-name", "demo"],
                            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                    *SCRATCH_ENV, key_env("KUBETUNE_SERVE_API_KEY")],
                            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                            "startupProbe": probe("/healthz", 10, 180),
                            "readinessProbe": probe("/readyz", 5, 3),
                            "livenessProbe": probe("/healthz", 20, 3),
                            "resources": {"requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
                                          "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"}},
                            "securityContext": RESTRICTED_CONTAINER,
                            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                                             {"name": "pvc-models", "mountPath": "/mnt/pvc/models",
                                              "readOnly": True}],
                        }],
                        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "64Gi"}},
                                    {"name": "pvc-models",
                                     "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    },
                },
            },
        }

    def test_without_resources_it_asks_for_nothing_and_tolerates_no_gpu_taint(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        pod = deployment_for(served(make_job), settings)["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"] == {}
        assert "tolerations" not in pod

    def test_an_image_override_wins_over_the_trainer_image(self, make_job: MakeJob,
                                                           settings: OperatorSettings) -> None:
        manifest = deployment_for(served(make_job, image="registry.example/serve:1"), settings)
        assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/serve:1"

    def test_the_service_golden(self, make_job: MakeJob) -> None:
        assert builders.serving_service(served(make_job)) == {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "demo-serving", "namespace": "team-a", "labels": LABELS,
                         "ownerReferences": [OWNER]},
            "spec": {"type": "ClusterIP", "selector": SELECTOR,
                     "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]},
        }

    def test_the_endpoint_names_the_service_first(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        assert builders.serving_endpoint(served(make_job), settings) == \
            "http://demo-serving.team-a.svc.cluster.local:8000"


class TestTheVllmRuntime:
    def test_container_golden(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = served(make_job, runtime="vllm", resources={"gpus": 2, "memory": "40Gi"})
        pod = deployment_for(job, settings)["spec"]["template"]["spec"]
        assert pod["containers"] == [{
            "name": "server",
            "image": "vllm/vllm-openai:v0.11.0",
            "imagePullPolicy": "IfNotPresent",
            "args": ["--model", MODEL_DIR, "--served-model-name", "demo", "--host", "0.0.0.0", "--port", "8000",
                     "--tensor-parallel-size", "2"],
            "env": [*SCRATCH_ENV, key_env("VLLM_API_KEY")],
            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
            "startupProbe": probe("/health", 10, 180),
            "readinessProbe": probe("/health", 5, 3),
            "livenessProbe": probe("/health", 20, 3),
            "resources": {"requests": {"memory": "40Gi", "nvidia.com/gpu": "2"},
                          "limits": {"memory": "40Gi", "nvidia.com/gpu": "2"}},
            "securityContext": RESTRICTED_CONTAINER,
            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                             {"name": "shm", "mountPath": "/dev/shm"},
                             {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True}],
        }]
        assert pod["volumes"][1] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}
        assert pod["securityContext"] == POD_SECURITY

    def test_one_gpu_means_no_tensor_parallelism(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        container = deployment_for(served(make_job, runtime="vllm", resources={"gpus": 1}), settings)[
            "spec"]["template"]["spec"]["containers"][0]
        assert "--tensor-parallel-size" not in container["args"]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}

    def test_the_vllm_image_is_an_operator_setting(self, make_job: MakeJob) -> None:
        settings = OperatorSettings.from_env({"KUBETUNE_VLLM_IMAGE": "mirror.example/vllm:v1"})
        container = deployment_for(served(make_job, runtime="vllm", resources={"gpus": 1}), settings)[
            "spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "mirror.example/vllm:v1"


class TestNames:
    def test_deployment_and_service_share_a_deterministic_name(self) -> None:
        assert names.serving("demo") == "demo-serving"

    @pytest.mark.parametrize("job_name", ["7b-chat", "my.model.v2", "a" * 60 + ".x"])
    def test_names_that_are_not_dns_labels_become_valid_service_names(self, job_name: str) -> None:
        name = names.serving(job_name)
        assert len(name) <= 63 and name[0].isalpha() and name.endswith("-serving")
        assert all(ch.islower() or ch.isdigit() or ch == "-" for ch in name)
        assert "--" not in name
        assert names.serving(job_name) == name
        if "." in job_name:  # `a.b` and `a-b` are different jobs
            assert names.serving(job_name.replace(".", "-")) != name


API_KEY = "stored-api-key"
KEY_SECRET = {"metadata": {"name": "demo-serving-key",
                           "annotations": {"kubetune.io/api-key-digest": builders.api_key_digest(API_KEY)}}}
"""The serving-key Secret as the operator reads it: metadata only, with the digest it annotated."""


def observe(job: dict[str, Any], deployment: dict[str, Any] | None = None,
            service: dict[str, Any] | None = None) -> Observed:
    return Observed(job=job, now=NOW, serving_deployment=deployment, serving_service=service,
                    serving_key_secret=KEY_SECRET)


def condition(decision: reconcile.Decision) -> dict[str, Any]:
    found = conditions.find(decision.status_patch["conditions"], "ServingReady")
    assert found is not None
    return dict(found)


def as_stored(manifest: dict[str, Any], *, generation: int = 1, **status: Any) -> dict[str, Any]:
    """The object as the API server returns it: with resourceVersion, generation and status."""
    stored = copy.deepcopy(manifest)
    stored["metadata"] |= {"resourceVersion": "42", "generation": generation}
    stored["status"] = status
    return stored


class TestServingReconcile:
    def test_a_succeeded_job_gets_a_deployment_a_service_and_an_endpoint(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = served(make_job)
        decision = reconcile.reconcile(observe(job), settings)
        assert decision.actions == (CreateChild(deployment_for(job, settings)),
                                    CreateChild(builders.serving_service(job)))
        assert decision.status_patch["endpoint"] == "http://demo-serving.team-a.svc.cluster.local:8000"
        found = condition(decision)
        assert (found["status"], found["reason"]) == ("False", "DeploymentProgressing")

    def test_converged_serving_changes_nothing(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = served(make_job)
        job["status"]["endpoint"] = "http://demo-serving.team-a.svc.cluster.local:8000"
        deployment = as_stored(deployment_for(job, settings), observedGeneration=1, availableReplicas=1,
                               updatedReplicas=1)
        decision = reconcile.reconcile(observe(job, deployment, builders.serving_service(job)), settings)
        assert decision.actions == ()
        assert "endpoint" not in decision.status_patch
        found = condition(decision)
        assert (found["status"], found["reason"], found["message"]) == (
            "True", "ServingAvailable", "1/1 serving replicas available")

    def test_a_new_model_digest_replaces_the_deployment_so_it_rolls(self, make_job: MakeJob,
                                                                    settings: OperatorSettings) -> None:
        job = served(make_job)
        old = as_stored(deployment_for(job, settings, digest="sha256:old"), observedGeneration=1,
                        availableReplicas=1)
        decision = reconcile.reconcile(observe(job, old, builders.serving_service(job)), settings)
        assert decision.actions == (ReplaceChild(deployment_for(job, settings), "42"),)
        template = decision.actions[0].manifest["spec"]["template"]  # type: ignore[union-attr]
        assert template["metadata"]["annotations"]["kubetune.io/model-digest"] == DIGEST

    def test_edited_replicas_converge(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        before = served(make_job)
        after = served(make_job, replicas=3)
        stored = as_stored(deployment_for(before, settings), observedGeneration=1, availableReplicas=1)
        decision = reconcile.reconcile(observe(after, stored, builders.serving_service(after)), settings)
        assert [type(a) for a in decision.actions] == [ReplaceChild]
        assert decision.actions[0].manifest["spec"]["replicas"] == 3  # type: ignore[union-attr]

    def test_disabling_serving_deletes_both_objects_and_the_endpoint(self, make_job: MakeJob,
                                                                     settings: OperatorSettings) -> None:
        job = served(make_job, enabled=False)
        job["status"]["endpoint"] = "http://demo-serving.team-a.svc.cluster.local:8000"
        decision = reconcile.reconcile(
            observe(job, as_stored(deployment_for(job, settings)), builders.serving_service(job)), settings)
        assert decision.actions == (DeleteChild("apps/v1", "Deployment", "demo-serving"),
                                    DeleteChild("v1", "Service", "demo-serving"))
        assert decision.status_patch["endpoint"] is None
        assert condition(decision)["reason"] == "ServingDisabled"

    def test_a_changed_service_is_patched_back(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = served(make_job)
        service = builders.serving_service(job)
        service["spec"]["ports"][0]["port"] = 9999
        decision = reconcile.reconcile(
            observe(job, as_stored(deployment_for(job, settings)), service), settings)
        assert decision.actions == (PatchChild("v1", "Service", "demo-serving", {"spec": {
            "selector": SELECTOR,
            "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]}}),)

    def test_serving_waits_for_the_model_and_never_starts_for_a_failed_job(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        waiting = reconcile.reconcile(Observed(job=make_job(serving={"enabled": True}), now=NOW), settings)
        assert condition(waiting)["reason"] == "WaitingForModel"
        assert not [a for a in waiting.actions if isinstance(a, CreateChild)
                    and a.manifest["kind"] in ("Deployment", "Service")]
        failed = make_job(serving={"enabled": True}, status={"conditions": [
            {"type": "Failed", "status": "True", "reason": "PermanentError", "message": "",
             "observedGeneration": 1, "lastTransitionTime": "x"}]})
        decision = reconcile.reconcile(Observed(job=failed, now=NOW), settings)
        assert condition(decision)["reason"] == "NoModel" and decision.actions == ()

    def test_the_ttl_removes_training_children_but_never_serving(self, make_job: MakeJob,
                                                                 settings: OperatorSettings) -> None:
        job = served(make_job)
        job["spec"]["ttlSecondsAfterFinished"] = 0
        job["status"]["endpoint"] = builders.serving_endpoint(job, settings)
        deployment = as_stored(deployment_for(job, settings), observedGeneration=1, availableReplicas=1)
        observed = Observed(job=job, now=NOW, trainer_job={"metadata": {"name": "demo-train"}},
                            serving_deployment=deployment, serving_service=builders.serving_service(job),
                            serving_key_secret=KEY_SECRET)
        decision = reconcile.reconcile(observed, settings)
        assert decision.actions == (DeleteChild("batch/v1", "Job", "demo-train"),)
        assert condition(decision)["status"] == "True"


class TestServingReadiness:
    def deployment(self, generation: int = 2, **status: Any) -> dict[str, Any]:
        return {"metadata": {"generation": generation}, "status": status}

    def test_available_once_one_replica_is_available_for_the_current_generation(self) -> None:
        ready = reconcile.serving_readiness(self.deployment(observedGeneration=2, availableReplicas=1,
                                                            updatedReplicas=1), 2, DIGEST)
        assert ready[:2] == ("True", "ServingAvailable")
        assert "rolling out model" in ready[2] and "(1/2 updated)" in ready[2]

    def test_a_generation_the_controller_has_not_seen_is_still_progressing(self) -> None:
        assert reconcile.serving_readiness(self.deployment(observedGeneration=1, availableReplicas=1), 1, DIGEST)[
            :2] == ("False", "DeploymentProgressing")

    def test_no_available_replica_is_progressing(self) -> None:
        assert reconcile.serving_readiness(self.deployment(observedGeneration=2), 1, DIGEST)[:2] == (
            "False", "DeploymentProgressing")

    def test_a_stalled_rollout_says_why(self) -> None:
        stalled = self.deployment(observedGeneration=2, conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "demo-serving-1" has timed out progressing.'}])
        status, reason, message = reconcile.serving_readiness(stalled, 1, DIGEST)
        assert (status, reason) == ("False", "DeploymentStalled") and "timed out" in message

    def test_zero_replicas_is_scaled_to_zero(self) -> None:
        assert reconcile.serving_readiness(self.deployment(observedGeneration=2), 0, DIGEST)[:2] == (
            "False", "ScaledToZero")


def test_a_job_being_deleted_gets_nothing_recreated(make_job: MakeJob, settings: OperatorSettings) -> None:
    job = served(make_job)
    job["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    decision = reconcile.reconcile(observe(job), settings)
    assert (decision.actions, decision.status_patch, decision.events) == ((), {}, ())
