"""`resources.gpus: auto` and InsufficientResources on the real control plane.

The operator runs as a real process with a platform policy listing three GPU
types. Each job's validation pod ends (the test plays the kubelet) with the
termination message the trainer's `--validate-only` writes: the sizing facts of
a model. The operator estimates from them before any GPU is held: it picks the
GPU type with the least memory that fits and puts it in the trainer Job, or
rejects a job that cannot fit with the estimate in the message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.operator.conftest import (  # noqa: F401 - fixtures
    Kube, OperatorProcess, finetunejob, finetunejob_crd, kube, namespace, wait_for)

POLICY = """\
apiVersion: kubetune.io/v1alpha1
kind: PlatformPolicy
gpuTypes:
  - {name: T4, memoryGiB: 16, maxPerNode: 4, tflops: 65, nodeSelector: {gpu.example.com/type: t4}}
  - {name: A100-40GB, memoryGiB: 40, maxPerNode: 8, tflops: 312, nodeSelector: {gpu.example.com/type: a100}}
  - {name: H100-80GB, memoryGiB: 80, maxPerNode: 8, tflops: 989, nodeSelector: {gpu.example.com/type: h100}}
"""
GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}


def validated_message(config: dict[str, Any], batch: int, seq: int, tokens: int = 1_000_000) -> str:
    """The validation pod's termination message (trainer/reporting.validation_summary's shape)."""
    resolved = {"epochs": 2.0, "batchSize": batch, "maxSeqLength": seq}
    return json.dumps({"outcome": "validated", "message": "1000 train examples", "sizing": {
        "model": {"config": config},
        "data": {"trainExamples": 1000, "trainTokens": tokens, "longestExample": seq},
        "hyperparameters": {"gpu": resolved, "cpu": resolved | {"batchSize": 1}}}})


@pytest.fixture(scope="module")
def operator_with_gpu_types(cluster: Any, finetunejob_crd: None,  # noqa: F811
                            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    folder = tmp_path_factory.mktemp("estimate-operator")
    (folder / "policy.yaml").write_text(POLICY)
    process = OperatorProcess(cluster.kubeconfig, folder)
    process.env |= {"KUBETUNE_POLICY_FILE": str(folder / "policy.yaml")}
    process.start()
    yield process
    process.stop()


def run_validation(kube: Kube, namespace: str, name: str, message: str) -> None:  # noqa: F811
    wait_for(lambda: kube.job(namespace, f"{name}-validate"), f"the validation Job of {name}")
    kube.run_pod_to_end(namespace, f"{name}-validate", 0, message)


@pytest.mark.parametrize(("config", "batch", "seq", "gpu_type", "selector"), [
    (GPT2_SMALL, 4, 1024, "T4", "t4"),
    (LLAMA_8B, 1, 2048, "A100-40GB", "a100"),
    (LLAMA_8B, 2, 2048, "H100-80GB", "h100"),
], ids=["gpt2-124M-lora", "llama-8B-lora-batch1", "llama-8B-lora-batch2"])
def test_gpus_auto_picks_the_gpu_type_with_the_least_memory_that_fits(
        kube: Kube, operator_with_gpu_types: OperatorProcess, namespace: str,  # noqa: F811
        config: dict[str, Any], batch: int, seq: int, gpu_type: str, selector: str) -> None:
    name = f"auto-{selector}"
    kube.create_ftj(namespace, finetunejob(name, resources={"gpus": "auto", "cpu": "1"},
                                           method={"type": "lora"}))
    run_validation(kube, namespace, name, validated_message(config, batch, seq))
    trainer = wait_for(lambda: kube.job(namespace, f"{name}-train"), f"the trainer Job of {name}")
    pod = trainer["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"gpu.example.com/type": selector}
    estimate = kube.ftj(namespace, name)["status"]["estimate"]
    assert estimate["gpuType"] == gpu_type and estimate["gpus"] == 1
    assert estimate["tokensToProcess"] == 2_000_000
    assert estimate["trainMemoryBytesPerDevice"] > 0 and estimate["serveMemoryBytes"] > 0
    assert estimate["etaSeconds"] > 0


def test_a_job_that_cannot_fit_is_rejected_before_training_with_the_estimate(
        kube: Kube, operator_with_gpu_types: OperatorProcess, namespace: str) -> None:  # noqa: F811
    kube.create_ftj(namespace, finetunejob("too-big", resources={"gpus": "auto"}, method={"type": "full"},
                                           training={"gradientCheckpointing": True}))
    run_validation(kube, namespace, "too-big", validated_message(LLAMA_8B, 1, 2048))
    wait_for(lambda: kube.condition_is(namespace, "too-big", "Validated", "False", "InsufficientResources"),
             "Validated=False InsufficientResources")
    message = kube.condition(namespace, "too-big", "Validated")["message"]  # type: ignore[index]
    assert "needs about 152.7 GiB per GPU" in message
    assert "largest GPU type available to it is H100-80GB (80 GiB)" in message
    assert "would fit with method.type: lora" in message
    assert kube.condition_is(namespace, "too-big", "Failed", "True", "InsufficientResources")
    assert kube.job(namespace, "too-big-train") is None, "no trainer Job (and no GPU) for a job that cannot fit"


def test_a_fixed_gpu_count_on_cpu_memory_too_small_is_rejected(
        kube: Kube, operator_with_gpu_types: OperatorProcess, namespace: str) -> None:  # noqa: F811
    kube.create_ftj(namespace, finetunejob("cpu-small", resources={"gpus": 0, "memory": "1Gi"}))
    run_validation(kube, namespace, "cpu-small", validated_message(GPT2_SMALL, 8, 1024))
    wait_for(lambda: kube.condition_is(namespace, "cpu-small", "Validated", "False", "InsufficientResources"),
             "Validated=False InsufficientResources")
    message = kube.condition(namespace, "cpu-small", "Validated")["message"]  # type: ignore[index]
    assert "resources.memory is 1.0 GiB" in message and "would fit: resources.memory of at least" in message
