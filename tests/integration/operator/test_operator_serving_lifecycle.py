"""Serving on the real control plane: a succeeded FineTuneJob is served, follows a new model, and goes away.

The operator runs as a real process. The test plays the kubelet only: it marks
serving pods Running and Ready; the real ReplicaSet and Deployment controllers
compute availability from that, and the garbage collector removes what the
FineTuneJob owned.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from tests.integration.operator.conftest import Kube, OperatorProcess, finetunejob, wait_for

NAME = "served"
SERVING = f"{NAME}-serving"
PODS = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=serving"
FIRST_DIGEST = "sha256:" + "11" * 32
SECOND_DIGEST = "sha256:" + "22" * 32


def train_to_success(kube: Kube, namespace: str, digest: str) -> None:
    wait_for(lambda: kube.job(namespace, f"{NAME}-validate"), "the validation Job")
    kube.run_pod_to_end(namespace, f"{NAME}-validate", 0, json.dumps({"outcome": "validated"}))
    wait_for(lambda: kube.job(namespace, f"{NAME}-train"), "the trainer Job")
    kube.run_pod_to_end(namespace, f"{NAME}-train", 0, json.dumps({
        "outcome": "succeeded", "step": 10, "modelDigest": digest,
        "resolved": {"batchSize": 4, "learningRate": 0.0003, "automatic": ["batchSize", "learningRate"]}}))
    wait_for(lambda: kube.condition_is(namespace, NAME, "Succeeded", "True"), "Succeeded")


def template_digest(kube: Kube, namespace: str) -> str | None:
    deployment = kube.deployment(namespace, SERVING)
    if deployment is None:
        return None
    return str(deployment["spec"]["template"]["metadata"]["annotations"]["kubetune.io/model-digest"])


def make_serving_pod_ready(kube: Kube, namespace: str, digest: str) -> dict[str, Any]:
    """Waits for a serving pod of that model, then reports it Running and Ready as a kubelet would."""
    pod = wait_for(lambda: next((p for p in kube.pods_with(namespace, PODS)
                                 if p["metadata"]["annotations"].get("kubetune.io/model-digest") == digest), None),
                   f"a serving pod for model {digest[:15]}")
    kube.set_pod_running(namespace, pod)
    return dict(pod)


def publish_new_model(kube: Kube, operator: OperatorProcess, namespace: str, digest: str) -> None:
    """The trainer's `completed` report naming a new model (as when a lost push arrives late)."""
    job = kube.ftj(namespace, NAME)
    secret = kube.core.read_namespaced_secret(f"{NAME}-progress", namespace)
    token = base64.b64decode(secret.data["token"]).decode()
    report = {"job": {"namespace": namespace, "name": NAME, "uid": job["metadata"]["uid"]}, "attempt": 0,
              "seq": 1, "kind": "completed", "time": datetime.now(timezone.utc).isoformat(),
              "model": {"uri": f"/mnt/pvc/models/finetunes/{NAME}/model", "digest": digest}}
    assert operator.post_report(report, token)[0] == 202


def test_serving_follows_the_job_from_success_to_deletion(kube: Kube, operator: OperatorProcess,
                                                         namespace: str) -> None:
    created = kube.create_ftj(namespace, finetunejob(NAME, serving={"enabled": True, "replicas": 1}))
    wait_for(lambda: kube.condition_is(namespace, NAME, "ServingReady", "False", "WaitingForModel"),
             "ServingReady=False WaitingForModel while training")
    assert kube.deployment(namespace, SERVING) is None
    train_to_success(kube, namespace, FIRST_DIGEST)
    assert kube.ftj(namespace, NAME)["status"]["resolved"] == {
        "batchSize": 4, "learningRate": 0.0003, "automatic": ["batchSize", "learningRate"]}

    # Created on success: owned by the job, serving the model the trainer wrote, with its digest.
    deployment = wait_for(lambda: kube.deployment(namespace, SERVING), "the serving Deployment")
    service = wait_for(lambda: kube.service(namespace, SERVING), "the serving Service")
    for child in (deployment, service):
        assert child["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert template_digest(kube, namespace) == FIRST_DIGEST
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:6] == ["python", "-m", "kubetune.trainer.serve", "--model",
                                        f"/mnt/pvc/models/finetunes/{NAME}/model", "--host"]
    assert service["spec"]["ports"][0]["port"] == 8000 and service["spec"]["clusterIP"]
    endpoint = wait_for(lambda: kube.ftj(namespace, NAME)["status"].get("endpoint"), "status.endpoint")
    assert endpoint == f"http://{SERVING}.{namespace}.svc.cluster.local:8000"
    wait_for(lambda: kube.condition_is(namespace, NAME, "ServingReady", "False", "DeploymentProgressing"),
             "ServingReady=False DeploymentProgressing")

    # The namespace enforces `restricted`: the ReplicaSet controller could create the pod, so it passed.
    make_serving_pod_ready(kube, namespace, FIRST_DIGEST)
    wait_for(lambda: kube.condition_is(namespace, NAME, "ServingReady", "True", "ServingAvailable"),
             "ServingReady=True once a replica is available")

    # A new model rolls the Deployment: a new pod with the new digest; serving stays available meanwhile.
    publish_new_model(kube, operator, namespace, SECOND_DIGEST)
    wait_for(lambda: template_digest(kube, namespace) == SECOND_DIGEST, "the Deployment to carry the new digest")
    make_serving_pod_ready(kube, namespace, SECOND_DIGEST)
    wait_for(lambda: (d := kube.deployment(namespace, SERVING)) and d["status"].get("updatedReplicas") == 1
             and d["status"].get("availableReplicas", 0) >= 1, "the rollout to the new model")
    # The operator sees the finished rollout through the Deployment's watch event, a moment after the test does.
    wait_for(lambda: kube.condition_is(namespace, NAME, "ServingReady", "True"), "ServingReady=True after the rollout",
             timeout=30)
    assert kube.ftj(namespace, NAME)["status"]["model"] == {
        "uri": f"pvc://models/finetunes/{NAME}/model", "digest": SECOND_DIGEST}

    # Serving is editable: replicas converge, and disabling removes the objects and the endpoint.
    kube.patch_ftj(namespace, NAME, {"spec": {"serving": {"replicas": 2}}})
    wait_for(lambda: (kube.deployment(namespace, SERVING) or {}).get("spec", {}).get("replicas") == 2,
             "replicas 2")
    kube.patch_ftj(namespace, NAME, {"spec": {"serving": {"enabled": False}}})
    wait_for(lambda: kube.deployment(namespace, SERVING) is None and kube.service(namespace, SERVING) is None,
             "serving objects removed when disabled")
    wait_for(lambda: kube.condition_is(namespace, NAME, "ServingReady", "False", "ServingDisabled"),
             "ServingReady=False ServingDisabled")
    assert "endpoint" not in kube.ftj(namespace, NAME)["status"]

    # Enabled again, then deleting the FineTuneJob takes serving with it (owner references).
    kube.patch_ftj(namespace, NAME, {"spec": {"serving": {"enabled": True}}})
    wait_for(lambda: kube.deployment(namespace, SERVING) and kube.service(namespace, SERVING),
             "serving recreated")
    kube.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", NAME,
                                                propagation_policy="Foreground")
    wait_for(lambda: kube.deployment(namespace, SERVING) is None and kube.service(namespace, SERVING) is None
             and not kube.pods_with(namespace, PODS), "serving removed with the FineTuneJob", timeout=90)


def key_digest_on_template(kube: Kube, namespace: str) -> str | None:
    deployment = kube.deployment(namespace, SERVING)
    if deployment is None:
        return None
    return deployment["spec"]["template"]["metadata"]["annotations"].get("kubetune.io/api-key-digest")


def stored_key(kube: Kube, namespace: str) -> str:
    return base64.b64decode(kube.core.read_namespaced_secret(f"{NAME}-serving-key", namespace).data["api-key"]).decode()


def test_the_api_key_secret_is_made_owned_handed_over_and_rotated_by_deleting_it(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    created = kube.create_ftj(namespace, finetunejob(NAME, serving={"enabled": True}))
    train_to_success(kube, namespace, FIRST_DIGEST)
    deployment = wait_for(lambda: kube.deployment(namespace, SERVING), "the serving Deployment")
    secret = kube.core.read_namespaced_secret(f"{NAME}-serving-key", namespace)
    assert secret.metadata.owner_references[0].uid == created["metadata"]["uid"]
    first = stored_key(kube, namespace)
    assert len(first) >= 40
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBETUNE_SERVE_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": f"{NAME}-serving-key", "key": "api-key"}}} in env
    assert first not in json.dumps(deployment), "the key itself is never in the Deployment"
    assert key_digest_on_template(kube, namespace) == hashlib.sha256(first.encode()).hexdigest()[:16]

    # Deleting the Secret rotates the key: a new random one, and the Deployment rolls to it.
    kube.core.delete_namespaced_secret(f"{NAME}-serving-key", namespace)
    second = wait_for(lambda: (key := stored_key(kube, namespace)) != first and key, "a new key")
    wait_for(lambda: key_digest_on_template(kube, namespace) == hashlib.sha256(second.encode()).hexdigest()[:16],
             "the Deployment to roll to the new key")

    # auth: none takes the key out of the pod template.
    kube.patch_ftj(namespace, NAME, {"spec": {"serving": {"auth": "none"}}})
    wait_for(lambda: key_digest_on_template(kube, namespace) is None
             and not [e for e in kube.deployment(namespace, SERVING)["spec"]["template"]["spec"]["containers"][0]
                      ["env"] if "secretKeyRef" in e.get("valueFrom", {})], "no key with auth: none")
