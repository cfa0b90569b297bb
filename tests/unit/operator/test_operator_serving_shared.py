"""`spec.serving.shareWith`: a LoRA job served by another job's serving Deployment of the same base.

The guest gets no serving objects of its own; the host's reconcile lists the guest's adapter in
the ConfigMap `<host>-serving-adapters`, which the builtin server's pods mount and re-read (the
adapter is loaded without a restart); vLLM gets it as one more `--lora-modules` entry. The
guest's status says where it is served (`servedBy`, `endpoint`). What cannot work is refused
with a `ServingReady` condition naming `spec.serving.shareWith`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed, PatchChild
from kubetune.operator.settings import OperatorSettings

MakeJob = Callable[..., dict[str, Any]]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
UNMERGED = {"type": "lora", "lora": {"merge": False}}
SUCCEEDED = {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
             "observedGeneration": 1, "lastTransitionTime": "2026-03-01T11:00:00Z"}
HOST_READY = {"type": "ServingReady", "status": "True", "reason": "ServingAvailable",
              "message": "1/1 serving replicas available", "observedGeneration": 1,
              "lastTransitionTime": "2026-03-01T11:05:00Z"}


def job(make_job: MakeJob, name: str, *, method: Any = UNMERGED, ready: bool = True, **serving: Any) -> dict[str, Any]:
    """A succeeded job named `name` with serving enabled (plus `serving`)."""
    status = {"conditions": [SUCCEEDED, *([HOST_READY] if ready else [])],
              "model": {"uri": f"pvc://models/finetunes/{name}/adapter", "digest": "sha256:" + "1" * 64}}
    body = make_job(status=status, method=copy.deepcopy(method), serving={"enabled": True, **serving})
    body["metadata"]["name"] = name
    return body


def serving_condition(decision: reconcile.Decision) -> dict[str, Any]:
    found = conditions.find(decision.status_patch["conditions"], conditions.SERVING_READY)
    assert found is not None
    return dict(found)


def guest_decision(guest: dict[str, Any], host: dict[str, Any] | None,
                   settings: OperatorSettings) -> reconcile.Decision:
    return reconcile.reconcile(Observed(job=guest, now=NOW, serving_host=host), settings)


class TestTheGuest:
    def test_it_is_served_by_the_hosts_deployment_and_creates_no_serving_objects(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        host, guest = job(make_job, "job-a"), job(make_job, "job-b", shareWith="job-a")
        decision = guest_decision(guest, host, settings)
        assert decision.actions == ()
        assert decision.status_patch["servedBy"] == "job-a-serving"
        assert decision.status_patch["endpoint"] == "http://job-a-serving.team-a.svc.cluster.local:8000"
        found = serving_condition(decision)
        assert (found["status"], found["reason"]) == ("True", "SharedServing")
        assert "served as model 'job-b' by Deployment job-a-serving" in found["message"]
        assert "ConfigMap job-a-serving-adapters" in found["message"]

    def test_it_waits_while_the_hosts_serving_is_not_available(self, make_job: MakeJob,
                                                               settings: OperatorSettings) -> None:
        host, guest = job(make_job, "job-a", ready=False), job(make_job, "job-b", shareWith="job-a")
        found = serving_condition(guest_decision(guest, host, settings))
        assert (found["status"], found["reason"]) == ("False", "WaitingForServingHost")
        assert "the serving of 'job-a' is not available" in found["message"]

    def test_its_own_deployment_and_service_go_when_it_starts_sharing(self, make_job: MakeJob,
                                                                      settings: OperatorSettings) -> None:
        host, guest = job(make_job, "job-a"), job(make_job, "job-b", shareWith="job-a")
        own = {"metadata": {"name": "job-b-serving"}}
        observed = Observed(job=guest, now=NOW, serving_host=host, serving_deployment=own, serving_service=own)
        decision = reconcile.reconcile(observed, settings)
        assert decision.actions == (DeleteChild("apps/v1", "Deployment", "job-b-serving"),
                                    DeleteChild("v1", "Service", "job-b-serving"))

    @pytest.mark.parametrize(("host_changes", "guest_changes", "reason", "wanted"), [
        ({}, {"name": "job-a"}, "ServingInvalid", "names this job itself"),
        (None, {}, "WaitingForServingHost", "there is no FineTuneJob 'job-a' in namespace 'team-a'"),
        ({"model": {"source": "pvc://models/base/other"}}, {}, "ServingInvalid",
         "'job-a' is trained on base model 'pvc://models/base/other' and this job on 'pvc://models/base/gpt2'"),
        ({"method": {"type": "lora", "lora": {"merge": True}}}, {}, "ServingInvalid",
         "'job-a' serves a merged or fully fine-tuned model, not the base model"),
        ({"method": {"type": "full"}}, {}, "ServingInvalid", "'job-a' serves a merged or fully fine-tuned model"),
        ({"serving": {"enabled": False}}, {}, "ServingInvalid", "'job-a' has spec.serving.enabled false"),
        ({"serving": {"enabled": True, "shareWith": "job-c"}}, {}, "ServingInvalid",
         "'job-a' itself shares the serving of 'job-c'"),
        ({}, {"output": {"storage": "pvc://other-claim/out"}}, "ServingInvalid",
         "this job's adapter is on claim(s) other-claim, which the serving pods of 'job-a' do not mount "
         "(they mount models)"),
    ])
    def test_what_cannot_work_is_refused_naming_the_field(
            self, make_job: MakeJob, settings: OperatorSettings, host_changes: dict[str, Any] | None,
            guest_changes: dict[str, Any], reason: str, wanted: str) -> None:
        host = job(make_job, "job-a")
        guest = job(make_job, "job-b", shareWith="job-a")
        if "name" in guest_changes:
            guest["metadata"]["name"] = guest_changes.pop("name")
        guest["spec"].update(guest_changes)
        if host_changes is not None:
            host["spec"].update(host_changes)
        decision = guest_decision(guest, None if host_changes is None else host, settings)
        found = serving_condition(decision)
        assert (found["status"], found["reason"]) == ("False", reason)
        assert found["message"].startswith("spec.serving.shareWith: ") and wanted in found["message"], found["message"]
        assert "servedBy" not in decision.status_patch and decision.actions == ()


    def test_a_merged_guest_does_not_even_parse(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        """The spec's own rule (the API server's CEL and its Python twin): shareWith needs merge: false. A guest
        written past the API server's check is refused by the operator's parse, naming the field."""
        guest = job(make_job, "job-b", method={"type": "lora", "lora": {"merge": True}}, shareWith="job-a")
        decision = guest_decision(guest, job(make_job, "job-a"), settings)
        found = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
        assert found is not None and (found["status"], found["reason"]) == ("False", "InvalidSpec")
        assert "spec.serving.shareWith: serving.shareWith loads this job's LoRA adapter" in found["message"]
        assert "servedBy" not in decision.status_patch and decision.actions == ()


def adapters_in(config_map: dict[str, Any]) -> list[dict[str, str]]:
    return list(json.loads(config_map["data"]["adapters.json"])["adapters"])


class TestTheHost:
    def host_decision(self, host: dict[str, Any], guests: tuple[dict[str, Any], ...], settings: OperatorSettings,
                      config_map: dict[str, Any] | None = None) -> reconcile.Decision:
        key = {"metadata": {"name": "job-a-serving-key", "annotations": {"kubetune.io/api-key-digest": "k1"}}}
        return reconcile.reconcile(Observed(job=host, now=NOW, serving_guests=guests, serving_key_secret=key,
                                            serving_adapters_config_map=config_map), settings)

    def test_the_builtin_servers_pods_reread_a_configmap_listing_the_guests_adapters(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        host = job(make_job, "job-a")
        guests = (job(make_job, "job-b", shareWith="job-a"),
                  job(make_job, "job-c", shareWith="job-a", method={"type": "full"}),  # not an adapter: left out
                  {**job(make_job, "job-d", shareWith="job-a"), "status": {}})  # not finished: left out
        decision = self.host_decision(host, guests, settings)
        created = [a.manifest for a in decision.actions if isinstance(a, CreateChild)]
        config_map = next(m for m in created if m["kind"] == "ConfigMap")
        assert config_map["metadata"]["name"] == "job-a-serving-adapters"
        assert adapters_in(config_map) == [{"name": "job-b", "path": "/mnt/pvc/models/finetunes/job-b/adapter"}]
        deployment = next(m for m in created if m["kind"] == "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]
        assert command[command.index("--adapter-config") + 1] == "/etc/kubetune/adapters/adapters.json"
        assert {"name": "serving-adapters", "configMap": {"name": "job-a-serving-adapters", "optional": True}} \
            in pod["volumes"]

        # A new guest changes the ConfigMap only: the Deployment (and its pods) stay as they are.
        without = self.host_decision(host, (), settings)
        assert [m for m in (a.manifest for a in without.actions if isinstance(a, CreateChild))
                if m["kind"] == "Deployment"] == [deployment]
        stored = {**builders.serving_adapters_config_map(host, []), "metadata": {"name": "job-a-serving-adapters"}}
        patched = self.host_decision(host, guests[:1], settings, config_map=stored)
        assert PatchChild("v1", "ConfigMap", "job-a-serving-adapters", {"data": config_map["data"]}) \
            in patched.actions

    def test_vllm_gets_the_guests_as_more_lora_modules(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        vllm = {"runtime": "vllm", "resources": {"gpus": 1}}
        host = job(make_job, "job-a", **vllm)
        decision = self.host_decision(host, (job(make_job, "job-b", shareWith="job-a"),), settings)
        deployment = next(a.manifest for a in decision.actions
                          if isinstance(a, CreateChild) and a.manifest["kind"] == "Deployment")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        start = args.index("--lora-modules")
        assert args[start + 1:start + 3] == ["job-a=/mnt/pvc/models/finetunes/job-a/adapter",
                                             "job-b=/mnt/pvc/models/finetunes/job-b/adapter"]
        assert not [a for a in decision.actions if isinstance(a, CreateChild) and a.manifest["kind"] == "ConfigMap"]

    def test_a_merged_model_gets_no_adapter_config(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        host = job(make_job, "job-a", method={"type": "lora"})
        decision = self.host_decision(host, (), settings)
        kinds = [a.manifest["kind"] for a in decision.actions if isinstance(a, CreateChild)]
        assert "ConfigMap" not in kinds
        deployment = next(a.manifest for a in decision.actions
                          if isinstance(a, CreateChild) and a.manifest["kind"] == "Deployment")
        assert "--adapter-config" not in deployment["spec"]["template"]["spec"]["containers"][0]["command"]
