"""Serving a LoRA adapter saved unmerged (`method.lora.merge: false`): the server gets the adapter and its base.

The trainer writes `<output>/adapter` in that case, never `<output>/model` (trainer/evaluation/outputs.py);
a Deployment pointed at `<output>/model` crash-loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator.jobs import builders, render
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


MakeJob = Callable[..., dict[str, Any]]
ADAPTER_DIR = "/mnt/pvc/models/finetunes/demo/adapter"
BASE_DIR = "/mnt/pvc/models/base/gpt2"


def unmerged(make_job: MakeJob, **serving: Any) -> dict[str, Any]:
    return make_job(method={"type": "lora", "lora": {"merge": False}}, serving={"enabled": True, **serving})


def container(job: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    manifest = builders.serving_deployment(job, typed(job), render.model_location(job), "sha256:" + "0" * 64, settings)
    return dict(manifest["spec"]["template"]["spec"]["containers"][0])


class TestWhereTheModelIs:
    def test_an_unmerged_adapter_is_served_from_the_adapter_folder_on_its_base(self, make_job: MakeJob) -> None:
        location = render.model_location(unmerged(make_job))
        assert location == render.ModelLocation(uri="pvc://models/finetunes/demo/adapter", path=ADAPTER_DIR,
                                                claims=("models",), base_path=BASE_DIR)

    def test_the_status_model_uri_names_the_adapter_folder(self, make_job: MakeJob) -> None:
        assert render.trainer_config_for(unmerged(make_job)).model_uri == "pvc://models/finetunes/demo/adapter"

    def test_the_base_models_claim_is_mounted_too(self, make_job: MakeJob) -> None:
        job = make_job(method={"type": "lora", "lora": {"merge": False}}, model={"source": "pvc://bases/llama"})
        location = render.model_location(job)
        assert location.claims == ("bases", "models")
        assert location.base_path == "/mnt/pvc/bases/llama"

    @pytest.mark.parametrize("method", [None, {"type": "full"}, {"type": "lora"}, {"type": "lora", "lora": {"merge": True}}])
    def test_merged_and_full_models_stay_in_the_model_folder(self, make_job: MakeJob, method: Any) -> None:
        job = make_job(method=method) if method else make_job()
        location = render.model_location(job)
        assert (location.path, location.base_path) == ("/mnt/pvc/models/finetunes/demo/model", None)

    @pytest.mark.parametrize(("model", "wanted"), [
        ({"source": "hf://org/base"}, "spec.model.source 'hf://org/base'"),
        ({"source": "pvc://models/base", "ggufFile": "m.gguf"}, "spec.model.ggufFile"),
    ])
    def test_a_base_the_serving_pod_cannot_mount_is_refused_naming_the_field(
        self, make_job: MakeJob, model: dict[str, Any], wanted: str
    ) -> None:
        job = make_job(method={"type": "lora", "lora": {"merge": False}}, model=model)
        with pytest.raises(render.SpecError) as error:
            render.model_location(job)
        assert wanted in str(error.value)
        assert "merge: true" in str(error.value)


class TestTheServingContainer:
    def test_builtin_gets_the_adapter_folder_and_mounts_the_base_claim(self, make_job: MakeJob,
                                                                       settings: OperatorSettings) -> None:
        job = make_job(method={"type": "lora", "lora": {"merge": False}}, model={"source": "pvc://bases/llama"},
                       serving={"enabled": True})
        server = container(job, settings)
        assert server["command"][:5] == ["python", "-m", "kubetune.trainer.serve", "--model", ADAPTER_DIR]
        mounts = {m["mountPath"]: m.get("readOnly") for m in server["volumeMounts"]}
        assert mounts["/mnt/pvc/bases"] is True and mounts["/mnt/pvc/models"] is True

    def test_vllm_serves_the_base_with_the_adapter_as_a_lora_module(self, make_job: MakeJob,
                                                                    settings: OperatorSettings) -> None:
        job = make_job(method={"type": "lora", "lora": {"merge": False, "rank": 24}},
                       serving={"enabled": True, "runtime": "vllm", "resources": {"gpus": 1}})
        args = container(job, settings)["args"]
        assert args[:args.index("--host")] == [
            "--model", BASE_DIR, "--served-model-name", "demo-base",
            "--enable-lora", "--lora-modules", f"demo={ADAPTER_DIR}", "--max-lora-rank", "32"]

    @pytest.mark.parametrize(("rank", "flag"), [(1, 8), (8, 8), (9, 16), (64, 64), (300, 320), (1024, 512)])
    def test_the_max_lora_rank_is_the_smallest_vllm_accepts(self, make_job: MakeJob, rank: int, flag: int) -> None:
        assert builders.vllm_max_lora_rank(typed(make_job(method={"type": "lora", "lora": {"rank": rank}}))) == flag


class TestTheApiKey:
    """`spec.serving.auth`: a per-job key Secret, handed to the server from a secretKeyRef."""

    def observed(self, job: dict[str, Any], secret: dict[str, Any] | None) -> Any:
        from datetime import datetime, timezone

        from kubetune.operator.jobs.reconcile import Observed

        job["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingComplete",
                                         "message": "", "observedGeneration": 1, "lastTransitionTime": "x"}],
                         "model": {"uri": "pvc://models/finetunes/demo/model", "digest": "sha256:" + "1" * 64}}
        return Observed(job=job, now=datetime(2026, 3, 1, tzinfo=timezone.utc), serving_key_secret=secret)

    def test_a_missing_key_secret_is_created_with_a_random_key_before_the_deployment(
        self, make_job: MakeJob, settings: OperatorSettings
    ) -> None:
        from kubetune.operator.jobs import reconcile

        keys = []
        for _ in range(2):
            decision = reconcile.reconcile(self.observed(make_job(serving={"enabled": True}), None), settings)
            kinds = [a.manifest["kind"] for a in decision.actions]  # type: ignore[union-attr]
            assert kinds == ["Secret", "Deployment", "Service"]
            secret = decision.actions[0].manifest  # type: ignore[union-attr]
            assert secret["metadata"]["name"] == "demo-serving-key"
            assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
            key = secret["stringData"]["api-key"]
            assert len(key) >= 40
            template = decision.actions[1].manifest["spec"]["template"]  # type: ignore[union-attr]
            assert template["metadata"]["annotations"]["kubetune.io/api-key-digest"] == builders.api_key_digest(key)
            keys.append(key)
        assert keys[0] != keys[1], "keys are random, not derived from anything guessable"

    def test_the_stored_key_is_kept_and_its_digest_rolls_the_deployment_when_it_changes(
        self, make_job: MakeJob, settings: OperatorSettings
    ) -> None:
        from kubetune.operator.jobs import reconcile

        def decide(key: str) -> Any:
            # As the operator reads it: metadata only, with the digest annotated at creation.
            secret = {"metadata": {"name": "demo-serving-key",
                                   "annotations": {"kubetune.io/api-key-digest": builders.api_key_digest(key)}}}
            return reconcile.reconcile(self.observed(make_job(serving={"enabled": True}), secret), settings)

        first, rotated = decide("key-one"), decide("key-two")
        assert [a.manifest["kind"] for a in first.actions] == ["Deployment", "Service"]  # type: ignore[union-attr]
        annotations = [d.actions[0].manifest["spec"]["template"]["metadata"]["annotations"]  # type: ignore[union-attr]
                       for d in (first, rotated)]
        assert annotations[0]["kubetune.io/api-key-digest"] == builders.api_key_digest("key-one")
        assert annotations[0] != annotations[1]

    def test_auth_none_has_no_key_and_no_secret(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        from kubetune.operator.jobs import reconcile

        decision = reconcile.reconcile(self.observed(make_job(serving={"enabled": True, "auth": "none"}), None),
                                       settings)
        assert [a.manifest["kind"] for a in decision.actions] == ["Deployment", "Service"]  # type: ignore[union-attr]
        server = decision.actions[0].manifest["spec"]["template"]["spec"]["containers"][0]  # type: ignore[union-attr]
        assert not [e for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})]

    @pytest.mark.parametrize(("runtime", "variable"), [("builtin", "KUBETUNE_SERVE_API_KEY"), ("vllm", "VLLM_API_KEY")])
    def test_the_key_reaches_the_server_from_the_secret_never_the_command_line(
        self, make_job: MakeJob, settings: OperatorSettings, runtime: str, variable: str
    ) -> None:
        job = make_job(serving={"enabled": True, "runtime": runtime, "resources": {"gpus": 1}})
        server = container(job, settings)
        assert {"name": variable, "valueFrom": {"secretKeyRef": {"name": "demo-serving-key", "key": "api-key"}}} \
            in server["env"]
        assert not any("key" in arg.lower() and "lora" not in arg for arg in server.get("args", server.get("command")))
