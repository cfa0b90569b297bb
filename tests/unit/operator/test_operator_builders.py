"""Pure builders: golden manifests for the trainer Job, the validation Job and the ConfigMap."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator.jobs import builders, render
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


LABELS = {
    "app.kubernetes.io/name": "kubetune",
    "app.kubernetes.io/instance": "demo",
    "app.kubernetes.io/component": "trainer",
    "app.kubernetes.io/part-of": "kubetune",
    "app.kubernetes.io/managed-by": "kubetune-operator",
}
OWNER = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "demo", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}
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
MOUNTS = [
    {"name": "trainer-config", "mountPath": "/etc/kubetune", "readOnly": True},
    {"name": "scratch", "mountPath": "/tmp"},
    {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True},
    {"name": "pvc-models", "mountPath": "/mnt/pvc/models"},
]
VOLUMES = [
    {"name": "trainer-config", "configMap": {"name": "demo-config"}},
    {"name": "scratch", "emptyDir": {"sizeLimit": "64Gi"}},
    {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data"}},
    {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
]


@pytest.fixture
def placed_job(make_job: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return make_job(
        resources={"gpus": 1, "cpu": "4", "memory": "16Gi", "nodeSelector": {"gpu": "h100"},
                   "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                   "priorityClassName": "training"},
        activeDeadlineSeconds=7200,
    )


def test_trainer_job_golden(placed_job: dict[str, Any], settings: OperatorSettings) -> None:
    rendered = render.trainer_config_for(placed_job)
    manifest = builders.trainer_job(placed_job, typed(placed_job), rendered, settings)
    template = manifest["spec"].pop("template")
    assert manifest == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "demo-train", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER],
                     "annotations": {"kubetune.io/config-hash": builders.config_hash(rendered)}},
        "spec": {
            "completionMode": "Indexed", "completions": 1, "parallelism": 1,
            "backoffLimit": 2, "backoffLimitPerIndex": 2, "podReplacementPolicy": "Failed",
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [78]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "suspend": False,
            "activeDeadlineSeconds": 7200,
        },
    }
    assert template == {
        "metadata": {"labels": LABELS},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 300,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "trainer",
                "image": "trainer:test",
                "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-m", "kubetune.trainer.launch", "--config", "/etc/kubetune/trainer-config.json"],
                "env": SCRATCH_ENV + [
                    {"name": "KUBETUNE_ATTEMPT", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-index-failure-count']"}}},
                    {"name": "KUBETUNE_PROGRESS_URL", "value": "http://operator:8080/v1/reports"},
                    {"name": "KUBETUNE_PROGRESS_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": "demo-progress", "key": "token"}}},
                    # One rank per GPU of the pod (its nvidia.com/gpu limit below).
                    {"name": "KUBETUNE_NUM_PROCESSES", "value": "1"},
                    {"name": "KUBETUNE_DEVICE", "value": "gpu"},
                ],
                "resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                              "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}},
                "securityContext": RESTRICTED_CONTAINER,
                "volumeMounts": MOUNTS,
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": VOLUMES,
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            ],
            "priorityClassName": "training",
        },
    }


def test_validation_job_holds_no_gpu_and_runs_validate_only(placed_job: dict[str, Any],
                                                            settings: OperatorSettings) -> None:
    manifest = builders.validation_job(placed_job, typed(placed_job), render.trainer_config_for(placed_job), settings)
    assert manifest["metadata"]["name"] == "demo-validate"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/component"] == "validation"
    assert manifest["spec"]["backoffLimit"] == 2
    assert manifest["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"] == {
        "containerName": "validate", "operator": "In", "values": [78]}
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-1] == "--validate-only"
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    assert container["securityContext"] == RESTRICTED_CONTAINER
    assert container["env"] == SCRATCH_ENV
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert pod["volumes"] == VOLUMES


def test_configmap_carries_the_rendered_config(placed_job: dict[str, Any]) -> None:
    rendered = render.trainer_config_for(placed_job)
    manifest = builders.trainer_configmap(placed_job, rendered)
    assert manifest["metadata"]["name"] == "demo-config"
    assert manifest["metadata"]["ownerReferences"] == [OWNER]
    assert json.loads(manifest["data"]["trainer-config.json"]) == rendered.config


def test_progress_secret_holds_the_token(placed_job: dict[str, Any]) -> None:
    manifest = builders.progress_secret(placed_job, "abc")
    assert manifest["metadata"]["name"] == "demo-progress"
    assert manifest["stringData"] == {"token": "abc"}
    assert manifest["metadata"]["ownerReferences"] == [OWNER]


@pytest.mark.parametrize(("gpus", "expected"), [(0, {}), (None, {}), ("auto", {"nvidia.com/gpu": "1"}),
                                                (4, {"nvidia.com/gpu": "4"})])
def test_gpu_requests(make_job: Callable[..., dict[str, Any]], gpus: Any, expected: dict[str, str]) -> None:
    resources = builders.trainer_resources(typed(make_job(resources={} if gpus is None else {"gpus": gpus})))
    assert resources.get("limits", {}) == expected


def test_suspend_and_queue(make_job: Callable[..., dict[str, Any]], settings: OperatorSettings) -> None:
    suspended = make_job(suspend=True)
    manifest = builders.trainer_job(suspended, typed(suspended), render.trainer_config_for(suspended), settings)
    assert manifest["spec"]["suspend"] is True
    queued = make_job(resources={"queueName": "team-a-queue"})
    manifest = builders.trainer_job(queued, typed(queued), render.trainer_config_for(queued), settings)
    assert manifest["spec"]["suspend"] is True
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"


def test_without_a_progress_url_pods_get_no_endpoint(make_job: Callable[..., dict[str, Any]]) -> None:
    job = make_job()
    manifest = builders.trainer_job(job, typed(job), render.trainer_config_for(job), OperatorSettings())
    env_names = [e["name"] for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "KUBETUNE_PROGRESS_URL" not in env_names and "KUBETUNE_PROGRESS_TOKEN" not in env_names
    assert "KUBETUNE_ATTEMPT" in env_names


def test_default_backoff_limit(make_job: Callable[..., dict[str, Any]], settings: OperatorSettings) -> None:
    job = make_job()
    del job["spec"]["backoffLimit"]
    manifest = builders.trainer_job(job, typed(job), render.trainer_config_for(job), settings)
    assert manifest["spec"]["backoffLimit"] == manifest["spec"]["backoffLimitPerIndex"] == 3


def test_with_an_https_endpoint_pods_get_the_ca_that_verifies_it(make_job: Callable[..., dict[str, Any]]) -> None:
    job = make_job()
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    settings = OperatorSettings(progress_url="https://kubetune.kubetune.svc:8080/v1/reports", progress_ca=pem)
    manifest = builders.trainer_job(job, typed(job), render.trainer_config_for(job), settings)
    env = {e["name"]: e for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_PROGRESS_URL"]["value"] == "https://kubetune.kubetune.svc:8080/v1/reports"
    assert env["KUBETUNE_PROGRESS_CA"] == {"name": "KUBETUNE_PROGRESS_CA", "value": pem}


class TestDistributedTrainer:
    """`resources.gpus` ranks per pod, `resources.nodes` pods: the world the launcher starts."""

    def test_one_pod_runs_one_rank_per_gpu_it_holds(self, placed_job: dict[str, Any], settings: OperatorSettings) -> None:
        placed_job["spec"]["resources"]["gpus"] = 4
        manifest = builders.trainer_job(placed_job, typed(placed_job), render.trainer_config_for(placed_job), settings)
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}

        assert env["KUBETUNE_NUM_PROCESSES"] == container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert "KUBETUNE_NUM_NODES" not in env and "MASTER_ADDR" not in env
        assert (manifest["spec"]["completions"], manifest["spec"]["parallelism"]) == (1, 1)
        assert "subdomain" not in manifest["spec"]["template"]["spec"]

    def test_a_cpu_pod_runs_one_gloo_rank(self, placed_job: dict[str, Any], settings: OperatorSettings) -> None:
        placed_job["spec"]["resources"].pop("gpus", None)
        manifest = builders.trainer_job(placed_job, typed(placed_job), render.trainer_config_for(placed_job), settings)
        env = {e["name"]: e.get("value") for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}

        assert (env["KUBETUNE_NUM_PROCESSES"], env["KUBETUNE_DEVICE"]) == ("1", "cpu")

    def test_several_pods_are_one_indexed_job_that_meets_at_pod_zero(self, placed_job: dict[str, Any],
                                                                     settings: OperatorSettings) -> None:
        placed_job["spec"]["resources"] |= {"gpus": 8, "nodes": 2}
        manifest = builders.trainer_job(placed_job, typed(placed_job), render.trainer_config_for(placed_job), settings)
        service = builders.rendezvous_service(placed_job)
        pod = manifest["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}

        assert manifest["spec"]["completionMode"] == "Indexed"
        assert (manifest["spec"]["completions"], manifest["spec"]["parallelism"]) == (2, 2)
        assert pod["subdomain"] == service["metadata"]["name"] == "demo-ranks"
        assert env["MASTER_ADDR"] == "demo-train-0.demo-ranks"  # pod index 0's hostname under the Service
        assert env["MASTER_PORT"] == "29500" and env["KUBETUNE_NUM_NODES"] == "2"
        assert env["KUBETUNE_NUM_PROCESSES"] == "8"
        assert typed(placed_job).resource_settings().world_size() == 16
        assert typed(placed_job).resource_settings().job_gpus() == 16  # what the namespace quota counts
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "demo-train"}
        assert service["metadata"]["ownerReferences"] == [OWNER]
