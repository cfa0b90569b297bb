"""End to end with credentials and object storage: examples/ticket-classification.yaml as written, its base
model in a real S3 store (SeaweedFS, the `s3_store` fixture) reached with keys from a Secret named in
`spec.credentials`; afterwards no secret value is anywhere the operator or the trainer writes. And a
Secret without the key the spec names ends validation with CredentialsUnavailable, before training.
"""

from __future__ import annotations

import json
import random
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import progress_view
from kubetune.dev import objectstore, stack as local_stack, tinymodel
from kubetune.operator.jobs import builders

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ticket-classification.yaml"
LABELS = ["billing", "outage", "account", "security", "feature-request"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    # The example asks for one GPU: the local node advertises one (its pods still run on the CPU).
    with local_stack.LocalStack(tmp_path_factory.mktemp("e2e-creds"), resync_seconds=5, node_gpus=1) as running:
        yield running


def tickets(count: int = 90, seed: int = 5) -> list[dict[str, str]]:
    """Skewed like the example says: mostly billing, few security."""
    rng = random.Random(seed)
    weights = [40, 20, 15, 5, 10]
    words = {"billing": "invoice charge refund", "outage": "down error timeout", "account": "login password user",
             "security": "breach phishing token", "feature-request": "please add option"}
    rows = []
    for i in range(count):
        label = rng.choices(LABELS, weights)[0] if i >= len(LABELS) * 3 else LABELS[i % len(LABELS)]
        rows.append({"subject_and_body": f"Ticket {i}: {words[label]} {rng.choice(words[label].split())}",
                     "queue": label})
    return rows


def create_secret(stack: local_stack.LocalStack, namespace: str, name: str, values: dict[str, str]) -> None:
    args = [f"--from-literal={k}={v}" for k, v in values.items()]
    stack.plane.kubectl("create", "secret", "generic", name, "-n", namespace, *args)


def prepare(stack: local_stack.LocalStack, store: objectstore.SeaweedS3, namespace: str, tmp: Path) -> dict[str, Any]:
    """The example's inputs: its base model path in the bucket (a tiny stand-in), its parquet file on the claim."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stack.ensure_namespace(namespace)
    manifest = yaml.safe_load(EXAMPLE.read_text())
    bucket, _, prefix = manifest["spec"]["model"]["source"][len("s3://"):].partition("/")
    store.create_bucket(bucket)
    rows = tickets()
    model = tinymodel.create_tiny_model(tmp / "base", arch="llama", corpus=[r["subject_and_body"] for r in rows] + LABELS)
    fs = store.filesystem()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{bucket}/{prefix}/{path.relative_to(model).as_posix()}")
    data_uri = manifest["spec"]["dataset"]["train"]["source"]
    claim, _, path = data_uri[len("pvc://"):].partition("/")
    target = stack.claim_path(namespace, claim) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), target)
    return dict(manifest)


def everything_written(stack: local_stack.LocalStack, namespace: str, name: str) -> dict[str, str]:
    """Where a leaked credential would show: the ConfigMaps, the job (status too), Events, the operator's
    log, every pod log of the node, the operator's /metrics."""
    kubectl = stack.plane.kubectl
    found = {
        "configmaps": kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout,
        "finetunejob": kubectl("get", "finetunejob", name, "-n", namespace, "-o", "json").stdout,
        "events": kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
        "operator log": (stack.workdir / "operator.log").read_text(errors="replace"),
    }
    assert stack.node is not None
    for log in (stack.node.workdir / "pods").glob(f"{namespace}_*/*/output.log"):
        found[f"pod log {log.parent.parent.name}/{log.parent.name}"] = log.read_text(errors="replace")
    with urllib.request.urlopen(f"{stack.metrics_url}/metrics", timeout=10) as response:
        found["metrics"] = response.read().decode()
    return found


class TestTheTicketExampleWithKeysFromASecret:
    def test_runs_as_written_against_s3_and_no_secret_value_is_written_anywhere(
            self, stack: local_stack.LocalStack, s3_store: objectstore.SeaweedS3, tmp_path: Path) -> None:
        namespace = "e2e-creds"
        manifest = prepare(stack, s3_store, namespace, tmp_path)
        create_secret(stack, namespace, "ml-models-s3", {"accessKeyId": s3_store.access_key,
                                                         "secretAccessKey": s3_store.secret_key,
                                                         "endpoint": s3_store.endpoint})
        stack.plane.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
        name = manifest["metadata"]["name"]

        job = local_stack.wait_until(
            lambda: (lambda j: j if progress_view.is_true(j.get("status") or {}, "Succeeded")
                     or progress_view.is_true(j.get("status") or {}, "Failed") else None)(
                stack.get("finetunejob", name, namespace) or {}), 900, "the ticket example to finish", interval=2)
        status = job["status"]
        assert progress_view.is_true(status, "Succeeded"), progress_view.summary(job)
        assert status["results"]["examples"] > 0 and "accuracy" in status["results"]
        adapter = stack.claim_path(namespace, "models") / "classifiers" / name / "adapter"
        assert (adapter / "adapter_config.json").is_file()

        written = everything_written(stack, namespace, name)
        # The scan covers what matters: the validation and trainer pods' own logs are among the texts.
        assert {key.rsplit("/", 1)[-1] for key in written if key.startswith("pod log")} >= {
            builders.TRAINER_CONTAINER, builders.VALIDATION_CONTAINER}, written.keys()
        for where, text in written.items():
            assert s3_store.secret_key not in text, f"the S3 secret key leaked into the {where}"
            assert s3_store.access_key not in text, f"the S3 access key id leaked into the {where}"


class TestAMissingSecretKey:
    def test_ends_validation_with_credentials_unavailable_naming_the_field(
            self, stack: local_stack.LocalStack, s3_store: objectstore.SeaweedS3, tmp_path: Path) -> None:
        namespace = "e2e-creds-missing"
        manifest = prepare(stack, s3_store, namespace, tmp_path)
        token = "hf_" + secrets.token_hex(12)
        create_secret(stack, namespace, "ml-models-s3", {"accessKeyId": s3_store.access_key})  # no secretAccessKey
        create_secret(stack, namespace, "hub", {"token": token})
        manifest["metadata"]["name"] = "missing-key"
        manifest["spec"]["credentials"]["hub"] = {"secretName": "hub"}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(manifest))
        stack.plane.kubectl("apply", "-n", namespace, "-f", str(path))

        def failed() -> dict[str, Any] | None:
            status = (stack.get("finetunejob", "missing-key", namespace) or {}).get("status") or {}
            return status if progress_view.is_true(status, "Failed") else None

        status = local_stack.wait_until(failed, 180, "the job to fail", interval=1)
        validated = progress_view.condition(status, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", "CredentialsUnavailable")
        assert validated["message"].startswith("spec.credentials: the validation pod cannot start: ")
        assert "secretAccessKey" in validated["message"] and "ml-models-s3" in validated["message"]
        assert stack.get("job.batch", "missing-key-train", namespace) is None  # no GPU was ever asked for
        local_stack.wait_until(lambda: stack.get("job.batch", "missing-key-validate", namespace) is None, 60,
                               "the stuck validation Job to be deleted")
        for where, text in everything_written(stack, namespace, "missing-key").items():
            assert token not in text, f"the hub token leaked into the {where}"


def finished(stack: local_stack.LocalStack, name: str, namespace: str) -> dict[str, Any] | None:
    job = stack.get("finetunejob", name, namespace) or {}
    status = job.get("status") or {}
    done = progress_view.is_true(status, "Succeeded") or progress_view.is_true(status, "Failed")
    return job if done else None


class TestOutputInTheBucketServedAndTrainedOn:
    def test_a_job_stores_its_model_in_s3_serves_it_and_a_second_job_trains_on_from_it(
            self, stack: local_stack.LocalStack, s3_store: objectstore.SeaweedS3, tmp_path: Path) -> None:
        namespace = "e2e-s3-output"
        stack.ensure_namespace(namespace)
        from kubetune.cli import main as cli

        manifest = yaml.safe_load(cli.prepare_demo_volumes(stack, tiny=True, namespace=namespace).read_text())
        base = stack.claim_path(namespace, "base-models") / "tiny-llama"
        s3_store.create_bucket("e2e-out")
        fs = s3_store.filesystem()
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"e2e-out/base/tiny-llama/{path.relative_to(base).as_posix()}")
        create_secret(stack, namespace, "store", {"accessKeyId": s3_store.access_key,
                                                  "secretAccessKey": s3_store.secret_key,
                                                  "endpoint": s3_store.endpoint})
        spec = manifest["spec"]
        spec["model"] = {"source": "s3://e2e-out/base/tiny-llama"}
        spec["output"] = {"storage": "s3://e2e-out/finetunes"}
        spec["credentials"] = {"s3": {"secretName": "store", "endpointKey": "endpoint"}}
        spec["serving"] = {"enabled": True, "auth": "none"}
        spec["evaluation"] = {"samples": 0}
        first = dict(manifest, metadata={"name": "first"})
        second = yaml.safe_load(yaml.safe_dump(first))
        second["metadata"] = {"name": "second"}
        second["spec"]["model"] = {"fromJob": "first"}
        second["spec"].pop("serving")
        for body in (second, first):  # the second waits for the first
            path = tmp_path / f"{body['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(body))
            stack.plane.kubectl("apply", "-n", namespace, "-f", str(path))

        def validated(name: str) -> dict[str, Any]:
            return progress_view.condition((stack.get("finetunejob", name, namespace) or {}).get("status") or {},
                                           "Validated") or {}

        # Applied first, it found no source job; then the source exists but has not succeeded: it waits.
        local_stack.wait_until(lambda: "FineTuneJob 'first' has not Succeeded" in validated("second").get("message", ""),
                               120, "the second job to wait for the first")
        assert validated("second")["reason"] == "SourceJobNotReady"
        assert not progress_view.is_true((stack.get("finetunejob", "second", namespace) or {})["status"], "Failed")

        job = local_stack.wait_until(lambda: finished(stack, "first", namespace), 900, "the first job", interval=2)
        status = job["status"]
        assert progress_view.is_true(status, "Succeeded"), progress_view.summary(job)
        assert status["model"]["uri"] == "s3://e2e-out/finetunes/first/model"
        stored = {p.split("finetunes/first/", 1)[1] for p in fs.find("e2e-out/finetunes/first", refresh=True)}
        assert {"model/config.json", "model/model.safetensors", "metrics.json", "README.md", "loss_curve.png"} <= stored
        assert any(p.startswith("checkpoints/step-") for p in stored)

        # Serving: the init container downloads the model from the bucket; the server answers.
        local_stack.wait_until(lambda: progress_view.is_true(
            (stack.get("finetunejob", "first", namespace) or {}).get("status") or {}, "ServingReady"), 300,
            "ServingReady")
        job = stack.get("finetunejob", "first", namespace) or {}
        url = local_stack.wait_until(lambda: cli.resolve_endpoint(stack, job), 60, "a ready endpoint")
        assert cli.served_model_name(url) == "first"
        assert isinstance(cli.ask(url, "first", "How do I pause a job?", max_tokens=4), str)

        # The second job starts on its own once the first has succeeded, from the first's model.
        job = local_stack.wait_until(lambda: finished(stack, "second", namespace), 900, "the second job", interval=2)
        status = job["status"]
        assert progress_view.is_true(status, "Succeeded"), progress_view.summary(job)
        assert status["lineage"] == [
            {"uri": "s3://e2e-out/base/tiny-llama"},
            {"job": "first", "uri": "s3://e2e-out/finetunes/first/model",
             "digest": (stack.get("finetunejob", "first", namespace) or {})["status"]["model"]["digest"]}]
        card = fs.cat("e2e-out/finetunes/second/README.md").decode()
        assert "`s3://e2e-out/base/tiny-llama` → first (`s3://e2e-out/finetunes/first/model`" in card

        for where, text in everything_written(stack, namespace, "first").items():
            assert s3_store.secret_key not in text, f"the S3 secret key leaked into the {where}"
