"""The FineTuneJob CRD is generated from the typed models, and agrees with them and with the trainer.

These checks need no control plane; tests/integration/api/ submits the same
CRD to the real API server.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import config as cfg, finetunejob as models, schema as apischema
from kubetune.operator import crd

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"


def version_of(manifest: dict[str, Any]) -> dict[str, Any]:
    (version,) = manifest["spec"]["versions"]
    return typing.cast(dict[str, Any], version)


def spec_schema() -> dict[str, Any]:
    root = version_of(crd.crd_manifest(crd.FINETUNEJOB))["schema"]["openAPIV3Schema"]
    return typing.cast(dict[str, Any], root["properties"]["spec"])


def walk(node: dict[str, Any], path: str = "") -> typing.Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node`, with its field path."""
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def apply_schema_defaults(node: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting makes of `value` (objects only)."""
    if not isinstance(value, dict) or node.get("type") != "object":
        return value
    result = dict(value)
    for key, child in (node.get("properties") or {}).items():
        if key not in result and "default" in child:
            result[key] = child["default"]
        if key in result:
            result[key] = apply_schema_defaults(child, result[key])
    return result


class TestTheCheckedInCrd:
    def test_equals_the_generator_output(self) -> None:
        assert CRD_FILE.read_text(encoding="utf-8") == crd.render_yaml(crd.FINETUNEJOB), (
            "crds/ is stale: run python -m kubetune.operator.crd --write")

    def test_check_mode_reports_a_stale_file(self, tmp_path: Path) -> None:
        assert crd.main(["--write", "--dir", str(tmp_path)]) == 0
        assert crd.main(["--check", "--dir", str(tmp_path)]) == 0
        stale = tmp_path / crd.FINETUNEJOB.file_name
        stale.write_text(stale.read_text() + "# edited by hand\n")
        assert crd.main(["--check", "--dir", str(tmp_path)]) == 1

    def test_is_valid_yaml_of_one_crd(self) -> None:
        manifest = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
        assert manifest["kind"] == "CustomResourceDefinition"
        assert manifest["metadata"]["name"] == "finetunejobs.kubetune.io"


class TestNamesAndServing:
    manifest = crd.crd_manifest(crd.FINETUNEJOB)

    def test_group_version_scope(self) -> None:
        assert self.manifest["spec"]["group"] == "kubetune.io"
        assert self.manifest["spec"]["scope"] == "Namespaced"
        version = version_of(self.manifest)
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)

    def test_short_name_and_category(self) -> None:
        names = self.manifest["spec"]["names"]
        assert names["shortNames"] == ["ftj"]
        assert names["categories"] == ["kubetune"]
        assert (names["kind"], names["plural"], names["singular"]) == ("FineTuneJob", "finetunejobs", "finetunejob")

    def test_status_is_a_subresource(self) -> None:
        assert version_of(self.manifest)["subresources"] == {"status": {}}

    def test_printer_columns(self) -> None:
        columns = {c["name"]: c for c in version_of(self.manifest)["additionalPrinterColumns"]
                   if c.get("priority", 0) == 0}
        assert list(columns) == ["Status", "Model", "Progress", "Val-Loss", "Age"]
        assert columns["Status"]["jsonPath"] == ".status.phase"
        assert columns["Model"]["jsonPath"] == ".spec.model.source"
        assert columns["Progress"]["jsonPath"] == ".status.progress.percent"
        assert columns["Val-Loss"]["jsonPath"] == ".status.metrics.valLoss"
        assert columns["Age"]["type"] == "date"

    def test_printer_columns_point_at_schema_fields(self) -> None:
        root = version_of(self.manifest)["schema"]["openAPIV3Schema"]
        for column in version_of(self.manifest)["additionalPrinterColumns"]:
            if column["jsonPath"].startswith(".metadata"):
                continue
            node = root
            for part in column["jsonPath"].strip(".").split("."):
                node = node["properties"][part]
            assert node.get("type") == column["type"], column


class TestTheSchemaIsStructuralAndSelfDocumenting:
    def test_every_field_has_a_description(self) -> None:
        root = version_of(crd.crd_manifest(crd.FINETUNEJOB))["schema"]["openAPIV3Schema"]
        missing = [path for path, node in walk(root) if path and not path.endswith(("[]", ".*", ".metadata"))
                   and not node.get("description")]
        assert missing == []

    def test_every_node_has_a_type(self) -> None:
        root = version_of(crd.crd_manifest(crd.FINETUNEJOB))["schema"]["openAPIV3Schema"]
        untyped = [path for path, node in walk(root)
                   if "type" not in node and not node.get("x-kubernetes-int-or-string")]
        assert untyped == []

    def test_every_string_and_list_under_a_rule_is_bounded(self) -> None:
        """CEL cost estimation needs maxLength/maxItems on what rules read."""
        unbounded = [path for path, node in walk(spec_schema())
                     if (node.get("type") == "string" and "enum" not in node and "maxLength" not in node)
                     or (node.get("type") == "array" and "maxItems" not in node)]
        assert unbounded == []

    def test_preserve_unknown_fields_only_on_open_ended_results(self) -> None:
        root = version_of(crd.crd_manifest(crd.FINETUNEJOB))["schema"]["openAPIV3Schema"]
        open_ended = [path for path, node in walk(root) if node.get("x-kubernetes-preserve-unknown-fields")]
        # The base model's results mirror the tuned model's, further metrics included.
        assert open_ended == [".status.results", ".status.results.baseline"]

    def test_conditions_are_a_map_keyed_by_type(self) -> None:
        root = version_of(crd.crd_manifest(crd.FINETUNEJOB))["schema"]["openAPIV3Schema"]
        conditions = root["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert set(conditions["items"]["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}

    def test_integer_hyperparameters_accept_auto(self) -> None:
        hyper = spec_schema()["properties"]["hyperparameters"]["properties"]
        for name in ("epochs", "batchSize", "maxSeqLength", "gradientAccumulationSteps", "seed"):
            assert hyper[name]["x-kubernetes-int-or-string"] is True, name
            assert hyper[name]["default"] == "auto"
            assert "auto" in hyper[name]["x-kubernetes-validations"][0]["rule"]
        for name in ("learningRate", "warmupRatio", "weightDecay", "dropout"):
            assert hyper[name]["type"] == "number" and "default" not in hyper[name], name


class TestImmutability:
    def test_run_defining_sections_carry_transition_rules(self) -> None:
        rules = spec_schema()["x-kubernetes-validations"]
        guarded = {r["fieldPath"] for r in rules if "oldSelf" in r["rule"]}
        assert guarded == {".model", ".dataset", ".output", ".method", ".hyperparameters", ".training",
                           ".evaluation", ".resources"}

    def test_editable_fields_carry_none(self) -> None:
        rules = spec_schema()["x-kubernetes-validations"]
        text = " ".join(r["rule"] for r in rules if "oldSelf" in r["rule"])
        for editable in ("suspend", "serving", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
            assert f"self.{editable}" not in text


class TestModelsAndSchemaAgree:
    """Python defaults equal schema defaults, field by field."""

    MINIMAL = {"model": {"source": "hf://org/model"}, "dataset": {"train": {"source": "pvc://data/train.jsonl"}},
               "output": {"storage": "pvc://models/out"}}

    def test_schema_defaulting_equals_typed_defaulting(self) -> None:
        defaulted_by_server = apply_schema_defaults(spec_schema(), self.MINIMAL)
        defaulted_by_model = models.FineTuneJobSpec.from_dict(self.MINIMAL).to_dict()
        assert defaulted_by_server == defaulted_by_model

    def test_every_property_is_a_model_field(self) -> None:
        def check(model: type, node: dict[str, Any]) -> None:
            infos = {info.key: info for info in apischema.fields_of(model)}
            assert set(node["properties"]) == set(infos), model
            for key, info in infos.items():
                assert node["properties"][key]["description"].startswith(info.description)
                if apischema.is_model(info.hint):
                    check(info.hint, node["properties"][key])

        check(models.FineTuneJobSpec, spec_schema())


TRAINER_SECTIONS = ("model", "dataset", "method", "hyperparameters", "training", "evaluation")


@pytest.mark.parametrize("section", TRAINER_SECTIONS)
def test_the_trainer_config_section_is_the_spec_section_itself(section: str) -> None:
    """One definition: the trainer parses these sections with the spec's own classes (same keys, enums,
    bounds, defaults and rules across fields), not with a parser of its own that could drift."""
    spec_hint = {info.key: info.hint for info in apischema.fields_of(models.FineTuneJobSpec)}[section]
    config_hint = {info.key: info.hint for info in apischema.fields_of(cfg.TrainerConfig)}[section]
    assert config_hint is spec_hint
