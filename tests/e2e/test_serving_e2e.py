"""End to end: a LoRA adapter saved unmerged is served as base + adapter, behind the job's API key.

`method.lora.merge: false` makes the trainer write `<output>/adapter` and no
`<output>/model`; the serving Deployment must load the base model (its claim
mounted too) with the adapter on top. Driven through the operator and the
local node like a user would, and asked with the official `openai` client,
with and without the key from the job's serving-key Secret.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator

import openai
import pytest
import yaml

from kubetune.cli import main as cli, progress_view
from kubetune.dev import stack as local_stack
from kubetune.operator import names
from tests.unit.chart import test_monitoring_queries as monitoring

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    with local_stack.LocalStack(tmp_path_factory.mktemp("e2e-serving"), resync_seconds=5) as running:
        yield running


def test_an_unmerged_lora_adapter_is_served_on_its_base_behind_the_api_key(
        stack: local_stack.LocalStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = "e2e-adapter"
    stack.ensure_namespace(namespace)
    manifest = yaml.safe_load(cli.prepare_demo_volumes(stack, tiny=True, namespace=namespace).read_text())
    name = "faq-adapter"
    manifest["metadata"]["name"] = name
    manifest["spec"]["method"] = {"type": "lora", "lora": {"rank": 4, "merge": False}}
    manifest["spec"]["hyperparameters"]["epochs"] = 1
    stack.plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))

    with open(os.devnull, "w") as quiet:
        job = cli.watch_job(stack, name, namespace, timeout=600, out=quiet)
    status = job["status"]
    assert progress_view.is_true(status, "Succeeded"), progress_view.summary(job)
    assert status["model"]["uri"] == f"pvc://models/finetunes/{name}/adapter"
    output = stack.claim_path(namespace, "models") / "finetunes" / name
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert not (output / "model").exists(), "merge: false writes no merged model"

    local_stack.wait_until(lambda: progress_view.is_true(
        (stack.get("finetunejob", name, namespace) or {}).get("status") or {}, "ServingReady"), 300, "ServingReady")
    job = stack.get("finetunejob", name, namespace) or {}
    url = local_stack.wait_until(lambda: cli.resolve_endpoint(stack, job), 60, "a ready endpoint")
    api_key = cli.serving_api_key(stack, job)
    assert api_key

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [name]
    answer = client.chat.completions.create(model=name, max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": "How do I pause a job?"}])
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens >= 1

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key", max_retries=0, timeout=60).models.list()

    deployment = stack.get("deployment", names.serving(name), namespace) or {}
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1].endswith(f"/finetunes/{name}/adapter")

    # The dashboard and the alerting rules query only series these two really export.
    served = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    operator = urllib.request.urlopen(f"{stack.metrics_url}/metrics", timeout=60).read().decode()
    exported = monitoring.exposed_names(served) | monitoring.exposed_names(operator)
    missing = monitoring.queried_series() - exported
    assert not missing, f"the dashboard or the rules query series nobody exports: {sorted(missing)}"
    assert 'kubetune_serve_requests_total{endpoint="/v1/chat/completions",status="200"}' in served

    # status.usage: the validation pod, the training pod with the tokens its termination message
    # gave, and an open serving slice with one ready replica.
    usage = (stack.get("finetunejob", name, namespace) or {})["status"]["usage"]
    kinds = [a["kind"] for a in usage["attempts"]]
    assert kinds == ["validation", "training"], usage
    training = usage["attempts"][1]
    assert training["finishTime"] >= training["startTime"] and training["tokensProcessed"] > 0
    assert usage["tokensProcessed"] == training["tokensProcessed"]
    assert usage["validation"]["cpuSeconds"] > 0  # the validation pod requests 500m
    assert usage["servingSlices"][-1]["replicas"] == 1 and "end" not in usage["servingSlices"][-1]
    assert usage["training"]["acceleratorSeconds"] == 0.0, "no accelerator on the local node"

    # `kubetune usage` rolls the namespace up from the same status, through kubectl.
    monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))
    capsys.readouterr()
    assert cli.main(["usage", "-n", namespace, "--json"]) == 0
    rolled = json.loads(capsys.readouterr().out)[namespace]
    assert rolled["jobs"] == 1 and rolled["tokens"] == usage["tokensProcessed"]
    assert rolled["validationCpu"] >= usage["validation"]["cpuSeconds"] > 0

def test_a_second_lora_job_is_served_by_the_first_ones_deployment_without_a_restart(
        stack: local_stack.LocalStack) -> None:
    """`spec.serving.shareWith`: job B (LoRA, same base) is loaded into job A's running server.

    Runs after the test above, whose job `faq-adapter` (A) is served. B's adapter must answer
    as model `faq-adapter-b` on A's endpoint, with A's key, and A's serving pod must be the same
    pod that served before, not restarted.
    """
    namespace, host = "e2e-adapter", "faq-adapter"
    host_job = stack.get("finetunejob", host, namespace) or {}
    assert progress_view.is_true(host_job.get("status") or {}, "ServingReady"), "the test above serves job A"
    selector = f"app.kubernetes.io/instance={host},app.kubernetes.io/component=serving"

    def serving_pods() -> list[tuple[str, int]]:
        listing = json.loads(stack.plane.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)
        return [(pod["metadata"]["uid"], sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses")
                                             or [])) for pod in listing["items"]]

    before = serving_pods()
    assert len(before) == 1, before

    manifest = yaml.safe_load(cli.prepare_demo_volumes(stack, tiny=True, namespace=namespace).read_text())
    name = "faq-adapter-b"
    manifest["metadata"]["name"] = name
    manifest["spec"]["method"] = {"type": "lora", "lora": {"rank": 4, "merge": False}}
    manifest["spec"]["hyperparameters"]["epochs"] = 1
    manifest["spec"]["serving"] = {"enabled": True, "shareWith": host}
    stack.plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    with open(os.devnull, "w") as quiet:
        job = cli.watch_job(stack, name, namespace, timeout=600, out=quiet)
    assert progress_view.is_true(job["status"], "Succeeded"), progress_view.summary(job)

    local_stack.wait_until(lambda: progress_view.is_true(
        (stack.get("finetunejob", name, namespace) or {}).get("status") or {}, "ServingReady"), 120,
        "ServingReady (SharedServing) on job B")
    status = (stack.get("finetunejob", name, namespace) or {})["status"]
    assert status["servedBy"] == names.serving(host)
    assert status["endpoint"] == host_job["status"]["endpoint"]
    assert stack.get("deployment", names.serving(name), namespace) is None, "B has no Deployment of its own"

    url = local_stack.wait_until(lambda: cli.resolve_endpoint(stack, host_job), 60, "A's endpoint")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=cli.serving_api_key(stack, host_job), max_retries=0,
                           timeout=120)
    local_stack.wait_until(lambda: [m.id for m in client.models.list()] == [host, name], 120,
                           "A's server listing B's adapter")
    answer = client.chat.completions.create(model=name, max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": "How do I pause a job?"}])
    assert answer.model == name and answer.usage is not None and answer.usage.completion_tokens >= 1
    assert client.chat.completions.create(model=host, max_tokens=2, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}]).model == host
    assert serving_pods() == before, "A's serving pod was neither replaced nor restarted"
