"""The chart's NetworkPolicies select what they mean to, checked by the API server against real objects.

No CNI runs here, so nothing enforces them (docs/install.md says so); what can be tested is that
each selector, evaluated by the API server, picks exactly the intended pods and namespaces: the
serving policy the serving pods (not the trainer's), the operator policy the operator pod, its
report rule the trainer pods of any namespace, its metrics rule the monitoring namespace.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.dev import chart
from kubetune.operator.jobs import builders, render
from kubetune.operator.settings import OperatorSettings

from tests.integration.chart.conftest import Release, finetunejob, restricted_namespace, wait_for


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


def selector(match_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def pod_names(cluster: Any, label_selector: str, namespace: str | None = None) -> set[str]:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    pods = json.loads(cluster.kubectl("get", "pods", *scope, "-l", label_selector, "-o", "json").stdout)["items"]
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pods}


def namespace_names(cluster: Any, match_labels: dict[str, str]) -> set[str]:
    found = json.loads(cluster.kubectl("get", "namespaces", "-l", selector(match_labels), "-o", "json").stdout)
    return {n["metadata"]["name"] for n in found["items"]}


def without_owner(manifest: dict[str, Any]) -> dict[str, Any]:
    """The test has no FineTuneJob behind these children: no owner, or the garbage collector takes them."""
    manifest["metadata"].pop("ownerReferences", None)
    return manifest


@pytest.fixture(scope="module")
def scene(cluster: Any, helm_bin: Path, release: Release) -> Iterator[dict[str, Any]]:
    suffix = secrets.token_hex(3)
    tenant, gateway, monitoring = f"np-tenant-{suffix}", f"np-gateway-{suffix}", f"np-monitoring-{suffix}"
    for namespace in (tenant, gateway, monitoring):
        restricted_namespace(cluster, namespace)
    values = {"networkPolicies": {"namespaces": [tenant], "servingFromNamespaces": [gateway],
                                  "monitoringNamespace": monitoring}}
    policies = chart.find(chart.render(helm_bin, values, namespace=release.namespace), "NetworkPolicy")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(policies))

    job = finetunejob("np-job", serving={"enabled": True})
    job["metadata"] |= {"namespace": tenant, "uid": "00000000-0000-0000-0000-000000000000"}
    settings = OperatorSettings(trainer_image="kubetune-trainer:test")
    rendered = render.trainer_config_for(job)
    children = [without_owner(builders.trainer_configmap(job, rendered)),
                without_owner(builders.trainer_job(job, typed(job), rendered, settings)),
                without_owner(builders.serving_deployment(job, typed(job), render.model_location(job), "sha256:x",
                                                          settings))]
    cluster.kubectl("-n", tenant, "apply", "-f", "-", input=yaml.safe_dump_all(children))
    wait_for(lambda: len(pod_names(cluster, "app.kubernetes.io/instance=np-job", tenant)) == 2,
             "the trainer and serving pods")
    yield {"tenant": tenant, "gateway": gateway, "monitoring": monitoring, "policies": policies}
    for namespace in (tenant, gateway, monitoring):
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def pods_of(cluster: Any, namespace: str, component: str) -> set[str]:
    return pod_names(cluster, f"app.kubernetes.io/instance=np-job,app.kubernetes.io/component={component}",
                     namespace)


def test_the_serving_policy_selects_serving_pods_from_their_namespace_and_the_gateway(
        cluster: Any, scene: dict[str, Any]) -> None:
    serving = next(p for p in scene["policies"] if p["metadata"]["namespace"] == scene["tenant"])
    selected = pod_names(cluster, selector(serving["spec"]["podSelector"]["matchLabels"]), scene["tenant"])
    assert selected == pods_of(cluster, scene["tenant"], "serving") != set()
    (rule,) = serving["spec"]["ingress"]
    assert rule["ports"] == [{"port": builders.SERVING_PORT, "protocol": "TCP"}]
    peers = rule["from"]
    assert {"podSelector": {}} in peers  # every pod of the job's own namespace (no namespaceSelector)
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in peers if "namespaceSelector" in p]
    assert set().union(*(namespace_names(cluster, labels) for labels in namespaces)) == {scene["gateway"]}


def test_the_operator_policy_admits_trainer_pods_and_the_monitoring_namespace_only(
        cluster: Any, release: Release, scene: dict[str, Any]) -> None:
    operator = next(p for p in scene["policies"] if p["metadata"]["namespace"] == release.namespace)
    deployment = chart.find(release.manifests, "Deployment")[0]
    assert operator["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert operator["spec"]["podSelector"]["matchLabels"].items() <= template_labels.items()
    reports, metrics = operator["spec"]["ingress"]
    (trainers,) = reports["from"]
    assert trainers["namespaceSelector"] == {}  # trainer pods of any namespace
    selected = pod_names(cluster, selector(trainers["podSelector"]["matchLabels"]))
    assert pods_of(cluster, scene["tenant"], "trainer") <= selected
    assert not pods_of(cluster, scene["tenant"], "serving") & selected
    (monitoring,) = metrics["from"]
    assert namespace_names(cluster, monitoring["namespaceSelector"]["matchLabels"]) == {scene["monitoring"]}
    assert reports["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # The named ports exist on the operator's container: a NetworkPolicy naming a port the pod
    # does not declare would select nothing.
    declared = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"http", "metrics"} <= declared
