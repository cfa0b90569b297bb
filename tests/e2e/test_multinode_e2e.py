"""Two trainer pods train one model together: the operator's Indexed Job, rendezvous by DNS name.

`resources.nodes: 2` makes the operator create an Indexed trainer Job of two pods and a headless
Service; rank 0's address is pod 0's DNS name under that Service. The local node gives pods with a
subdomain their own hostname and the records cluster DNS would serve (`dev/localnode.py`), so the
ranks meet over loopback the way they would over a cluster network.

The one change from the operator's Job: the device. `nodes > 1` needs GPUs (the CRD refuses it on
CPU pods), and this machine has none, so the operator's own trainer pods stay Pending (no GPU on the
node). The test runs a copy of that Job under its own name and Service with the GPU limit removed
and `KUBETUNE_DEVICE=cpu`: every other part (command, config, volumes, token, index, rendezvous) is
the operator's. gloo replaces nccl; the rest of the path is the one a GPU gang takes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import process as api_process
from kubetune.cli import main as cli
from kubetune.dev import stack as local_stack
from kubetune.operator import names

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMESPACE = "e2e-gang"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    with local_stack.LocalStack(tmp_path_factory.mktemp("gang"), resync_seconds=5) as running:
        yield running


def _on_cpu(job: dict[str, Any], name: str, service: str) -> dict[str, Any]:
    """The operator's trainer Job as a new Job `name` under Service `service`, with its pods on the CPU."""
    copied = copy.deepcopy(job)
    copied["metadata"] = {"name": name, "namespace": job["metadata"]["namespace"]}
    spec = copied["spec"]
    spec.pop("selector", None)  # the Job controller writes a new one for the new Job
    spec["suspend"] = False
    template = spec["template"]
    template["metadata"]["labels"] = {k: v for k, v in template["metadata"].get("labels", {}).items()
                                      if "controller-uid" not in k and "job-name" not in k}
    template["spec"]["subdomain"] = service
    for container in template["spec"]["containers"]:
        for section in ("limits", "requests"):
            (container.get("resources") or {}).get(section, {}).pop("nvidia.com/gpu", None)
        for variable in container.get("env") or []:
            if variable["name"] == api_process.ENV_DEVICE:
                variable["value"] = "cpu"
            elif variable["name"] == api_process.ENV_MASTER_ADDR:
                variable["value"] = f"{name}-0.{service}"
    return copied


def test_two_pods_rendezvous_by_name_and_train_one_model(stack: local_stack.LocalStack) -> None:
    stack.ensure_namespace(NAMESPACE)
    body = yaml.safe_load(cli.prepare_demo_volumes(stack, tiny=True, namespace=NAMESPACE).read_text())
    name = body["metadata"]["name"] = "gang"
    body["spec"]["resources"] = {"gpus": 1, "nodes": 2}
    body["spec"]["serving"] = {"enabled": False}
    body["spec"]["evaluation"] = {"samples": 0}
    manifest = stack.workdir / "gang.yaml"
    manifest.write_text(yaml.safe_dump(body))
    stack.plane.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))

    trainer = local_stack.wait_until(lambda: stack.get("job", names.trainer_job(name), NAMESPACE), 300,
                                     "the operator's trainer Job")
    service = stack.get("service", names.rendezvous(name), NAMESPACE)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert trainer["spec"]["completionMode"] == "Indexed" and trainer["spec"]["completions"] == 2

    cpu_name, cpu_service = f"{names.trainer_job(name)}-cpu", f"{names.rendezvous(name)}-cpu"
    ours = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": cpu_service, "namespace": NAMESPACE},
            "spec": {**{k: v for k, v in service["spec"].items() if k in ("clusterIP", "publishNotReadyAddresses",
                                                                         "ports")},
                     "selector": {"batch.kubernetes.io/job-name": cpu_name}}}
    files = stack.workdir / "gang-cpu.json"
    files.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                 "items": [ours, _on_cpu(trainer, cpu_name, cpu_service)]}))
    stack.plane.kubectl("apply", "-f", str(files))

    def finished() -> dict[str, Any] | None:
        job = stack.get("job", cpu_name, NAMESPACE) or {}
        status = job.get("status") or {}
        assert not status.get("failed"), f"a rank failed: {_logs(stack, cpu_name)}"
        return job if status.get("succeeded") == 2 else None

    local_stack.wait_until(finished, 600, f"both ranks to succeed ({cpu_name})")

    pods = json.loads(stack.plane.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                          f"batch.kubernetes.io/job-name={cpu_name}", "-o", "json").stdout)["items"]
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{cpu_name}-0", f"{cpu_name}-1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)

    # One model, written by rank 0, trained by both ranks: the global batch counts two processes.
    model_dir = stack.claim_path(NAMESPACE, "models") / "finetunes" / name
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["hyperparameters"]["worldSize"] == 2
    assert (model_dir / "model" / "model.safetensors").exists()
    steps = [step for step, _ in metrics["history"]["trainLoss"]]
    assert steps == list(range(1, metrics["totalSteps"] + 1))

    # Rank 0's reports reached the operator: the progress in status is the run's global one.
    progress = local_stack.wait_until(
        lambda: (lambda p: p if p.get("step") == metrics["totalSteps"] else None)(
            ((stack.get("finetunejob", name, NAMESPACE) or {}).get("status") or {}).get("progress") or {}),
        60, "the last step's progress in status")
    assert progress["totalSteps"] == metrics["totalSteps"]


def _logs(stack: local_stack.LocalStack, job: str) -> str:
    """The end of each of the Job's pods' output, as the local node keeps it (it serves no `kubectl logs`)."""
    outputs = sorted((stack.workdir / "node" / "pods").glob(f"{NAMESPACE}_{job}-*/*/output.log"))
    return "\n".join(f"--- {path.parent.parent.name}:\n{path.read_text(errors='replace')[-3000:]}" for path in outputs)
