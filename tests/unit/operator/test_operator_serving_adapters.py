"""Serving a LoRA adapter saved unmerged (`method.lora.merge: false`): the server gets the adapter and its base.

The trainer writes `<output>/adapter` in that case, never `<output>/model` (trainer/outputs.py);
a Deployment pointed at `<output>/model` crash-loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kubetune.operator import builders, render
from kubetune.operator.settings import OperatorSettings

MakeJob = Callable[..., dict[str, Any]]
ADAPTER_DIR = "/mnt/pvc/models/finetunes/demo/adapter"
BASE_DIR = "/mnt/pvc/models/base/gpt2"


def unmerged(make_job: MakeJob, **serving: Any) -> dict[str, Any]:
    return make_job(method={"type": "lora", "lora": {"merge": False}}, serving={"enabled": True, **serving})


def container(job: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    manifest = builders.serving_deployment(job, render.model_location(job), "sha256:" + "0" * 64, settings)
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
        assert builders.vllm_max_lora_rank(make_job(method={"type": "lora", "lora": {"rank": rank}})) == flag
