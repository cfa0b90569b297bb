"""Escalation through the spec: what a tenant may ask the operator for (tolerations, node selectors,
priority classes, images, trustRemoteCode, generator models, writable claims), pod defaults, and the
reconcile's re-check (`Validated=False PolicyViolation`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import builders, conditions, policy, reconcile, render
from kubetune.operator.policy import NamespaceLimits, PlatformPolicy, PolicyError
from kubetune.operator.reconcile import CreateChild, Observed
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]
DEFAULT_LIMITS = NamespaceLimits()
OWN = ("trainer:test", "vllm/vllm-openai:v0.11.0")


BASE_SPEC = {"model": {"source": "pvc://models/base/gpt2"}, "dataset": {"train": {"source": "pvc://data/train.jsonl"}},
             "output": {"storage": "pvc://models/finetunes"}}


def spec_violations(spec: dict[str, Any], limits: NamespaceLimits = DEFAULT_LIMITS) -> list[str]:
    """The violations of a spec with these sections (a plain one's for the rest), as the reconcile checks them."""
    return policy.violations(FineTuneJobSpec.from_dict({**BASE_SPEC, **spec}), limits, "team-a", OWN)


class TestTheDefaultsAllowNothingATenantCouldNotDoItself:
    @pytest.mark.parametrize(("spec", "field", "rule"), [
        ({"resources": {"tolerations": [{"operator": "Exists"}]}},
         "spec.resources.tolerations[0]", "allowedTolerations: none"),
        ({"resources": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]}},
         "spec.resources.tolerations[0]", "allowedTolerations: none"),
        ({"resources": {"nodeSelector": {"kubernetes.io/hostname": "control-plane-1"}}},
         "spec.resources.nodeSelector[kubernetes.io/hostname]", "allowedNodeSelectors: none"),
        ({"resources": {"priorityClassName": "system-node-critical"}},
         "spec.resources.priorityClassName", "allowedPriorityClasses: none"),
        ({"model": {"source": "hf://org/model", "trustRemoteCode": True}},
         "spec.model.trustRemoteCode", "allowTrustRemoteCode: false"),
        ({"serving": {"enabled": True, "image": "docker.io/attacker/shell:latest"}},
         "spec.serving.image", "allowedTrainerImages: none"),
    ])
    def test_each_escalation_is_refused_naming_field_and_rule(self, spec: dict[str, Any], field: str,
                                                              rule: str) -> None:
        found = spec_violations(spec)
        assert len(found) == 1
        assert found[0].startswith(f"{field}: ")
        assert rule in found[0] and "team-a" in found[0]

    def test_the_operators_own_images_are_always_allowed(self) -> None:
        assert spec_violations({"serving": {"image": "trainer:test"}}) == []
        assert spec_violations({"serving": {"image": "vllm/vllm-openai:v0.11.0", "runtime": "vllm"}}) == []

    def test_a_plain_spec_passes(self, make_job: MakeJob) -> None:
        assert spec_violations(make_job()["spec"]) == []


class TestWhatThePolicyAllows:
    def test_tolerations_by_key_or_key_and_effect(self) -> None:
        limits = NamespaceLimits(allowed_tolerations=("dedicated", "spot:NoSchedule"))
        allowed = [{"key": "dedicated", "operator": "Exists"},
                   {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec_violations({"resources": {"tolerations": allowed}}, limits) == []
        for bad in ({"key": "spot", "operator": "Exists"},  # every effect of `spot`, NoExecute included
                    {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
                    {"operator": "Exists"}):
            assert spec_violations({"resources": {"tolerations": [bad]}}, limits), bad

    def test_node_selectors_by_label_and_value(self) -> None:
        limits = NamespaceLimits(allowed_node_selectors=("pool=training", "gpu.example.com/type=*"))
        assert spec_violations({"resources": {"nodeSelector": {"pool": "training",
                                                               "gpu.example.com/type": "h100"}}}, limits) == []
        assert spec_violations({"resources": {"nodeSelector": {"pool": "system"}}}, limits)

    def test_a_star_allows_anything(self) -> None:
        limits = NamespaceLimits(allowed_tolerations=("*",), allowed_node_selectors=("*",),
                                 allowed_priority_classes=("*",), allow_trust_remote_code=True,
                                 allowed_trainer_images=("*",))
        spec = {"resources": {"tolerations": [{"operator": "Exists"}], "nodeSelector": {"a": "b"},
                              "priorityClassName": "high"},
                "model": {"source": "hf://o/m", "trustRemoteCode": True},
                "serving": {"image": "anything:1"}}
        assert spec_violations(spec, limits) == []

    def test_the_synthetic_generator_model_obeys_allowed_model_sources(self) -> None:
        limits = NamespaceLimits(allowed_model_sources=("pvc://*",))
        spec = {"dataset": {"train": {"source": "pvc://data/train.jsonl"},
                            "augmentation": {"synthetic": {"enabled": True, "model": "hf://someone/big-model"}}}}
        (found,) = spec_violations(spec, limits)
        assert found.startswith("spec.dataset.augmentation.synthetic.model: 'hf://someone/big-model'")
        assert "allowedModelSources: pvc://*" in found

    def test_only_listed_claims_may_be_written(self) -> None:
        limits = NamespaceLimits(writable_claims=("finetunes",))
        assert spec_violations({"output": {"storage": "pvc://finetunes/runs"}}, limits) == []
        (found,) = spec_violations({"output": {"storage": "pvc://billing-db/backup"}}, limits)
        assert found.startswith("spec.output.storage: claim 'billing-db' may not be written")
        assert "writableClaims: finetunes" in found


class TestThePolicyFile:
    def test_the_new_rules_are_read_per_namespace(self) -> None:
        loaded = policy.policy_from_dict({
            "defaults": {"allowedTolerations": ["dedicated"], "writableClaims": ["models"],
                         "defaultCpu": "2", "defaultMemory": "8Gi", "scratchSizeLimit": "20Gi"},
            "namespaces": {"team-gpu": {"allowedPriorityClasses": ["high"], "allowTrustRemoteCode": True}}})
        team = loaded.limits_for("team-gpu")
        assert team.allowed_priority_classes == ("high",) and team.allow_trust_remote_code
        assert team.allowed_tolerations == ("dedicated",) and team.writable_claims == ("models",)
        assert (team.default_cpu, team.default_memory, team.scratch_size_limit) == ("2", "8Gi", "20Gi")

    def test_bad_values_are_named(self) -> None:
        with pytest.raises(PolicyError) as raised:
            policy.policy_from_dict({"defaults": {"allowTrustRemoteCode": "yes", "defaultMemory": "lots",
                                                  "allowedTolerations": "dedicated"}})
        text = str(raised.value)
        assert "defaults.allowTrustRemoteCode: must be true or false" in text
        assert "defaults.defaultMemory: must be a Kubernetes quantity" in text
        assert "defaults.allowedTolerations: must be a list" in text


class TestReconcileReChecks:
    def test_a_forbidden_spec_fails_with_policy_violation_before_anything_is_created(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(resources={"gpus": 1, "tolerations": [{"operator": "Exists"}],
                                  "priorityClassName": "system-cluster-critical"})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, PlatformPolicy())
        assert decision.actions == ()
        validated = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
        assert validated is not None and validated["status"] == "False"
        assert validated["reason"] == "PolicyViolation"
        assert "spec.resources.tolerations[0]" in validated["message"]
        assert "spec.resources.priorityClassName" in validated["message"]
        assert conditions.is_true(decision.status_patch["conditions"], conditions.FAILED)

    def test_a_running_trainer_is_not_stopped_by_a_later_policy(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        job = make_job(resources={"gpus": 1, "priorityClassName": "high"})
        running = builders.trainer_job(job, typed(job), render.trainer_config_for(job), settings)
        decision = reconcile.reconcile(Observed(job=job, now=NOW, trainer_job=running), settings, PlatformPolicy())
        validated = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
        assert validated is not None and validated["reason"] != "PolicyViolation"

    def test_an_allowed_spec_goes_ahead(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(resources={"gpus": 1, "priorityClassName": "high"})
        allowed = PlatformPolicy(namespaces={"team-a": NamespaceLimits(allowed_priority_classes=("high",))})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, allowed)
        kinds = sorted(a.manifest["kind"] for a in decision.actions if isinstance(a, CreateChild))
        assert kinds == ["ConfigMap", "Job", "Secret"]


class TestPodsTheOperatorBuilds:
    def test_only_the_output_claim_is_mounted_writable_and_validation_writes_nothing(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(model={"source": "pvc://base-models/gpt2"}, output={"storage": "pvc://finetunes/out"},
                       dataset={"format": "text", "train": {"source": "pvc://data/train.jsonl"}})
        rendered = render.trainer_config_for(job)
        trainer = builders.trainer_job(job, typed(job), rendered, settings)["spec"]["template"]["spec"]
        mounts = {m["name"]: m.get("readOnly", False) for m in trainer["containers"][0]["volumeMounts"]}
        assert mounts == {"trainer-config": True, "scratch": False, "pvc-base-models": True, "pvc-data": True,
                          "pvc-finetunes": False}
        validation = builders.validation_job(job, typed(job), rendered, settings)["spec"]["template"]["spec"]
        claims = [m for m in validation["containers"][0]["volumeMounts"] if m["name"].startswith("pvc-")]
        assert claims and all(m["readOnly"] for m in claims)

    def test_containers_without_resources_get_the_policys_defaults(self, make_job: MakeJob,
                                                                   settings: OperatorSettings) -> None:
        limits = NamespaceLimits(default_cpu="2", default_memory="8Gi")
        job = make_job(resources={"gpus": 0}, serving={"enabled": True})
        rendered = render.trainer_config_for(job)
        trainer = builders.trainer_job(job, typed(job), rendered, settings, limits=limits)
        assert trainer["spec"]["template"]["spec"]["containers"][0]["resources"] == {
            "requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
        serving = builders.serving_deployment(job, typed(job), render.model_location(job), "sha256:x", settings, limits)
        assert serving["spec"]["template"]["spec"]["containers"][0]["resources"] == {
            "requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
        # What the tenant sets wins.
        own = make_job(resources={"gpus": 0, "cpu": "500m", "memory": "1Gi"})
        assert builders.trainer_resources(typed(own), limits) == {
            "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}

    def test_the_scratch_volume_has_a_size_limit(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(serving={"enabled": True})
        rendered = render.trainer_config_for(job)
        limits = NamespaceLimits(scratch_size_limit="20Gi")
        spec = typed(job)
        for pod in (builders.trainer_job(job, spec, rendered, settings, limits=limits)["spec"]["template"]["spec"],
                    builders.validation_job(job, typed(job), rendered, settings, limits)["spec"]["template"]["spec"],
                    builders.serving_deployment(job, typed(job), render.model_location(job), "", settings,
                                                limits)["spec"]["template"]["spec"]):
            scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
            assert scratch["emptyDir"] == {"sizeLimit": "20Gi"}
        default = builders.trainer_job(job, typed(job), rendered, settings)["spec"]["template"]["spec"]["volumes"]
        assert next(v for v in default if v["name"] == "scratch")["emptyDir"] == {"sizeLimit": "64Gi"}
