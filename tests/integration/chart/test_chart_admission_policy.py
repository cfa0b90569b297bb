"""The platform policy at `kubectl apply`: the chart's ValidatingAdmissionPolicy refuses, for a tenant
holding only `kubetune-edit`, every FineTuneJob that asks for what the tenant could not get itself
(tolerations, node selectors, priority classes, images, trustRemoteCode, a generator model or an
output claim outside the policy), naming the field and the rule; per-namespace entries widen it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart

from tests.integration.chart.conftest import Release, Tenants, finetunejob, kubectl_as, wait_for

OWN_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


def apply_as_tenant(cluster: Any, tenants: Tenants, manifest: dict[str, Any]) -> Any:
    """`kubectl create --dry-run=server` as the kubetune-edit tenant: admission runs, nothing is kept."""
    return kubectl_as(cluster, tenants.editor, "-n", tenants.a, "create", "--dry-run=server", "-f", "-",
                      input=yaml.safe_dump(manifest))


def refused_with(proc: Any, *parts: str) -> bool:
    return bool(proc.returncode != 0 and "ValidatingAdmissionPolicy" in proc.stderr
                and all(part in proc.stderr for part in parts))


@pytest.fixture(scope="module")
def admission(cluster: Any, release: Release, tenants: Tenants) -> Release:
    """The release's policy and binding are in force (the admission plugin loads them in the background)."""
    escalating = finetunejob("probe", resources={"gpus": 0, "priorityClassName": "system-node-critical"})
    wait_for(lambda: refused_with(apply_as_tenant(cluster, tenants, escalating)), "the admission policy in force")
    return release


@pytest.fixture
def widened(cluster: Any, helm_bin: Path, admission: Release, tenants: Tenants) -> Iterator[Callable[[], None]]:
    """The params ConfigMap re-rendered with an entry for tenant namespace a; yields a function that
    restores the release's own (also called afterwards)."""
    values = {"policy": {
        "defaults": {"allowedModelSources": ["pvc://*"], "writableClaims": ["finetunes"]},
        "namespaces": {tenants.a: {"allowedTolerations": ["dedicated:NoSchedule"],
                                   "allowedNodeSelectors": ["pool=training"],
                                   "allowedPriorityClasses": ["batch-low"], "allowTrustRemoteCode": True,
                                   "allowedServiceAccounts": ["trainer-identity"],
                                   "allowedModelSources": ["pvc://*", "hf://approved/*"],
                                   "allowedServingImages": ["registry.example/serving/*"],
                                   "allowedTrainerImages": ["registry.example/*"],
                                   "writableClaims": ["models"]}}}}
    params = next(m for m in chart.render(helm_bin, values, namespace=admission.namespace)
                  if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-admission-params"))
    original = next(m for m in admission.manifests if m["metadata"]["name"] == params["metadata"]["name"])

    def put(config_map: dict[str, Any]) -> None:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-",
                        input=yaml.safe_dump(config_map))

    put(params)
    yield lambda: put(copy.deepcopy(original))
    put(copy.deepcopy(original))


class TestTheDefaultsRefuseEscalation:
    @pytest.mark.parametrize(("spec", "field", "rule"), [
        ({"resources": {"gpus": 0, "tolerations": [{"operator": "Exists"}]}},
         "spec.resources.tolerations", "allowedTolerations: none"),
        ({"resources": {"gpus": 0, "nodeSelector": {"kubernetes.io/hostname": "control-plane"}}},
         "spec.resources.nodeSelector", "allowedNodeSelectors: none"),
        ({"resources": {"gpus": 0, "priorityClassName": "system-node-critical"}},
         "spec.resources.priorityClassName: system-node-critical", "allowedPriorityClasses: none"),
        ({"model": {"source": "hf://someone/model", "trustRemoteCode": True}},
         "spec.model.trustRemoteCode", "allowTrustRemoteCode: false"),
        ({"serving": {"enabled": True, "image": "docker.io/attacker/shell:latest"}},
         "spec.serving.image: docker.io/attacker/shell:latest", OWN_TRAINER_IMAGE),
        ({"credentials": {"serviceAccountName": "namespace-admin"}},
         "spec.credentials.serviceAccountName: namespace-admin", "allowedServiceAccounts: none"),
    ], ids=["keyless-toleration", "node-selector", "priority-class", "trust-remote-code", "serving-image",
            "service-account"])
    def test_a_tenant_cannot_apply_it(self, cluster: Any, tenants: Tenants, admission: Release,
                                      spec: dict[str, Any], field: str, rule: str) -> None:
        proc = apply_as_tenant(cluster, tenants, finetunejob("escalate", **spec))
        assert refused_with(proc, field, rule, f"namespace {tenants.a}"), proc.stderr

    def test_a_plain_job_and_the_operators_own_image_pass(self, cluster: Any, tenants: Tenants,
                                                          admission: Release) -> None:
        for manifest in (finetunejob("plain"),
                         finetunejob("own-image", serving={"enabled": True, "image": OWN_TRAINER_IMAGE})):
            proc = apply_as_tenant(cluster, tenants, manifest)
            assert proc.returncode == 0, proc.stderr


class TestANamespaceEntryWidensIt:
    def test_what_the_entry_allows_passes(self, cluster: Any, tenants: Tenants,
                                          widened: Callable[[], None]) -> None:
        allowed = finetunejob(
            "allowed", model={"source": "hf://approved/model", "trustRemoteCode": True},
            resources={"gpus": 0, "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                       "nodeSelector": {"pool": "training"}, "priorityClassName": "batch-low"},
            serving={"enabled": True, "image": "registry.example/serving/builtin:1"},
            credentials={"serviceAccountName": "trainer-identity"})
        proc = wait_for(lambda: (p := apply_as_tenant(cluster, tenants, allowed)).returncode == 0 and p,
                        "the widened params in force")
        assert proc.returncode == 0

    @pytest.mark.parametrize(("spec", "field", "rule"), [
        ({"resources": {"gpus": 0, "tolerations": [{"key": "dedicated", "operator": "Exists"}]}},
         "spec.resources.tolerations", "allowedTolerations: dedicated:NoSchedule"),
        ({"model": {"source": "hf://elsewhere/model"}},
         "spec.model.source: hf://elsewhere/model", "allowedModelSources: pvc://*, hf://approved/*"),
        ({"dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"},
                      "augmentation": {"synthetic": {"enabled": True, "model": "hf://elsewhere/generator",
                                                     "promptTemplate": "Write: {text}"}}}},
         "spec.dataset.augmentation.synthetic.model: hf://elsewhere/generator", "allowedModelSources"),
        ({"output": {"storage": "pvc://billing/backups"}},
         "spec.output.storage: claim billing may not be written", "writableClaims: models"),
        ({"credentials": {"serviceAccountName": "namespace-admin"}},
         "spec.credentials.serviceAccountName: namespace-admin", "allowedServiceAccounts: trainer-identity"),
        # allowed only by allowedTrainerImages, which has no say over serving
        ({"serving": {"enabled": True, "image": "registry.example/tools/shell:latest"}},
         "spec.serving.image: registry.example/tools/shell:latest", "allowedServingImages: registry.example/serving/*"),
    ], ids=["toleration-effect", "model-source", "generator-model", "output-claim", "other-service-account",
            "trainer-only-image"])
    def test_what_it_does_not_allow_is_refused(self, cluster: Any, tenants: Tenants, widened: Callable[[], None],
                                               spec: dict[str, Any], field: str, rule: str) -> None:
        manifest = finetunejob("still-refused", **spec)
        proc = wait_for(lambda: (p := apply_as_tenant(cluster, tenants, manifest)).returncode != 0
                        and rule in p.stderr and p, f"{field} refused under the widened params")
        assert refused_with(proc, field, rule), proc.stderr

    def test_a_job_admitted_before_a_narrowing_keeps_its_metadata_updates(
            self, cluster: Any, tenants: Tenants, widened: Callable[[], None]) -> None:
        """kopf patches annotations of every job; a policy narrowed later must not block that, only a
        new spec is checked again."""
        job = finetunejob("grandfathered", resources={"gpus": 0, "priorityClassName": "batch-low"})
        wait_for(lambda: kubectl_as(cluster, tenants.editor, "-n", tenants.a, "create", "-f", "-",
                                    input=yaml.safe_dump(job)).returncode == 0, "the job admitted under the entry")
        widened()  # back to the release's policy: batch-low is no longer allowed in the namespace
        spec_change = ["-n", tenants.a, "patch", "finetunejob", "grandfathered", "--type=merge",
                       "-p", '{"spec": {"backoffLimit": 2}}']
        refused = wait_for(lambda: refused_with(p := kubectl_as(cluster, tenants.editor, *spec_change),
                                                "spec.resources.priorityClassName") and p,
                           "the narrowed params in force")
        assert "allowedPriorityClasses: none" in refused.stderr
        annotated = kubectl_as(cluster, tenants.editor, "-n", tenants.a, "annotate", "finetunejob", "grandfathered",
                               "kubetune.io/note=x")
        assert annotated.returncode == 0, annotated.stderr
