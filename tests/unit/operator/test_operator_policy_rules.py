"""Escalation through the spec: what a tenant may ask the operator for (tolerations, node selectors,
priority classes, images, trustRemoteCode, generator models, writable claims), pod defaults, and the
reconcile's re-check (`Validated=False PolicyViolation`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, Observed
from kubetune.operator.platform import policy
from kubetune.operator.platform.policy import NamespaceLimits, PlatformPolicy, PolicyError
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
         "spec.serving.image", "allowedServingImages: none"),
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
                                 allowed_serving_images=("*",))
        spec = {"resources": {"tolerations": [{"operator": "Exists"}], "nodeSelector": {"a": "b"},
                              "priorityClassName": "high"},
                "model": {"source": "hf://o/m", "trustRemoteCode": True},
                "serving": {"image": "anything:1"}}
        assert spec_violations(spec, limits) == []

    def test_the_synthetic_generator_model_obeys_allowed_model_sources(self) -> None:
        limits = NamespaceLimits(allowed_model_sources=("pvc://*",))
        spec = {"dataset": {"train": {"source": "pvc://data/train.jsonl"},
                            "augmentation": {"synthetic": {"enabled": True, "model": "hf://someone/big-model",
                                                          "promptTemplate": "Rephrase: {text}"}}}}
        (found,) = spec_violations(spec, limits)
        assert found.startswith("spec.dataset.augmentation.synthetic.model: 'hf://someone/big-model'")
        assert "allowedModelSources: pvc://*" in found

    def test_only_listed_claims_may_be_written(self) -> None:
        limits = NamespaceLimits(writable_claims=("finetunes",))
        assert spec_violations({"output": {"storage": "pvc://finetunes/runs"}}, limits) == []
        (found,) = spec_violations({"output": {"storage": "pvc://billing-db/backup"}}, limits)
        assert found.startswith("spec.output.storage: claim 'billing-db' may not be written")
        assert "writableClaims: finetunes" in found


ATTACKER_IMAGE = "registry.example/tools/shell:latest"
"""Pushed by anyone who may push trainer tooling to the registry: a shell, not a model server."""


def split_images(**namespaces: dict[str, Any]) -> PlatformPolicy:
    """A platform that allows its whole registry for trainer tooling but only its serving folder for serving."""
    return policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.example/*"],
                                                 "allowedServingImages": ["registry.example/serving/*"]},
                                    "namespaces": namespaces})


def succeeded(make_job: MakeJob, **spec: Any) -> dict[str, Any]:
    return make_job(status={"conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingComplete",
                                            "message": "", "observedGeneration": 1, "lastTransitionTime": "x"}]},
                    **spec)


class TestServingImagesHaveTheirOwnList:
    """The attacker: a tenant who names, as its serving image, an image the platform allowed only
    under `allowedTrainerImages`. `spec.serving.image` answers to `allowedServingImages` alone."""

    def test_an_image_allowed_only_by_allowed_trainer_images_is_refused_naming_the_field_to_change(self) -> None:
        (found,) = spec_violations({"serving": {"enabled": True, "image": ATTACKER_IMAGE}},
                                   split_images().limits_for("team-a"))
        assert found.startswith(f"spec.serving.image: {ATTACKER_IMAGE!r} is not allowed in namespace team-a ")
        assert "allowedServingImages: registry.example/serving/*" in found  # the field, and what it allows
        assert "trainer:test, vllm/vllm-openai:v0.11.0" in found  # the operator's own, always allowed
        assert "leave spec.serving.image out" in found  # what the tenant can do
        assert "allowedTrainerImages" not in found  # it has no say here: naming it would mislead

    def test_what_allowed_serving_images_lists_and_the_operators_own_images_pass(self) -> None:
        limits = split_images().limits_for("team-a")
        for image in ("registry.example/serving/vllm:0.11", "trainer:test", "vllm/vllm-openai:v0.11.0"):
            assert spec_violations({"serving": {"enabled": True, "image": image}}, limits) == [], image

    def test_reconcile_fails_such_a_job_before_anything_runs(self, make_job: MakeJob,
                                                             settings: OperatorSettings) -> None:
        job = make_job(serving={"enabled": True, "image": ATTACKER_IMAGE})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, split_images())
        assert decision.actions == ()
        validated = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
        assert validated is not None and (validated["status"], validated["reason"]) == ("False", "PolicyViolation")
        assert "allowedServingImages: registry.example/serving/*" in validated["message"]

    def test_reconcile_does_not_deploy_it_for_a_trained_model(self, make_job: MakeJob,
                                                              settings: OperatorSettings) -> None:
        """The image set (or the policy narrowed) after training: serving is refused, not deployed."""
        job = succeeded(make_job, serving={"enabled": True, "image": ATTACKER_IMAGE})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, split_images())
        assert not [a for a in decision.actions if isinstance(a, CreateChild)]
        serving = conditions.find(decision.status_patch["conditions"], conditions.SERVING_READY)
        assert serving is not None and (serving["status"], serving["reason"]) == ("False", "ImageNotAllowed")
        message = serving["message"]
        assert message.startswith(f"spec.serving.image: {ATTACKER_IMAGE!r} is not allowed in namespace team-a ")
        assert "allowedServingImages: registry.example/serving/*" in message
        assert "trainer:test" in message and "leave spec.serving.image out" in message
        assert "allowedTrainerImages" not in message

    def test_a_namespace_entry_governs_its_namespace(self) -> None:
        platform = split_images(**{"team-b": {"allowedServingImages": ["registry.example/tools/*"]}})
        assert platform.limits_for("team-b").image_allowed(ATTACKER_IMAGE)
        assert not platform.limits_for("team-a").image_allowed(ATTACKER_IMAGE)


class TestAllowedTrainerImagesIsDeprecated:
    """No FineTuneJob field names a trainer image, so `allowedTrainerImages` governs nothing of its own.
    A policy written before `allowedServingImages` existed keeps serving what it served, with a warning."""

    def test_without_allowed_serving_images_it_still_governs_serving_with_a_warning(self) -> None:
        platform = policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.corp/*"]}})
        limits = platform.limits_for("team-a")
        assert spec_violations({"serving": {"enabled": True, "image": "registry.corp/serve:1"}}, limits) == []
        (found,) = spec_violations({"serving": {"enabled": True, "image": "docker.io/evil:1"}}, limits)
        assert "allowedServingImages: not set" in found and "allowedTrainerImages: registry.corp/*" in found
        (warning,) = platform.deprecations
        assert warning.startswith("defaults.allowedTrainerImages: deprecated")
        assert "still governs spec.serving.image" in warning and "allowedServingImages" in warning

    def test_null_allowed_serving_images_is_not_set(self) -> None:
        """What a chart renders for a key it was told to leave unset."""
        platform = policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.corp/*"],
                                                         "allowedServingImages": None}})
        assert platform.limits_for("team-a").image_allowed("registry.corp/serve:1")

    def test_once_allowed_serving_images_is_set_it_alone_governs(self) -> None:
        platform = policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.corp/*"],
                                                         "allowedServingImages": []}})
        (found,) = spec_violations({"serving": {"enabled": True, "image": "registry.corp/serve:1"}},
                                   platform.limits_for("team-a"))
        assert "allowedServingImages: none" in found
        (warning,) = platform.deprecations
        assert warning.startswith("defaults.allowedTrainerImages: ignored")

    def test_per_namespace_the_entry_that_sets_allowed_serving_images_is_not_widened_by_the_defaults(self) -> None:
        platform = policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.corp/*"]},
                                            "namespaces": {"locked": {"allowedServingImages": []}}})
        assert not platform.limits_for("locked").image_allowed("registry.corp/serve:1")
        assert platform.limits_for("team-a").image_allowed("registry.corp/serve:1")  # the defaults' fallback

    def test_a_policy_without_it_warns_of_nothing(self) -> None:
        for defaults in ({}, {"allowedServingImages": ["registry.corp/*"]}, {"allowedTrainerImages": []}):
            assert policy.policy_from_dict({"defaults": defaults}).deprecations == (), defaults

    def test_the_operator_logs_each_warning_at_start_up(self, caplog: pytest.LogCaptureFixture) -> None:
        from kubetune.operator.jobs import handlers

        platform = policy.policy_from_dict({"defaults": {"allowedTrainerImages": ["registry.corp/*"]}})
        with caplog.at_level("WARNING", logger=handlers.__name__):
            handlers.log_policy_deprecations(platform)
        (record,) = caplog.records
        assert record.levelname == "WARNING" and "defaults.allowedTrainerImages: deprecated" in record.getMessage()


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
