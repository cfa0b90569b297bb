"""Tenant edges on the real control plane, with the operator as a real process and no platform policy
file (the safe defaults): a forbidden spec ends with `Validated=False PolicyViolation` even when
admission let it through; a same-named object the job does not own makes it say so and create
nothing; after a delete and recreate the new job's pods never mount the old job's ConfigMap."""

from __future__ import annotations

import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.integration.operator.conftest import Kube, OperatorProcess, finetunejob, wait_for

HOLD = "test.kubetune.io/hold"
"""A finalizer that keeps an object in place (deletionTimestamp set) until the test removes it."""


def owner_uids(obj: dict[str, Any]) -> list[str]:
    return [o["uid"] for o in obj["metadata"].get("ownerReferences") or []]


def config_map(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return kube.plain(kube.core.read_namespaced_config_map(name, namespace))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_a_forbidden_spec_fails_at_reconcile_with_policy_violation(kube: Kube, operator: OperatorProcess,
                                                                   namespace: str) -> None:
    """Defence in depth: the admin (no admission policy here) creates what a tenant must not get."""
    kube.create_ftj(namespace, finetunejob("escalate", resources={
        "gpus": 0, "tolerations": [{"operator": "Exists"}], "priorityClassName": "system-node-critical"}))
    wait_for(lambda: kube.condition_is(namespace, "escalate", "Validated", "False", "PolicyViolation"),
             "Validated=False PolicyViolation")
    message = kube.condition(namespace, "escalate", "Validated")["message"]  # type: ignore[index]
    assert "spec.resources.tolerations[0]" in message and "allowedTolerations: none" in message
    assert "spec.resources.priorityClassName: 'system-node-critical'" in message
    assert kube.job(namespace, "escalate-validate") is None  # nothing ran


def test_a_same_named_object_it_does_not_own_is_named_in_a_condition(kube: Kube, operator: OperatorProcess,
                                                                     namespace: str) -> None:
    kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "squat-config"},
                                                       "data": {"config.json": "{}"}})
    kube.create_ftj(namespace, finetunejob("squat"))
    wait_for(lambda: kube.condition_is(namespace, "squat", "Running", "False", "ChildNameConflict"),
             "Running=False ChildNameConflict")
    message = kube.condition(namespace, "squat", "Running")["message"]  # type: ignore[index]
    assert message.startswith("ConfigMap squat-config has no controller")
    assert kube.job(namespace, "squat-validate") is None
    # Once it is gone the job goes ahead on its own ConfigMap.
    kube.core.delete_namespaced_config_map("squat-config", namespace)
    wait_for(lambda: kube.job(namespace, "squat-validate"), "the validation Job after the conflict cleared")
    uid = kube.ftj(namespace, "squat")["metadata"]["uid"]
    assert owner_uids(config_map(kube, namespace, "squat-config")) == [uid]  # type: ignore[arg-type]


def test_a_recreated_job_never_mounts_the_old_jobs_config(kube: Kube, operator: OperatorProcess,
                                                          namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("again"))
    old = wait_for(lambda: config_map(kube, namespace, "again-config"), "the first job's ConfigMap")
    wait_for(lambda: kube.job(namespace, "again-validate"), "the first job's validation Job")
    old_uid = owner_uids(old)[0]
    # The garbage collector cannot finish removing the old ConfigMap while this finalizer is on it.
    kube.core.patch_namespaced_config_map("again-config", namespace, {"metadata": {"finalizers": [HOLD]}})
    kube.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", "again")
    wait_for(lambda: (config_map(kube, namespace, "again-config") or {}).get("metadata", {}).get(
        "deletionTimestamp"), "the old ConfigMap marked for deletion")
    wait_for(lambda: kube.job(namespace, "again-validate") is None, "the old validation Job gone")

    new_uid = kube.create_ftj(namespace, finetunejob("again"))["metadata"]["uid"]
    assert new_uid != old_uid
    wait_for(lambda: kube.condition_is(namespace, "again", "Running", "False", "WaitingForOldChildren"),
             "Running=False WaitingForOldChildren")
    time.sleep(3)  # a resync later: still nothing that could mount the old ConfigMap
    assert kube.job(namespace, "again-validate") is None

    kube.core.patch_namespaced_config_map("again-config", namespace, {"metadata": {"finalizers": None}})
    validation = wait_for(lambda: kube.job(namespace, "again-validate"), "the new job's validation Job")
    assert owner_uids(validation) == [new_uid]
    current = wait_for(lambda: config_map(kube, namespace, "again-config"), "the new job's ConfigMap")
    assert owner_uids(current) == [new_uid]
