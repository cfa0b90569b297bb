"""The FineTuneJob CRD on the real API server: what it accepts, what it rejects and how it explains itself.

Every rejection is checked the way a user meets it: `kubectl apply` fails and
its message names the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import finetunejob as models, schema as apischema

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml") if "data" not in p.relative_to(REPO / "examples").parts
                  and yaml.safe_load(p.read_text()).get("kind") == "FineTuneJob")

DELETE = object()
"""In a patch: remove this key."""


@pytest.fixture(scope="module")
def ftj_crd(cluster: Any) -> None:
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
    # Discovery and the published OpenAPI lag Established by a moment.
    deadline = time.monotonic() + 60
    while cluster.kubectl("explain", "ftj.spec.dataset", check=False).returncode != 0:
        assert time.monotonic() < deadline, "kubectl explain never found the FineTuneJob schema"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def namespace(cluster: Any, ftj_crd: None) -> Iterator[str]:
    name = f"api-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def base_job(name: str) -> dict[str, Any]:
    """A small valid FineTuneJob."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"format": "text", "train": {"source": "pvc://datasets/corpus.jsonl"}},
            "output": {"storage": "pvc://models/finetunes"},
        },
    }


def merged(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`target` with `patch` merged in (maps recursively; DELETE removes a key)."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply(cluster: Any, namespace: str, body: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


@dataclasses.dataclass(frozen=True)
class Invalid:
    """A spec patch the API server must reject, the field the message must name, and what it must say."""

    id: str
    patch: dict[str, Any]
    field: str
    says: str


INVALID_MANIFESTS = [
    # --- missing required fields
    Invalid("missing-model", {"model": DELETE}, "spec.model", "Required value"),
    Invalid("missing-model-source", {"model": {"source": DELETE, "revision": "main"}}, "spec.model.source",
            "set exactly one of source"),
    Invalid("missing-train-data", {"dataset": {"train": DELETE}}, "spec.dataset.train", "Required value"),
    Invalid("missing-output", {"output": DELETE}, "spec.output", "Required value"),
    # --- wrong types
    Invalid("epochs-a-word", {"hyperparameters": {"epochs": "three"}}, "spec.hyperparameters.epochs",
            'must be an integer from 1 to 1000, or "auto"'),
    Invalid("suspend-a-string", {"suspend": "yes"}, "spec.suspend", "must be of type boolean"),
    Invalid("backoff-limit-a-string", {"backoffLimit": "3"}, "spec.backoffLimit", "must be of type integer"),
    Invalid("learning-rate-auto-string", {"hyperparameters": {"learningRate": "auto"}},
            "spec.hyperparameters.learningRate", "must be of type number"),
    Invalid("labels-not-a-list", {"dataset": {"format": "classification", "labels": "spam,ham"}},
            "spec.dataset.labels", "must be of type array"),
    Invalid("unknown-field", {"learningRate": 0.001}, "spec.learningRate", "unknown field"),
    # --- unknown enum values
    Invalid("format-qa", {"dataset": {"format": "qa"}}, "spec.dataset.format", "Unsupported value: \"qa\""),
    Invalid("method-qlora", {"method": {"type": "qlora"}}, "spec.method.type", "Unsupported value"),
    Invalid("scheduler-onecycle", {"hyperparameters": {"scheduler": "onecycle"}}, "spec.hyperparameters.scheduler",
            "Unsupported value"),
    Invalid("precision-int8", {"training": {"precision": "int8"}}, "spec.training.precision", "Unsupported value"),
    Invalid("imbalance-smote", {"dataset": {"format": "classification", "imbalance": {"strategy": "smote"}}},
            "spec.dataset.imbalance.strategy", "Unsupported value"),
    Invalid("serving-runtime-tgi", {"serving": {"enabled": True, "runtime": "tgi"}}, "spec.serving.runtime",
            "Unsupported value"),
    Invalid("metric-bleu", {"evaluation": {"metrics": ["bleu"]}}, "spec.evaluation.metrics[0]", "Unsupported value"),
    Invalid("file-format-xlsx", {"dataset": {"train": {"fileFormat": "xlsx"}}}, "spec.dataset.train.fileFormat",
            "Unsupported value"),
    # --- out-of-range numbers
    Invalid("lora-rank-zero", {"method": {"type": "lora", "lora": {"rank": 0}}}, "spec.method.lora.rank",
            "greater than or equal to 1"),
    Invalid("learning-rate-zero", {"hyperparameters": {"learningRate": 0}}, "spec.hyperparameters.learningRate",
            "greater than 0"),
    Invalid("learning-rate-huge", {"hyperparameters": {"learningRate": 5}}, "spec.hyperparameters.learningRate",
            "less than or equal to 1"),
    Invalid("validation-fraction-one", {"dataset": {"split": {"validation": 1}}}, "spec.dataset.split.validation",
            "less than 1"),
    Invalid("batch-size-zero", {"hyperparameters": {"batchSize": 0}}, "spec.hyperparameters.batchSize",
            'must be an integer from 1 to 4096, or "auto"'),
    Invalid("gpus-too-many", {"resources": {"gpus": 100}}, "spec.resources.gpus",
            'must be an integer from 0 to 64, or "auto"'),
    Invalid("backoff-limit-negative", {"backoffLimit": -1}, "spec.backoffLimit", "greater than or equal to 0"),
    Invalid("keep-no-checkpoints", {"training": {"keepCheckpoints": 0}}, "spec.training.keepCheckpoints",
            "greater than or equal to 1"),
    Invalid("curriculum-from-nothing", {"dataset": {"curriculum": {"enabled": True, "startFraction": 0}}},
            "spec.dataset.curriculum.startFraction", "greater than 0"),
    Invalid("deadline-zero", {"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds", "greater than or equal to 1"),
    # --- formats and patterns
    Invalid("memory-not-a-quantity", {"resources": {"memory": "lots"}}, "spec.resources.memory",
            "must be a non-negative Kubernetes quantity"),
    Invalid("queue-name-uppercase", {"resources": {"queueName": "ML_Team"}}, "spec.resources.queueName",
            "should match"),
    Invalid("model-ftp", {"model": {"source": "ftp://models.example.com/gpt2"}}, "spec.model.source",
            "must be hf://<org>/<name>"),
    Invalid("output-http", {"output": {"storage": "https://example.com/upload"}}, "spec.output.storage",
            "must be pvc://<claim>/<path>"),
    Invalid("gguf-file-with-folder", {"model": {"ggufFile": "sub/model.gguf"}}, "spec.model.ggufFile",
            "should match"),
    Invalid("path-traversal", {"dataset": {"train": {"source": "pvc://datasets/../secrets/x.jsonl"}}},
            "spec.dataset.train.source", "must not contain '..'"),
    # --- credentials belong in Secrets named by spec.credentials, never in a URL
    Invalid("model-url-with-keys", {"model": {"source": "s3://AKIAEXAMPLE:abc123@models/base"}}, "spec.model.source",
            "must not carry credentials (user:password@ or key:secret@ before the host)"),
    Invalid("data-url-with-password", {"dataset": {"train": {"source": "https://user:hunter2@data.example.com/t.jsonl"}}},
            "spec.dataset.train.source", "name it in spec.credentials"),
    Invalid("output-url-with-keys", {"output": {"storage": "s3://key:secret@models/out"}}, "spec.output.storage",
            "name it in spec.credentials"),
    Invalid("tracking-uri-with-password",
            {"tracking": {"mlflow": {"trackingUri": "https://ci:hunter2@mlflow.example.com"}}},
            "spec.tracking.mlflow.trackingUri", "name it in spec.credentials"),
    Invalid("tracking-uri-with-token", {"tracking": {"mlflow": {"trackingUri": "http://tok3n@mlflow.mlflow:5000"}}},
            "spec.tracking.mlflow.trackingUri", "must not carry credentials"),
    Invalid("tracking-uri-not-http", {"tracking": {"mlflow": {"trackingUri": "mlflow.mlflow:5000"}}},
            "spec.tracking.mlflow.trackingUri", "must be the http:// or https:// URL of the MLflow tracking server"),
    Invalid("mlflow-user-without-password", {"credentials": {"mlflow": {"secretName": "mlflow", "usernameKey": "user"}}},
            "spec.credentials.mlflow.passwordKey", "set usernameKey and passwordKey together"),
    Invalid("mlflow-token-and-user", {"credentials": {"mlflow": {
        "secretName": "mlflow", "tokenKey": "token", "usernameKey": "user", "passwordKey": "password"}}},
            "spec.credentials.mlflow.tokenKey", "not both"),
    Invalid("model-source-and-from-job", {"model": {"fromJob": "earlier"}}, "spec.model.source",
            "set exactly one of source (a model's location) and fromJob"),
    Invalid("credentials-secret-not-a-name", {"credentials": {"s3": {"secretName": "Bucket_Keys"}}},
            "spec.credentials.s3.secretName", "should match"),
    # --- references carry no namespace
    Invalid("pvc-with-namespace", {"dataset": {"train": {"source": "pvc://team-b:datasets/corpus.jsonl"}}},
            "spec.dataset.train.source", "in the job's own namespace"),
    Invalid("output-pvc-dotted-namespace", {"output": {"storage": "pvc://models.team-b/out"}},
            "spec.output.storage", "namespaces and other separators are not allowed"),
    # --- contradictory sections
    Invalid("lora-settings-with-full", {"method": {"type": "full", "lora": {"rank": 8}}}, "spec.method.lora",
            "lora settings apply only when type is 'lora'"),
    Invalid("no-training-split-left", {"dataset": {"split": {"validation": 0.5, "test": 0.5}}}, "spec.dataset.split",
            "must be below 1 so that a training split remains"),
    Invalid("labels-without-classification", {"dataset": {"labels": ["a", "b"]}}, "spec.dataset.labels",
            "labels apply only to format classification"),
    Invalid("imbalance-without-classification", {"dataset": {"format": "chat", "imbalance": {"strategy": "oversample"}}},
            "spec.dataset.imbalance.strategy", "applies only to format classification"),
    Invalid("classification-without-label-field",
            {"dataset": {"format": "classification", "fields": {"text": "body", "label": "body"}}},
            "spec.dataset.fields.label", "classification needs a label field"),
    Invalid("duplicate-labels", {"dataset": {"format": "classification", "labels": ["spam", "ham", "spam"]}},
            "spec.dataset.labels[2]", "Duplicate value"),
    Invalid("max-below-min-chars", {"dataset": {"cleaning": {"minChars": 100, "maxChars": 50}}},
            "spec.dataset.cleaning.maxChars", "at least minChars"),
    Invalid("val-accuracy-without-classification",
            {"training": {"earlyStopping": {"enabled": True, "metric": "valAccuracy"}}},
            "spec.training.earlyStopping.metric", "valAccuracy needs dataset.format classification"),
    Invalid("early-stopping-without-validation",
            {"dataset": {"split": {"validation": 0}}, "training": {"earlyStopping": {"enabled": True}}},
            "spec.training.earlyStopping.enabled", "early stopping needs validation data"),
    Invalid("f1-without-classification", {"evaluation": {"metrics": ["perplexity", "f1"]}},
            "spec.evaluation.metrics", "need dataset.format classification"),
    Invalid("vllm-without-gpu", {"serving": {"enabled": True, "runtime": "vllm"}}, "spec.serving.resources",
            "runtime vllm needs at least one GPU"),
    Invalid("share-with-merged-adapter", {"serving": {"enabled": True, "shareWith": "job-a"}},
            "spec.serving.shareWith", "serving.shareWith loads this job's LoRA adapter into another job's server: "
            "it needs method.lora.merge: false"),
    Invalid("share-with-full-model", {"method": {"type": "full"}, "serving": {"enabled": True, "shareWith": "job-a"}},
            "spec.serving.shareWith", "it needs method.lora.merge: false"),
    Invalid("share-with-other-namespace", {"method": {"type": "lora", "lora": {"merge": False}},
                                           "serving": {"enabled": True, "shareWith": "other-team/job-a"}},
            "spec.serving.shareWith", "should match"),
    Invalid("nodes-without-gpus", {"resources": {"nodes": 3, "gpus": 0}}, "spec.resources.nodes",
            "nodes > 1 needs gpus >= 1"),
    Invalid("nodes-on-cpu-by-default", {"resources": {"nodes": 2}}, "spec.resources.nodes",
            "nodes > 1 needs gpus >= 1"),
    Invalid("nodes-zero", {"resources": {"nodes": 0, "gpus": 1}}, "spec.resources.nodes",
            "greater than or equal to 1"),
    Invalid("strategy-deepspeed", {"training": {"strategy": "deepspeed"}}, "spec.training.strategy",
            "Unsupported value"),
    Invalid("toleration-exists-with-value",
            {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}},
            "spec.resources.tolerations[0].value", "value must be empty when operator is Exists"),
]


def field_named(stderr: str, field: str) -> bool:
    """Whether the API server's message names `field` as the place of an error (not just as a prefix)."""
    return re.search(re.escape(field) + r"(?![\w.\[])", stderr) is not None


def test_the_table_has_at_least_thirty_invalid_manifests() -> None:
    assert len(INVALID_MANIFESTS) >= 30
    assert len({case.id for case in INVALID_MANIFESTS}) == len(INVALID_MANIFESTS)


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda c: c.id)
def test_an_invalid_manifest_is_rejected_naming_the_field(cluster: Any, namespace: str, case: Invalid) -> None:
    body = base_job(f"bad-{case.id}")
    body["spec"] = merged(body["spec"], case.patch)
    result = apply(cluster, namespace, body)
    assert result.returncode != 0, f"accepted: {case.id}"
    assert field_named(result.stderr, case.field), result.stderr
    assert case.says in result.stderr, result.stderr
    absent = cluster.kubectl("get", "ftj", "-n", namespace, f"bad-{case.id}", check=False)
    assert absent.returncode != 0 and "NotFound" in absent.stderr


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda c: c.id)
def test_the_python_parser_refuses_what_the_api_server_refuses(case: Invalid) -> None:
    """The same table, through `FineTuneJobSpec.from_dict` (what reconcile and, for the run's sections, the
    trainer parse with): every CEL rule has its Python twin, so no manifest the API server refuses is
    accepted here, and the problem names the same field."""
    spec = merged(base_job(f"bad-{case.id}")["spec"], case.patch)
    with pytest.raises(apischema.ValidationError) as caught:
        models.FineTuneJobSpec.from_dict(spec)
    field = case.field.split("[")[0]  # the server names a duplicate list item by index, the parser the list
    assert any(re.match(re.escape(field) + r"(?![\w.])", problem) for problem in caught.value.problems), \
        caught.value.problems


@dataclasses.dataclass(frozen=True)
class Update:
    """A change to a created job: forbidden (naming `field`) or allowed."""

    id: str
    patch: dict[str, Any]
    field: str = ""


FORBIDDEN_UPDATES = [
    Update("model-source", {"model": {"source": "hf://HuggingFaceTB/SmolLM2-360M-Instruct"}}, "spec.model"),
    Update("dataset-split-seed", {"dataset": {"split": {"seed": 7}}}, "spec.dataset"),
    Update("dataset-train-source", {"dataset": {"train": {"source": "pvc://datasets/other.jsonl"}}}, "spec.dataset"),
    Update("method-type", {"method": {"type": "full"}}, "spec.method"),
    Update("hyperparameter-epochs", {"hyperparameters": {"epochs": 5}}, "spec.hyperparameters"),
    Update("hyperparameter-learning-rate-added", {"hyperparameters": {"learningRate": 0.001}}, "spec.hyperparameters"),
    Update("training-precision", {"training": {"precision": "fp32"}}, "spec.training"),
    Update("evaluation-limit", {"evaluation": {"maxTestExamples": 10}}, "spec.evaluation"),
    Update("output-storage", {"output": {"storage": "pvc://models/elsewhere"}}, "spec.output"),
    Update("resources-gpus", {"resources": {"gpus": 2}}, "spec.resources"),
    Update("resources-removed", {"resources": DELETE}, "spec.resources"),
]

ALLOWED_UPDATES = [
    Update("suspend", {"suspend": True}),
    Update("serving", {"serving": {"enabled": True, "replicas": 3}}),
    Update("backoff-limit", {"backoffLimit": 10}),
    Update("deadline", {"activeDeadlineSeconds": 3600}),
    Update("ttl", {"ttlSecondsAfterFinished": 60}),
    Update("tracking", {"tracking": {"mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "experiment": "team-a"}},
                        "credentials": {"mlflow": {"secretName": "mlflow"}}}),
]


def created(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    body = base_job(name)
    body["spec"]["resources"] = {"gpus": 1, "memory": "8Gi"}
    body["spec"]["method"] = {"type": "lora", "lora": {"rank": 8}}
    result = apply(cluster, namespace, body)
    assert result.returncode == 0, result.stderr
    return body


@pytest.mark.parametrize("case", FORBIDDEN_UPDATES, ids=lambda c: c.id)
def test_what_defines_the_run_is_immutable(cluster: Any, namespace: str, case: Update) -> None:
    body = created(cluster, namespace, f"imm-{case.id}")
    before = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, f"imm-{case.id}", "-o", "json").stdout)
    changed = merged(body, {"spec": case.patch})
    result = apply(cluster, namespace, changed)
    assert result.returncode != 0, f"update accepted: {case.id}"
    assert field_named(result.stderr, case.field), result.stderr
    assert "is immutable once the object is created" in result.stderr, result.stderr
    after = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, f"imm-{case.id}", "-o", "json").stdout)
    assert after["spec"] == before["spec"]


@pytest.mark.parametrize("case", ALLOWED_UPDATES, ids=lambda c: c.id)
def test_suspend_serving_and_run_policy_stay_editable(cluster: Any, namespace: str, case: Update) -> None:
    body = created(cluster, namespace, f"edit-{case.id}")
    result = apply(cluster, namespace, merged(body, {"spec": case.patch}))
    assert result.returncode == 0, result.stderr
    stored = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, f"edit-{case.id}", "-o", "json").stdout)
    assert merged(stored["spec"], case.patch) == stored["spec"]
    assert stored["metadata"]["generation"] == 2


class TestExamples:
    @pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "examples")))
    def test_is_accepted_and_parses_back_into_the_typed_model(self, cluster: Any, namespace: str, path: Path) -> None:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
        result = cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
        assert result.returncode == 0, result.stderr
        stored = json.loads(cluster.kubectl("get", "ftj", "-n", namespace, body["metadata"]["name"],
                                            "-o", "json").stdout)
        spec = models.FineTuneJobSpec.from_dict(stored["spec"])
        # The server's defaults are the model's defaults: the stored spec is the typed spec, field by field.
        assert stored["spec"] == spec.to_dict()
        assert spec == models.FineTuneJobSpec.from_dict(body["spec"])


class TestKubectlExplain:
    def test_dataset_fields_are_described(self, cluster: Any, ftj_crd: None) -> None:
        out = cluster.kubectl("explain", "ftj.spec.dataset").stdout
        assert "Training data: sources, format, field mapping, cleaning, split" in " ".join(out.split())
        for field in ("format", "train", "validation", "test", "fields", "labels", "cleaning", "split",
                      "imbalance", "curriculum"):
            assert re.search(rf"^\s+{field}\s", out, re.MULTILINE), f"{field} missing:\n{out}"
        assert "prompt_completion" in out and "classification" in out

    def test_nested_fields_teach_their_defaults_and_meaning(self, cluster: Any, ftj_crd: None) -> None:
        out = " ".join(cluster.kubectl("explain", "ftj.spec.dataset.split.validation").stdout.split())
        assert "Fraction of the training data held out for validation" in out
        out = " ".join(cluster.kubectl("explain", "ftj.spec.hyperparameters.learningRate").stdout.split())
        assert "2e-4 for LoRA" in out



class TestKubectlGet:
    def test_the_short_name_and_the_category_find_the_kind(self, cluster: Any, namespace: str) -> None:
        created(cluster, namespace, "by-category")
        for resource in ("ftj", "kubetune"):
            names = [line.split()[0] for line in cluster.kubectl("get", resource, "-n", namespace).stdout.splitlines()]
            assert "by-category" in names or "finetunejob.kubetune.io/by-category" in names, resource

    def test_shows_status_model_progress_and_val_loss(self, cluster: Any, namespace: str) -> None:
        created(cluster, namespace, "columns")
        status = {"status": {
            "phase": "Running", "observedGeneration": 1, "attempts": 1,
            "progress": {"step": 40, "totalSteps": 160, "percent": 25.0, "epoch": 0.75},
            "metrics": {"trainLoss": 2.41, "valLoss": 2.5625},
            "conditions": [{"type": "Running", "status": "True", "reason": "Training", "message": "step 40/160",
                            "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }}
        cluster.kubectl("patch", "ftj", "columns", "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps(status))
        lines = cluster.kubectl("get", "ftj", "columns", "-n", namespace).stdout.splitlines()
        assert lines[0].split() == ["NAME", "STATUS", "MODEL", "PROGRESS", "VAL-LOSS", "AGE"]
        assert lines[1].split()[:5] == ["columns", "Running", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "25",
                                        "2.5625"]
        wide = cluster.kubectl("get", "ftj", "columns", "-n", namespace, "-o", "wide").stdout.splitlines()
        assert wide[0].split()[-2:] == ["METHOD", "ENDPOINT"]

    def test_status_is_checked_and_spec_cannot_change_through_it(self, cluster: Any, namespace: str) -> None:
        created(cluster, namespace, "status-only")
        bad = cluster.kubectl("patch", "ftj", "status-only", "-n", namespace, "--subresource=status",
                              "--type=merge", "-p", json.dumps({"status": {"progress": {"percent": 150}}}),
                              check=False)
        assert bad.returncode != 0 and field_named(bad.stderr, "status.progress.percent"), bad.stderr
        cluster.kubectl("patch", "ftj", "status-only", "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"spec": {"suspend": True}, "status": {"attempts": 2}}))
        stored = json.loads(cluster.kubectl("get", "ftj", "status-only", "-n", namespace, "-o", "json").stdout)
        assert stored["spec"]["suspend"] is False and stored["status"]["attempts"] == 2
