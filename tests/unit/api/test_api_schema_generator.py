"""The generic model -> OpenAPI generator (`kubetune.api.schema`), on small models of its own."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, NotRequired, TypedDict

import pytest

from kubetune.api import schema as apischema
from kubetune.api.schema import (
    Immutable,
    IntOrAuto,
    ListType,
    MaxItems,
    MaxLength,
    Maximum,
    Minimum,
    NoDefault,
    Pattern,
    Quantity,
    Rule,
    rules,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    """An inner section."""

    size: Annotated[int, Minimum(1), Maximum(10)] = 2
    """How big,
    in units."""
    flavour: Literal["sweet", "sour"] = "sweet"
    """The flavour."""


@rules(Rule("self.count >= 0", "count must not be negative", field_path=".count"))
@dataclasses.dataclass(frozen=True)
class Outer:
    """An example kind's spec."""

    name: Annotated[str, MaxLength(20), Pattern(r"^[a-z]+$")]
    """A required name."""
    count: IntOrAuto = "auto"
    """A count or auto."""
    ratio: Annotated[float, Minimum(0), Maximum(1, exclusive=True)] | None = None
    """An optional ratio."""
    tags: Annotated[list[Annotated[str, MaxLength(8)]], MaxItems(3), ListType("set")] = dataclasses.field(
        default_factory=list)
    """Tags."""
    inner: Annotated[Inner, Immutable("set it once")] = dataclasses.field(default_factory=Inner)
    """The inner section."""
    hidden_default: Annotated[Inner, NoDefault()] = dataclasses.field(default_factory=Inner)
    """An inner section without a schema default."""
    extra: dict[str, Annotated[str, MaxLength(5)]] | None = None
    """A map."""
    amount: Annotated[int | str, Quantity()] | None = None
    """A quantity."""
    frozen: Annotated[str, Immutable()] | None = None
    """An optional immutable value."""


class Observed(TypedDict, total=False):
    """An example status."""

    phase: Literal["Up", "Down"]
    """The phase."""
    when: Annotated[str, apischema.Format("date-time")]
    """A time."""


class Entry(TypedDict):
    """A list entry."""

    key: str
    """The key."""
    note: NotRequired[str]
    """An optional note."""


@dataclasses.dataclass(frozen=True)
class Undocumented:
    """Lacks a field docstring."""

    value: int = 1


class TestSchemaGeneration:
    schema = apischema.schema_for(Outer)

    def test_descriptions_come_from_field_docstrings_reflowed(self) -> None:
        assert self.schema["description"] == "An example kind's spec."
        assert self.schema["properties"]["inner"]["properties"]["size"]["description"] == "How big, in units. Defaults to 2."

    def test_fields_without_default_are_required(self) -> None:
        assert self.schema["required"] == ["name"]

    def test_scalar_types_bounds_and_patterns(self) -> None:
        props = self.schema["properties"]
        assert props["name"] == {"description": "A required name.", "type": "string", "maxLength": 20,
                                 "pattern": "^[a-z]+$"}
        assert props["ratio"]["type"] == "number"
        assert (props["ratio"]["minimum"], props["ratio"]["maximum"], props["ratio"]["exclusiveMaximum"]) == (0, 1, True)
        size = props["inner"]["properties"]["size"]
        assert (size["type"], size["minimum"], size["maximum"], size["default"]) == ("integer", 1, 10, 2)

    def test_literals_become_enums(self) -> None:
        flavour = self.schema["properties"]["inner"]["properties"]["flavour"]
        assert flavour["enum"] == ["sweet", "sour"] and flavour["default"] == "sweet"

    def test_int_or_auto_is_int_or_string_with_a_rule(self) -> None:
        count = self.schema["properties"]["count"]
        assert count["x-kubernetes-int-or-string"] is True
        assert "type" not in count and count["default"] == "auto"
        assert count["x-kubernetes-validations"][0]["rule"] == "type(self) == string ? self == 'auto' : (true)"

    def test_quantities_are_int_or_string_with_a_quantity_rule(self) -> None:
        amount = self.schema["properties"]["amount"]
        assert amount["x-kubernetes-int-or-string"] is True
        assert "isQuantity(self)" in amount["x-kubernetes-validations"][0]["rule"]

    def test_lists_and_maps(self) -> None:
        tags = self.schema["properties"]["tags"]
        assert tags["items"] == {"type": "string", "maxLength": 8}
        assert (tags["maxItems"], tags["x-kubernetes-list-type"]) == (3, "set")
        assert "default" not in tags
        extra = self.schema["properties"]["extra"]
        assert extra["additionalProperties"] == {"type": "string", "maxLength": 5}

    def test_nested_models_default_to_their_default_instance(self) -> None:
        assert self.schema["properties"]["inner"]["default"] == {"size": 2, "flavour": "sweet"}
        assert "default" not in self.schema["properties"]["hiddenDefault"]

    def test_class_rules_and_immutability_rules_sit_on_the_object(self) -> None:
        validations = self.schema["x-kubernetes-validations"]
        assert validations[0] == {"rule": "self.count >= 0", "message": "count must not be negative",
                                  "fieldPath": ".count"}
        inner = validations[1]
        assert inner["rule"] == ("has(self.inner) == has(oldSelf.inner) && "
                                 "(!has(self.inner) || self.inner == oldSelf.inner)")
        assert inner["message"] == "inner is immutable once the object is created: set it once"
        assert (inner["fieldPath"], inner["reason"]) == (".inner", "FieldValueForbidden")
        frozen = validations[2]
        assert frozen["rule"] == ("has(self.frozen) == has(oldSelf.frozen) && "
                                  "(!has(self.frozen) || self.frozen == oldSelf.frozen)")

    def test_typeddicts_use_their_keys_and_requiredness(self) -> None:
        observed = apischema.schema_for(Observed)
        assert "required" not in observed
        assert observed["properties"]["when"]["format"] == "date-time"
        entry = apischema.schema_for(Entry)
        assert entry["required"] == ["key"]

    def test_a_field_without_docstring_is_a_programming_error(self) -> None:
        with pytest.raises(apischema.SchemaError, match="Undocumented.value: every field needs a docstring"):
            apischema.schema_for(Undocumented)


class TestParsing:
    def test_applies_defaults_and_converts_keys(self) -> None:
        parsed = apischema.parse(Outer, {"name": "abc", "hiddenDefault": {"size": 3}}, "spec")
        assert parsed == Outer(name="abc", hidden_default=Inner(size=3))
        assert apischema.to_dict(parsed)["hiddenDefault"] == {"size": 3, "flavour": "sweet"}

    def test_round_trips(self) -> None:
        value = Outer(name="x", count=4, ratio=0.5, tags=["a"], extra={"k": "v"}, amount="500m", frozen="f")
        assert apischema.parse(Outer, apischema.to_dict(value), "spec") == value

    @pytest.mark.parametrize(("data", "problem"), [
        ({}, "spec.name: required"),
        ({"name": 3}, "spec.name: must be a string, got 3"),
        ({"name": "ABC"}, "spec.name: must match ^[a-z]+$, got \"ABC\""),
        ({"name": "a" * 21}, "spec.name: must have at most 20 characters, got 21"),
        ({"name": "a", "count": "many"}, 'spec.count: must be an integer or "auto", got "many"'),
        ({"name": "a", "count": True}, 'spec.count: must be an integer or "auto", got true'),
        ({"name": "a", "ratio": 1}, "spec.ratio: must be >= 0 and < 1, got 1"),
        ({"name": "a", "inner": {"size": 0}}, "spec.inner.size: must be from 1 to 10, got 0"),
        ({"name": "a", "inner": {"flavour": "bitter"}}, 'spec.inner.flavour: must be one of "sweet", "sour", got "bitter"'),
        ({"name": "a", "tags": ["a", "a"]}, "spec.tags: items must be unique"),
        ({"name": "a", "tags": ["a", "b", "c", "d"]}, "spec.tags: must have at most 3 items, got 4"),
        ({"name": "a", "amount": "lots"}, "spec.amount: must be a Kubernetes quantity such as 4, 500m or 16Gi, got \"lots\""),
        ({"name": "a", "colour": "red"}, "spec.colour: unknown field; allowed:"),
    ])
    def test_names_the_bad_field(self, data: dict[str, object], problem: str) -> None:
        with pytest.raises(apischema.ValidationError) as caught:
            apischema.parse(Outer, data, "spec")
        assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems

    def test_reports_every_problem_at_once(self) -> None:
        with pytest.raises(apischema.ValidationError) as caught:
            apischema.parse(Outer, {"name": 1, "count": -1.5, "inner": {"size": 99}}, "spec")
        assert len(caught.value.problems) == 3

    def test_typeddicts_parse_into_plain_dicts(self) -> None:
        assert apischema.parse(Observed, {"phase": "Up"}, "status") == {"phase": "Up"}
        with pytest.raises(apischema.ValidationError, match="status.phase"):
            apischema.parse(Observed, {"phase": "Sideways"}, "status")
