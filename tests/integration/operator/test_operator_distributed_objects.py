"""A multi-pod trainer on the real API server: the Indexed Job and its headless Service are accepted,
and the Job controller makes pods that can find rank 0 by name.

`resources.nodes: 2` with 4 GPUs per pod: the builder's Job and Service are created for real in a
namespace that enforces the restricted Pod Security level; the Job controller then creates the two pods,
and the test reads what it gave them (hostname, subdomain, index) against the rendezvous environment.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import process as api_process
from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import names
from kubetune.operator.jobs import builders, render
from kubetune.operator.settings import OperatorSettings

from .conftest import Kube, finetunejob, wait_for


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or [] if "value" in e}


def test_a_two_pod_trainer_job_and_its_rendezvous_service_are_accepted_and_get_named_pods(
        kube: Kube, namespace: str, finetunejob_crd: None) -> None:
    body = finetunejob("gang", resources={"gpus": 4, "nodes": 2, "cpu": "1", "memory": "2Gi"},
                       training={"strategy": "ddp"})
    stored = kube.create_ftj(namespace, body)
    settings = OperatorSettings(trainer_image="kubetune-trainer:test")

    service = builders.rendezvous_service(stored)
    job = builders.trainer_job(stored, typed(stored), render.trainer_config_for(stored), settings, admitted=True)
    kube.core.create_namespaced_service(namespace, service)
    kube.batch.create_namespaced_job(namespace, job)

    created = kube.plain(kube.core.read_namespaced_service(service["metadata"]["name"], namespace))
    assert created["spec"]["clusterIP"] == "None" and created["spec"]["publishNotReadyAddresses"] is True
    stored_job = kube.job(namespace, names.trainer_job("gang"))
    assert stored_job is not None
    assert (stored_job["spec"]["completions"], stored_job["spec"]["parallelism"]) == (2, 2)
    assert stored_job["spec"]["completionMode"] == "Indexed"

    pods = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(kube.pods(namespace, names.trainer_job("gang"))),
                    "the Job controller's two pods")
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert set(by_index) == {"0", "1"}
    for index, pod in by_index.items():
        # The pod's DNS name under the headless Service: <hostname>.<subdomain>.
        assert pod["spec"]["hostname"] == f"{names.trainer_job('gang')}-{index}"
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        env = _env(container)
        assert env[api_process.ENV_MASTER_ADDR] == f"{by_index['0']['spec']['hostname']}.{service['metadata']['name']}"
        assert env[api_process.ENV_NUM_NODES] == "2"
        # The ranks per pod are the pod's own GPU limit, the same number.
        assert env[api_process.ENV_NUM_PROCESSES] == container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert env[api_process.ENV_DEVICE] == "gpu"
        assert container["command"][:3] == ["python", "-m", "kubetune.trainer.launch"]
        # The Job controller tells each pod its index (the launcher's node rank).
        assert any(e["name"] == api_process.ENV_NODE_RANK for e in container["env"])
    # The service selects exactly the trainer Job's pods.
    selected = kube.core.list_namespaced_pod(namespace, label_selector=",".join(
        f"{k}={v}" for k, v in created["spec"]["selector"].items()))
    assert len(selected.items) == 2
