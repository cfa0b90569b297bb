"""Bad input: generated FineTuneJob specs, valid and invalid, against the real API server and operator.

Hypothesis mutates the shipped examples field by field (wrong types,
out-of-range numbers, unknown enum values, removed required fields, unknown
fields, path traversal, known contradictions) and sends each result to the real
API server as a server-side dry run. Every spec is either

- **rejected**, with a message that names the offending field (`spec.…`), or
- **accepted**: then the operator's own reconcile of the stored object (defaults
  applied by the server) either starts it (the dataset-validation Job) or ends it
  `Failed` with a reason and a message naming a `spec.` field; the children it
  would create (Secret, ConfigMap, validation and trainer Jobs, serving
  Deployment) are themselves accepted by the API server in a namespace that
  enforces the `restricted` Pod Security level, and reference no Secret but the
  job's own progress and serving-key Secrets and no claim the spec does not name.

Then a sample of accepted specs is created for real with the operator running
(no node: pods stay Pending) and each one must reach a clear state; the operator
must not crash or count a reconcile error, and deleting them all leaves nothing
behind within 60 s.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from kubernetes.client.exceptions import ApiException

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.dev import stack as local_stack
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.settings import OperatorSettings
from tests.reliability.conftest import Kube, wait_until


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _failed_reconciles(stack: local_stack.LocalStack) -> str:
    """Each failed reconcile the operator logged, with its traceback: what a counted error was."""
    lines = (stack.workdir / "operator.log").read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if "reconcile of" in line and "failed" in line]
    return "\n---\n".join("\n".join(lines[i:i + 40]) for i in starts[:5]) or "(none logged)"

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [doc for path in sorted([*REPO.glob("examples/*.yaml"), *REPO.glob("examples/local/*.yaml")])
            for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "FineTuneJob"]
SPECS = int(os.environ.get("KUBETUNE_FUZZ_SPECS", "520"))
"""Generated specs (500 + a margin: hypothesis may generate a few fewer than asked)."""
LIVE_SAMPLE = 30
SETTINGS = OperatorSettings(progress_url="http://operator:8080/v1/reports", secret_key=b"fuzz-key",
                            trainer_image="kubetune/trainer:fuzz")
FIELD = re.compile(r"\bspec(\.[A-Za-z][A-Za-z0-9]*|\[\d+\])+")

WRONG_VALUES = st.one_of(
    st.sampled_from(["", "x", "auto", "AUTO", -1, 0, 1, -0.5, 1.5, 10**9, 2**63, 1e308, True, False, None, [], {},
                     ["a"], {"a": 1}, "../../etc/passwd", "pvc://other/../x", "pvc://Bad_Claim/x",
                     "s3://", "http://", "/", "hf://x", "a" * 300, "\u0000", "nan", "-inf"]),
    st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=20),
)
CONTRADICTIONS: list[dict[str, Any]] = [
    {"dataset": {"split": {"validation": 0.6, "test": 0.6}}},
    {"dataset": {"format": "classification", "labels": []}},
    {"dataset": {"format": "text", "labels": ["a", "a"]}},
    {"serving": {"enabled": True, "runtime": "vllm", "resources": {"gpus": 0}}},
    {"training": {"earlyStopping": {"enabled": True, "metric": "valAccuracy"}}, "dataset": {"format": "text"}},
    {"method": {"type": "full", "lora": {"rank": 0}}},
    {"hyperparameters": {"epochs": 0}},
    {"hyperparameters": {"batchSize": "auto", "maxSeqLength": 1}},
    {"output": {"storage": "s3://bucket/prefix"}},
    {"output": {"storage": "/tmp/local"}},
    {"model": {"source": "pvc://models/../../kube-system/secrets"}},
    {"model": {"source": "pvc://other-namespace.claim/x"}},
    {"dataset": {"train": {"source": "pvc://data/train.jsonl", "fileFormat": "parquet"},
                 "validation": {"source": "http://169.254.169.254/latest/meta-data"}}},
    {"resources": {"gpus": -1}},
    {"resources": {"queueName": "Not A Label"}},
    {"backoffLimit": -3},
    {"activeDeadlineSeconds": 0},
    {"ttlSecondsAfterFinished": -1},
    {"serving": {"replicas": 10**6}},
    {"suspend": "yes"},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _set(root: dict[str, Any], path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    parent: Any = root
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else copy.deepcopy(value)
    return merged


@st.composite
def finetunejob_specs(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A shipped example with 0-3 mutations; returns (spec, a description of each mutation)."""
    spec = copy.deepcopy(draw(st.sampled_from(EXAMPLES))["spec"])
    done: list[str] = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["wrong", "wrong", "delete", "unknown-field", "enum", "contradiction"]))
        paths = _paths(spec)
        if kind == "contradiction":
            patch = draw(st.sampled_from(CONTRADICTIONS))
            spec = _merge(spec, patch)
            done.append(f"contradiction {json.dumps(patch)}")
            continue
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        where = ".".join(str(p) for p in path)
        if kind == "delete":
            _set(spec, path, None, delete=True)
            done.append(f"delete spec.{where}")
        elif kind == "unknown-field":
            parent = path[:-1]
            target: Any = spec
            for part in parent:
                target = target[part]
            if isinstance(target, dict):
                # A copy: sampled_from hands out the same {"a": 1} object every time, and a later
                # mutation inside it would change the module constant (and could nest it in itself).
                target[draw(st.sampled_from(["namespace", "secretRef", "credentials", "typo", "hostPath"]))] = \
                    copy.deepcopy(draw(WRONG_VALUES))
                done.append(f"unknown field under spec.{'.'.join(str(p) for p in parent)}")
        elif kind == "enum":
            value = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC_", min_size=1, max_size=12))
            _set(spec, path, value)
            done.append(f"spec.{where} = {value!r}")
        else:
            value = copy.deepcopy(draw(WRONG_VALUES))
            _set(spec, path, value)
            done.append(f"spec.{where} = {value!r}"[:200])
    return spec, done


class Tally:
    """What the generated specs came to (printed as the issue's figures)."""

    def __init__(self) -> None:
        self.rejected = 0
        self.accepted_started = 0
        self.accepted_failed = 0
        self.accepted: list[dict[str, Any]] = []
        self.reasons: dict[str, int] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    """Control plane + operator, no node (nothing here needs a pod to run)."""
    with local_stack.LocalStack(tmp_path_factory.mktemp("fuzz"), resync_seconds=5, with_node=False) as running:
        yield running


@pytest.fixture(scope="module")
def kube(stack: local_stack.LocalStack) -> Kube:
    return Kube(stack.plane.api_client())


@pytest.fixture(scope="module")
def fuzz_namespace(kube: Kube) -> str:
    kube.core.create_namespace({"metadata": {"name": "fuzz", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    wait_until(lambda: kube.core.read_namespaced_service_account("default", "fuzz"), 60, "the service account")
    return "fuzz"


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


def rejection_names_a_field(error: ApiException) -> str | None:
    """The field the API server's answer names, or None."""
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        return None
    causes = (body.get("details") or {}).get("causes") or []
    for cause in causes:
        if str(cause.get("field", "")).startswith("spec"):
            return str(cause["field"])
    found = FIELD.search(str(body.get("message", "")))
    return found.group(0) if found else None


def secret_and_claim_references(manifest: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Every Secret and PersistentVolumeClaim a child's pod template refers to."""
    secrets: set[str] = set()
    claims: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                secrets.add(node["secretKeyRef"]["name"])
            if "secret" in node and isinstance(node["secret"], dict):
                secrets.add(node["secret"].get("secretName", ""))
            if "persistentVolumeClaim" in node:
                claims.add(node["persistentVolumeClaim"]["claimName"])
            if "secretRef" in node:
                secrets.add(node["secretRef"].get("name", ""))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return secrets, claims


def claims_named_in(spec: dict[str, Any]) -> set[str]:
    return {match for match in re.findall(r"pvc://([a-z0-9-]+)", json.dumps(spec))}


def children_of(stored: dict[str, Any]) -> list[dict[str, Any]]:
    """Every child the operator would create for an accepted job at any stage."""
    decision = reconcile.reconcile(reconcile.Observed(job=stored, now=datetime.now(timezone.utc)), SETTINGS)
    created = [a.manifest for a in decision.actions if isinstance(a, reconcile.CreateChild)]
    if created:
        rendered = render.trainer_config_for(stored)
        created.append(builders.trainer_job(stored, typed(stored), rendered, SETTINGS, admitted=True))
        if (stored["spec"].get("serving") or {}).get("enabled"):
            try:
                model = render.model_location(stored)
            except render.SpecError:
                # The operator creates no serving objects then (ServingInvalid), e.g. an unmerged adapter on hf://.
                return created
            created.append(builders.serving_key_secret(stored, "fuzz-key"))
            created.append(builders.serving_deployment(stored, typed(stored), model, "sha256:" + "0" * 64, SETTINGS))
            created.append(builders.serving_service(stored))
    return created


def dry_run_create(kube: Kube, namespace: str, manifest: dict[str, Any]) -> None:
    creators = {"Job": kube.batch.create_namespaced_job, "ConfigMap": kube.core.create_namespaced_config_map,
                "Secret": kube.core.create_namespaced_secret, "Deployment": kube.apps.create_namespaced_deployment,
                "Service": kube.core.create_namespaced_service}
    creators[manifest["kind"]](namespace, manifest, dry_run="All")


class TestGeneratedSpecs:
    counter = 0

    @settings(max_examples=SPECS, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(case=finetunejob_specs())
    def test_each_is_rejected_naming_a_field_or_accepted_and_handled(
            self, case: tuple[dict[str, Any], list[str]], kube: Kube, fuzz_namespace: str, tally: Tally) -> None:
        spec, mutations = case
        TestGeneratedSpecs.counter += 1
        name = f"fuzz-{TestGeneratedSpecs.counter:04d}"
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
                "spec": spec}
        try:
            stored = kube.create_ftj(fuzz_namespace, body, dry_run=True)
        except ApiException as error:
            assert error.status in (400, 422), (error.status, error.body, mutations)
            assert rejection_names_a_field(error), f"no field named in {error.body} for {mutations}"
            tally.rejected += 1
            return
        stored["metadata"].setdefault("uid", f"00000000-0000-0000-0000-{TestGeneratedSpecs.counter:012d}")
        stored["metadata"]["namespace"] = fuzz_namespace
        decision = reconcile.reconcile(reconcile.Observed(job=stored, now=datetime.now(timezone.utc)), SETTINGS)
        conditions = {c["type"]: c for c in decision.status_patch.get("conditions", [])}
        if conditions.get("Failed", {}).get("status") == "True":
            failed = conditions["Failed"]
            assert failed["reason"] in ("InvalidSpec", "ModelSourceNotAllowed", "PolicyViolation"), failed
            assert FIELD.search(failed["message"]), f"no field named in {failed['message']!r} for {mutations}"
            assert not decision.actions, "a failed spec creates nothing"
            tally.accepted_failed += 1
            tally.reasons[failed["reason"]] = tally.reasons.get(failed["reason"], 0) + 1
        else:
            kinds = [(a.manifest["kind"], a.manifest["metadata"]["name"]) for a in decision.actions
                     if isinstance(a, reconcile.CreateChild)]
            assert ("Job", f"{name}-validate") in kinds, (kinds, mutations)
            tally.accepted_started += 1
            for child in children_of(stored):
                secrets, claims = secret_and_claim_references(child)
                # Its own progress token, when served its own serving API key, and the Secrets the
                # spec itself names in spec.credentials (the tenant's own, by reference): nothing else.
                credentials = stored["spec"].get("credentials")
                named = {part.get("secretName") for part in credentials.values() if isinstance(part, dict)} \
                    if isinstance(credentials, dict) else set()
                assert secrets <= {f"{name}-progress", f"{name}-serving-key"} | named, (secrets, mutations)
                assert claims <= claims_named_in(stored["spec"]), (claims, mutations)
                try:
                    dry_run_create(kube, fuzz_namespace, child)
                except ApiException as error:
                    pytest.fail(f"the API server refuses the {child['kind']} the operator would create for "
                                f"{mutations}: {error.body}")
        if len(tally.accepted) < LIVE_SAMPLE * 3:
            tally.accepted.append(body)

    def test_a_sample_runs_on_the_real_operator_to_a_clear_state_and_deletes_cleanly(
            self, stack: local_stack.LocalStack, kube: Kube, tally: Tally) -> None:
        total = tally.rejected + tally.accepted_started + tally.accepted_failed
        print(f"\nFIGURE hypothesis: {total} specs; rejected by the API server naming a field: {tally.rejected}; "
              f"accepted and started: {tally.accepted_started}; accepted and Failed with a field named: "
              f"{tally.accepted_failed} {tally.reasons}")
        assert total >= min(500, SPECS - 20)
        assert tally.rejected >= SPECS // 10 and tally.accepted_started >= SPECS // 10, "the generator covers both sides"
        namespace = "fuzz-live"
        kube.core.create_namespace({"metadata": {"name": namespace, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted"}}})
        wait_until(lambda: kube.core.read_namespaced_service_account("default", namespace), 60, "service account")
        sample = tally.accepted[::3][:LIVE_SAMPLE]
        for body in sample:
            kube.create_ftj(namespace, body)

        def clear(job: dict[str, Any]) -> bool:
            found = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}
            validated, failed = found.get("Validated", {}), found.get("Failed", {})
            if failed.get("status") == "True":
                return bool(FIELD.search(failed.get("message", "")))
            return validated.get("reason") == "ValidatingDataset"

        wait_until(lambda: len(kube.ftjs(namespace)) == len(sample) and all(clear(j) for j in kube.ftjs(namespace)),
                   120, "every sampled job to reach a clear state", interval=1)
        validating = [j for j in kube.ftjs(namespace) if j["status"]["phase"] != "Failed"]
        jobs = {j["metadata"]["name"] for j in kube.jobs(namespace)}
        assert {f"{j['metadata']['name']}-validate" for j in validating} <= jobs
        with urllib.request.urlopen(f"{stack.metrics_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        errors = [line for line in metrics.splitlines() if line.startswith("kubetune_reconcile_errors_total{")
                  and not line.endswith(" 0.0")]
        # An error answer of a busy API server (cause="api") is retried like any controller's, and is not
        # the input's doing; the operator's own errors and name conflicts in a namespace holding only
        # its objects would be.
        api_errors = [line for line in errors if 'cause="api"' in line]
        if api_errors:
            print(f"FIGURE hypothesis live sample: API server errors retried: {api_errors}\n{_failed_reconciles(stack)}")
        assert not set(errors) - set(api_errors), (errors, _failed_reconciles(stack))
        assert stack.operator is not None and stack.operator.poll() is None

        started = time.monotonic()
        for body in sample:
            kube.delete_ftj(namespace, body["metadata"]["name"])
        wait_until(lambda: not kube.ftjs(namespace), 60, "every sampled job to be deleted")
        wait_until(lambda: not kube.jobs(namespace), 60, "their Jobs to be collected")
        print(f"FIGURE hypothesis live sample: {len(sample)} jobs ({len(validating)} validating, "
              f"{len(sample) - len(validating)} Failed), all deleted in {time.monotonic() - started:.1f}s")
