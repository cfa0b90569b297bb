"""What the chart renders for multi-tenant security: the admission policy's params (the platform
policy in a form CEL can read), the policy and its binding, and the NetworkPolicies."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from kubetune.dev import chart
from kubetune.operator.platform import policy

Render = Callable[..., list[dict[str, Any]]]


def params(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = chart.find(manifests, "ConfigMap", "kubetune-admission-params")
    return dict(config_map["data"])


class TestAdmissionPolicy:
    def test_binds_the_policy_to_its_params_and_denies_without_them(self, render: Render) -> None:
        manifests = render()
        (vap,) = chart.find(manifests, "ValidatingAdmissionPolicy")
        (binding,) = chart.find(manifests, "ValidatingAdmissionPolicyBinding")
        assert binding["spec"]["policyName"] == vap["metadata"]["name"]
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert binding["spec"]["paramRef"] == {"name": "kubetune-admission-params", "namespace": "kubetune-system",
                                               "parameterNotFoundAction": "Deny"}
        assert vap["spec"]["paramKind"] == {"apiVersion": "v1", "kind": "ConfigMap"}
        assert vap["spec"]["failurePolicy"] == "Fail"
        fields = [re.match(r"'([a-zA-Z.]+)", v["messageExpression"]).group(1)  # type: ignore[union-attr]
                  for v in vap["spec"]["validations"]]
        assert fields == ["spec.resources.tolerations", "spec.resources.nodeSelector",
                          "spec.resources.priorityClassName", "spec.credentials.serviceAccountName",
                          "spec.model.trustRemoteCode", "spec.model.source",
                          "spec.dataset.augmentation.synthetic.model", "spec.output.storage", "spec.serving.image"]

    def test_params_hold_every_scope_complete_with_globs_as_anchored_regexes(self, render: Render) -> None:
        manifests = render({"policy": {
            "defaults": {"allowedModelSources": ["pvc://*", "hf://org/*"], "allowedTolerations": ["dedicated"]},
            "namespaces": {"team-a": {"allowedServingImages": ["registry.example/*"], "allowTrustRemoteCode": True}}}})
        data = params(manifests)
        assert data["defaults.allowedTolerations"] == ",dedicated,"
        assert data["ns.team-a.allowedTolerations"] == ",dedicated,"  # taken from defaults
        assert data["defaults.allowTrustRemoteCode"] == "false" and data["ns.team-a.allowTrustRemoteCode"] == "true"
        sources = re.compile(data["ns.team-a.allowedModelSources"])
        assert sources.match("hf://org/model") and sources.match("pvc://models/base")
        assert not sources.match("hf://other/model") and not sources.match("xpvc://models")
        images = re.compile(data["ns.team-a.allowedServingImages"])
        assert images.match("registry.example/serve:1") and images.match("ghcr.io/kubetune/trainer:0.1.0")
        assert not images.match("ghcr.io/kubetune/trainerX0.1.0")  # dots are literal
        assert not re.compile(data["defaults.allowedServingImages"]).match("registry.example/serve:1")

    def test_a_serving_image_allowed_only_by_allowed_trainer_images_is_refused(self, render: Render) -> None:
        """The attacker names, as its serving image, one the platform allowed for trainer tooling only."""
        manifests = render({"policy": {"defaults": {"allowedTrainerImages": ["registry.example/*"],
                                                    "allowedServingImages": ["registry.example/serving/*"]}}})
        data = params(manifests)
        images = re.compile(data["defaults.allowedServingImages"])
        assert not images.match("registry.example/tools/shell:latest")
        assert images.match("registry.example/serving/vllm:0.11") and images.match("ghcr.io/kubetune/trainer:0.1.0")
        assert "registry.example/serving/*" in data["defaults.allowedServingImages.text"]
        assert not [key for key in data if "allowedTrainerImages" in key]  # it has no say at admission
        (vap,) = chart.find(manifests, "ValidatingAdmissionPolicy")
        (rule,) = [v for v in vap["spec"]["validations"] if "spec.serving.image" in v["messageExpression"]]
        assert "allowedServingImages" in rule["messageExpression"] and "allowedTrainerImages" not in rule["expression"]
        assert "leave spec.serving.image out" in rule["messageExpression"]

    def test_allowed_trainer_images_stands_in_only_where_allowed_serving_images_is_unset(self, render: Render) -> None:
        data = params(render({"policy": {"defaults": {"allowedTrainerImages": ["registry.corp/*"]},
                                         "namespaces": {"locked": {"allowedServingImages": []}}}}))
        assert re.compile(data["defaults.allowedServingImages"]).match("registry.corp/serve:1")
        assert "deprecated allowedTrainerImages" in data["defaults.allowedServingImages.text"]
        assert not re.compile(data["ns.locked.allowedServingImages"]).match("registry.corp/serve:1")

    def test_the_params_and_the_operators_policy_file_say_the_same(self, render: Render) -> None:
        values = {"policy": {"defaults": {"allowedPriorityClasses": ["batch-low"], "writableClaims": ["models"]},
                             "namespaces": {"team-a": {"allowedNodeSelectors": ["pool=gpu"],
                                                       "allowedServiceAccounts": ["trainer-identity"]}}}}
        manifests = render(values)
        operator_view = policy.policy_from_dict(yaml.safe_load(chart.policy_document(manifests)))
        data = params(manifests)
        for scope, limits in (("defaults.", operator_view.defaults), ("ns.team-a.", operator_view.limits_for("team-a"))):
            assert data[scope + "allowedPriorityClasses"] == "," + ",".join(limits.allowed_priority_classes) + ","
            assert data[scope + "allowedNodeSelectors"] == "," + ",".join(limits.allowed_node_selectors) + ","
            assert data[scope + "writableClaims"] == "," + ",".join(limits.writable_claims) + ","
            assert data[scope + "allowedServiceAccounts"] == "," + ",".join(limits.allowed_service_accounts) + ","

    @pytest.mark.parametrize("images", [
        {"defaults": {}},
        {"defaults": {"allowedServingImages": ["registry.example/serving/*"], "allowedTrainerImages": ["registry.example/*"]}},
        {"defaults": {"allowedTrainerImages": ["registry.corp/*"]}, "namespaces": {"team-a": {"allowedServingImages": []}}},
        {"defaults": {"allowedServingImages": ["registry.corp/*"]},
         "namespaces": {"team-a": {"allowedServingImages": None, "allowedTrainerImages": ["registry.example/*"]}}},
    ], ids=["unset", "split", "legacy-defaults-locked-namespace", "namespace-unsets-it"])
    def test_admission_and_the_operator_allow_the_same_serving_images(self, render: Render,
                                                                      images: dict[str, Any]) -> None:
        manifests = render({"policy": {"namespaces": {"team-a": {}}, **images}})
        operator_view = policy.policy_from_dict(yaml.safe_load(chart.policy_document(manifests)))
        data = params(manifests)
        own = ("ghcr.io/kubetune/trainer:0.1.0", "vllm/vllm-openai:v0.11.0")
        for scope, limits in (("defaults.", operator_view.defaults), ("ns.team-a.", operator_view.limits_for("team-a"))):
            regex = re.compile(data[scope + "allowedServingImages"])
            for image in (*own, "registry.example/serving/vllm:1", "registry.example/tools/shell:1",
                          "registry.corp/serve:1", "docker.io/attacker/shell:latest"):
                assert bool(regex.match(image)) == limits.image_allowed(image, own), (scope, image)

    def test_it_can_be_left_out(self, render: Render) -> None:
        manifests = render({"admissionPolicy": {"enabled": False}})
        assert chart.find(manifests, "ValidatingAdmissionPolicy") == []
        assert chart.find(manifests, "ConfigMap", "kubetune-admission-params") == []


class TestNetworkPolicies:
    def test_the_operator_policy_by_default_and_serving_policies_per_tenant_namespace(self, render: Render) -> None:
        assert [p["metadata"]["name"] for p in chart.find(render(), "NetworkPolicy")] == ["kubetune-operator"]
        manifests = render({"watchNamespaces": ["team-a", "team-b"],
                            "networkPolicies": {"servingFromNamespaces": ["gateway"]}})
        serving = [p for p in chart.find(manifests, "NetworkPolicy") if p["metadata"]["name"] == "kubetune-serving"]
        assert sorted(p["metadata"]["namespace"] for p in serving) == ["team-a", "team-b"]
        assert serving[0]["spec"]["ingress"][0]["from"] == [
            {"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
        listed = render({"networkPolicies": {"namespaces": ["team-c"]}})
        assert [p["metadata"].get("namespace") for p in chart.find(listed, "NetworkPolicy")
                if p["metadata"]["name"] == "kubetune-serving"] == ["team-c"]
        assert chart.find(render({"networkPolicies": {"enabled": False}}), "NetworkPolicy") == []
