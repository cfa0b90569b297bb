"""Typed API models and their OpenAPI v3 schemas: one source of truth for a CRD.

A model is a dataclass (a spec: typed, with defaults, built by `parse`) or a
TypedDict (a status: the plain dicts the operator writes). Every field carries
a docstring, the string literal right after it, which becomes the field's
`description`, so `kubectl explain` shows the same text as the Python source.
Constraints ride on the type with `typing.Annotated`::

    @dataclasses.dataclass(frozen=True)
    class LoraSettings:
        rank: Annotated[int, Minimum(1), Maximum(1024)] = 8
        \"\"\"LoRA rank r: adapter capacity.\"\"\"

- `schema_for(Model)` gives the structural OpenAPI v3 schema: `type` on every
  node, `description` on every field, `default` from the Python default (a
  nested model with a default factory defaults to its default instance), `required` for fields without a default, value bounds, and CEL rules
  (`x-kubernetes-validations`) from `Rule`, `Immutable` and `@rules(...)`.
- `parse(Model, data, path)` builds the typed model from JSON-like data,
  applying the same defaults and checking types, enums, bounds, lengths and
  patterns; it raises one `ValidationError` naming every bad field. CEL rules are
  the API server's business and are not re-evaluated here.

Python attribute names are snake_case; JSON keys are their camelCase spelling.
TypedDict keys are JSON keys already. Nothing here knows about FineTuneJob:
any CRD (the FineTuneSweep too) is generated the same way.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal, TypeVar, Union

T = TypeVar("T")
Schema = dict[str, Any]
"""One OpenAPI v3 schema node, JSON-ready."""

AUTO: Final = "auto"
IntOrAuto = Union[int, Literal["auto"]]
"""An integer, or the string "auto" (resolved by the trainer). Bounds apply to the integer."""

# --- markers: constraints carried by `Annotated` ------------------------------------


@dataclasses.dataclass(frozen=True)
class Minimum:
    """Smallest allowed number (`exclusive`: the value itself is not allowed)."""

    value: float
    exclusive: bool = False


@dataclasses.dataclass(frozen=True)
class Maximum:
    """Largest allowed number (`exclusive`: the value itself is not allowed)."""

    value: float
    exclusive: bool = False


@dataclasses.dataclass(frozen=True)
class MinLength:
    """Fewest characters in a string."""

    value: int


@dataclasses.dataclass(frozen=True)
class MaxLength:
    """Most characters in a string (also bounds the cost of CEL rules over it)."""

    value: int


@dataclasses.dataclass(frozen=True)
class MinItems:
    """Fewest items in a list."""

    value: int


@dataclasses.dataclass(frozen=True)
class MaxItems:
    """Most items in a list (also bounds the cost of CEL rules over it)."""

    value: int


@dataclasses.dataclass(frozen=True)
class MaxProperties:
    """Most keys in a map."""

    value: int


@dataclasses.dataclass(frozen=True)
class Pattern:
    """An (ECMA and Python compatible, anchored by the author) regular expression for a string."""

    regex: str


@dataclasses.dataclass(frozen=True)
class Format:
    """An OpenAPI string format, e.g. `date-time`."""

    name: str


@dataclasses.dataclass(frozen=True)
class Rule:
    """A CEL rule (`x-kubernetes-validations` entry) on the value it annotates.

    `message` is what the user reads, after the field path the API server puts
    in front; `field_path` (relative, e.g. `.lora`) moves the error to a child
    field; `reason` is one of FieldValueInvalid, FieldValueForbidden,
    FieldValueRequired, FieldValueDuplicate.
    """

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None
    check: Callable[[Any], bool] | None = dataclasses.field(default=None, compare=False, repr=False)
    """The same rule in Python, on the parsed object (`parse` applies it): rules across fields have one,
    so that data parsed here (the trainer's config, a spec read back) obeys what the API server
    enforces. The CEL text stays the API server's; the two are tested to agree on the same cases."""

    def to_schema(self) -> Schema:
        entry: Schema = {"rule": self.rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        if self.reason:
            entry["reason"] = self.reason
        return entry


def matches(regex: str, message: str) -> Rule:
    """A rule that a string matches `regex` (RE2 on the API server, `re` here: keep to their common
    syntax), with its Python twin."""
    compiled = re.compile(regex)
    return Rule(f"self.matches('{regex}')", message, check=lambda value: compiled.search(value) is not None)


@dataclasses.dataclass(frozen=True)
class Immutable:
    """The field cannot change once the object exists (a transition rule on the parent object).

    The rule sits on the parent so that adding or removing an optional field is
    caught too (a rule on the field itself only runs when old and new both have it).
    """

    why: str = ""
    """Appended to the error message, e.g. what to do instead."""


@dataclasses.dataclass(frozen=True)
class ListType:
    """`x-kubernetes-list-type` (`atomic`, `set` or `map`) and, for `map`, the key fields."""

    kind: Literal["atomic", "set", "map"]
    map_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Quantity:
    """An int-or-string Kubernetes resource quantity (`4`, `500m`, `16Gi`), never negative."""


@dataclasses.dataclass(frozen=True)
class NoDefault:
    """Do not put the Python default into the schema (e.g. a nested model that must stay absent)."""


@dataclasses.dataclass(frozen=True)
class PreserveUnknownFields:
    """Keep keys the schema does not list (`x-kubernetes-preserve-unknown-fields`): open-ended maps only."""


def rules(*items: Rule) -> Callable[[type[T]], type[T]]:
    """Class decorator: CEL rules on the model's object, for rules across its fields."""

    def attach(cls: type[T]) -> type[T]:
        setattr(cls, "__api_rules__", tuple(getattr(cls, "__api_rules__", ())) + items)
        return cls

    return attach


QUANTITY_REGEX = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                  r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
"""The Kubernetes quantity syntax (as in resource.Quantity), for the Python-side check."""


class SchemaError(TypeError):
    """A model cannot be turned into a schema (a programming error, e.g. a field without a docstring)."""


class ValidationError(ValueError):
    """Data does not fit a model; `problems` lists each one as "field.path: what is wrong"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun}:\n  " + "\n  ".join(problems))


# --- fields of a model ------------------------------------------------------------------


def camel_case(name: str) -> str:
    """The JSON key of a Python attribute: `ttl_seconds_after_finished` -> `ttlSecondsAfterFinished`."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a model, as the generator and the parser see it."""

    name: str
    """Python attribute (dataclass) or key (TypedDict)."""
    key: str
    """JSON key."""
    hint: Any
    """The type with `Annotated`, `Optional`, `Required` stripped."""
    markers: tuple[Any, ...]
    """Constraint markers from `Annotated` at any level."""
    required: bool
    """Must be present (a dataclass field without default, or a required TypedDict key)."""
    default: Any
    """The Python default (`dataclasses.MISSING` when none; a factory's product otherwise)."""
    allows_none: bool
    """The Python type includes None (absent in JSON)."""
    description: str


def is_model(hint: Any) -> bool:
    """Whether `hint` is a model class (a dataclass or a TypedDict)."""
    return isinstance(hint, type) and (dataclasses.is_dataclass(hint) or typing.is_typeddict(hint))


def _strip(hint: Any) -> tuple[Any, tuple[Any, ...], bool]:
    """(bare type, markers, allows None) of a field's type hint."""
    markers: list[Any] = []
    allows_none = False
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            hint, *extra = typing.get_args(hint)
            markers.extend(extra)
        elif origin in (typing.Required, typing.NotRequired):
            (hint,) = typing.get_args(hint)
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(hint):
            allows_none = True
            rest = tuple(a for a in typing.get_args(hint) if a is not type(None))
            hint = rest[0] if len(rest) == 1 else Union[rest]
        else:
            return hint, tuple(markers), allows_none


def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings of a class: the string literal right after each annotated name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError) as error:
        raise SchemaError(f"{cls.__qualname__}: cannot read its source for field docstrings") from error
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    found: dict[str, str] = {}
    body = node.body
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


def _model_classes(model: type) -> list[type]:
    """The model and the model classes it inherits fields from, most basic first. Python 3.11 keeps
    no trace of a TypedDict's bases at run time (it is a plain dict): read them from its source."""
    if typing.is_typeddict(model):
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(model))).body
        assert isinstance(node, ast.ClassDef)
        namespace = vars(sys.modules[model.__module__])
        found: list[type] = []
        for base in node.bases:
            candidate = namespace.get(base.id) if isinstance(base, ast.Name) else None
            if candidate is not None and typing.is_typeddict(candidate):
                found += _model_classes(candidate)
        return found + [model]
    return [k for k in reversed(model.__mro__) if k is not object and is_model(k) and k.__module__ != "typing"]


_FIELDS_CACHE: dict[type, tuple[FieldInfo, ...]] = {}


def fields_of(model: type) -> tuple[FieldInfo, ...]:
    """The fields of a model class, in definition order."""
    if model in _FIELDS_CACHE:
        return _FIELDS_CACHE[model]
    hints = typing.get_type_hints(model, include_extras=True)
    docs: dict[str, str] = {}
    for klass in _model_classes(model):
        docs.update(_docstrings(klass))
    result: list[FieldInfo] = []
    if dataclasses.is_dataclass(model):
        for field in dataclasses.fields(model):
            default: Any = field.default
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            hint, markers, allows_none = _strip(hints[field.name])
            result.append(FieldInfo(field.name, camel_case(field.name), hint, markers,
                                    default is dataclasses.MISSING, default, allows_none,
                                    _description(model, field.name, docs)))
    else:
        total = bool(getattr(model, "__total__", True))
        for key, raw in hints.items():
            # Read Required/NotRequired from the resolved hint: under postponed annotations
            # Python 3.11 cannot see them when it computes __required_keys__.
            wrapper = typing.get_origin(raw)
            required = wrapper is typing.Required or (total and wrapper is not typing.NotRequired)
            hint, markers, allows_none = _strip(raw)
            result.append(FieldInfo(key, key, hint, markers, required, dataclasses.MISSING,
                                    allows_none, _description(model, key, docs)))
    _FIELDS_CACHE[model] = tuple(result)
    return _FIELDS_CACHE[model]


def reflow(text: str) -> str:
    """Docstring text as a description: lines of a paragraph joined, blank-line paragraph breaks kept."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text).strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _description(model: type, name: str, docs: dict[str, str]) -> str:
    text = reflow(docs.get(name, ""))
    if not text:
        raise SchemaError(f"{model.__qualname__}.{name}: every field needs a docstring (it becomes its description)")
    return text


def model_description(model: type) -> str:
    """A model's own docstring (the description of a schema's root)."""
    return reflow(model.__doc__ or "")


# --- schema generation ------------------------------------------------------------------


def _is_int_or_auto(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin not in (Union, types.UnionType):
        return False
    args = set(typing.get_args(hint))
    return args == {int, Literal["auto"]}


def _is_int_or_string(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and set(typing.get_args(hint)) == {int, str}


def _marker(markers: tuple[Any, ...], kind: type[T]) -> T | None:
    return next((m for m in markers if isinstance(m, kind)), None)


def _number(value: float) -> float | int:
    """JSON-friendly number: integral floats print as integers."""
    return int(value) if float(value).is_integer() else value


def _bounds_text(markers: tuple[Any, ...]) -> str:
    low, high = _marker(markers, Minimum), _marker(markers, Maximum)
    if low is not None and high is not None and not low.exclusive and not high.exclusive:
        return f"from {_number(low.value)} to {_number(high.value)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low.exclusive else '>='} {_number(low.value)}")
    if high is not None:
        parts.append(f"{'<' if high.exclusive else '<='} {_number(high.value)}")
    return " and ".join(parts)


def _int_or_auto_rule(markers: tuple[Any, ...]) -> Rule:
    low, high = _marker(markers, Minimum), _marker(markers, Maximum)
    checks = []
    if low is not None:
        checks.append(f"self {'>' if low.exclusive else '>='} {_number(low.value)}")
    if high is not None:
        checks.append(f"self {'<' if high.exclusive else '<='} {_number(high.value)}")
    integer_check = " && ".join(checks) or "true"
    bounds = _bounds_text(markers)
    message = f'must be an integer {bounds}, or "auto"' if bounds else 'must be an integer or "auto"'
    return Rule(f"type(self) == string ? self == '{AUTO}' : ({integer_check})", message)


QUANTITY_RULE = Rule("type(self) == int ? self >= 0 : (isQuantity(self) && !quantity(self).isLessThan(quantity('0')))",
                     "must be a non-negative Kubernetes quantity such as 4, 500m or 16Gi")


def type_schema(hint: Any, markers: tuple[Any, ...] = ()) -> Schema:
    """The schema of a value of type `hint` with its markers (no description)."""
    node: Schema
    validations: list[Rule] = [m for m in markers if isinstance(m, Rule)]
    origin = typing.get_origin(hint)
    if _is_int_or_auto(hint):
        node = {"x-kubernetes-int-or-string": True}
        validations.insert(0, _int_or_auto_rule(markers))
    elif _is_int_or_string(hint):
        node = {"x-kubernetes-int-or-string": True}
        if _marker(markers, Quantity) is not None:
            validations.insert(0, QUANTITY_RULE)
    elif hint is bool:
        node = {"type": "boolean"}
    elif hint is int:
        node = {"type": "integer", "format": "int64"}
    elif hint is float:
        node = {"type": "number"}
    elif hint is str:
        node = {"type": "string"}
    elif origin is Literal:
        values = list(typing.get_args(hint))
        if not all(isinstance(v, str) for v in values):
            raise SchemaError(f"{hint}: only string literals are supported")
        node = {"type": "string", "enum": values}
    elif origin is list:
        item_hint, item_markers, _ = _strip(typing.get_args(hint)[0])
        node = {"type": "array", "items": type_schema(item_hint, item_markers)}
    elif origin is dict:
        key_type, value_type = typing.get_args(hint)
        if key_type is not str:
            raise SchemaError(f"{hint}: map keys must be strings")
        value_hint, value_markers, _ = _strip(value_type)
        node = {"type": "object", "additionalProperties": type_schema(value_hint, value_markers)}
    elif is_model(hint):
        node = object_schema(hint)
    else:
        raise SchemaError(f"{hint!r}: no OpenAPI mapping for this type")
    _apply_value_markers(node, hint, markers)
    if validations:
        node.setdefault("x-kubernetes-validations", [])
        node["x-kubernetes-validations"] = [r.to_schema() for r in validations] + node["x-kubernetes-validations"]
    return node


def _apply_value_markers(node: Schema, hint: Any, markers: tuple[Any, ...]) -> None:
    numeric = node.get("type") in ("integer", "number")
    for marker in markers:
        if isinstance(marker, Minimum) and numeric:
            node["minimum"] = _number(marker.value)
            if marker.exclusive:
                node["exclusiveMinimum"] = True
        elif isinstance(marker, Maximum) and numeric:
            node["maximum"] = _number(marker.value)
            if marker.exclusive:
                node["exclusiveMaximum"] = True
        elif isinstance(marker, MinLength):
            node["minLength"] = marker.value
        elif isinstance(marker, MaxLength):
            node["maxLength"] = marker.value
        elif isinstance(marker, MinItems):
            node["minItems"] = marker.value
        elif isinstance(marker, MaxItems):
            node["maxItems"] = marker.value
        elif isinstance(marker, MaxProperties):
            node["maxProperties"] = marker.value
        elif isinstance(marker, Pattern):
            node["pattern"] = marker.regex
        elif isinstance(marker, Format):
            node["format"] = marker.name
        elif isinstance(marker, ListType):
            node["x-kubernetes-list-type"] = marker.kind
            if marker.map_keys:
                node["x-kubernetes-list-map-keys"] = list(marker.map_keys)
        elif isinstance(marker, PreserveUnknownFields):
            node["x-kubernetes-preserve-unknown-fields"] = True
    if _is_int_or_auto(hint):
        node["maxLength"] = 64  # bounds the cost of the CEL rule over the string form


def _schema_default(info: FieldInfo) -> Any:
    """The `default` a field's schema carries, or MISSING."""
    if _marker(info.markers, NoDefault) is not None or info.default is dataclasses.MISSING or info.default is None:
        return dataclasses.MISSING
    if isinstance(info.default, (bool, int, float, str)):
        return info.default
    if dataclasses.is_dataclass(info.default):
        # The whole default object, not `{}`: the API server validates defaults (CEL rules
        # included) without applying the nested defaults first.
        return to_dict(info.default)
    return dataclasses.MISSING  # lists and maps: absent means empty


def _immutability_rule(info: FieldInfo) -> Rule:
    why = _marker(info.markers, Immutable)
    assert why is not None
    message = f"{info.key} is immutable once the object is created"
    if why.why:
        message += f": {why.why}"
    if info.required:
        rule = f"self.{info.key} == oldSelf.{info.key}"
    else:
        rule = (f"has(self.{info.key}) == has(oldSelf.{info.key}) && "
                f"(!has(self.{info.key}) || self.{info.key} == oldSelf.{info.key})")
    return Rule(rule, message, field_path=f".{info.key}", reason="FieldValueForbidden")


def object_schema(model: type) -> Schema:
    """The object schema of a model class: properties, required keys, defaults and rules."""
    properties: dict[str, Schema] = {}
    required: list[str] = []
    object_rules: list[Rule] = list(model_rules(model))
    for info in fields_of(model):
        prop: Schema = {"description": info.description}
        prop.update(type_schema(info.hint, info.markers))
        default = _schema_default(info)
        if default is not dataclasses.MISSING:
            prop["default"] = default
            if not isinstance(default, dict):  # `kubectl explain` prints descriptions, not defaults
                prop["description"] = f"{info.description} Defaults to {json.dumps(default)}."
        properties[info.key] = prop
        if info.required:
            required.append(info.key)
        if _marker(info.markers, Immutable) is not None:
            object_rules.append(_immutability_rule(info))
    node: Schema = {"type": "object", "properties": properties}
    if required:
        node["required"] = required
    if object_rules:
        node["x-kubernetes-validations"] = [r.to_schema() for r in object_rules]
    return node


def schema_for(model: type) -> Schema:
    """The schema of a model used as a root (e.g. `spec`): its object schema plus its class docstring."""
    return {"description": model_description(model), **object_schema(model)}


# --- parsing ----------------------------------------------------------------------------


def _describe(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _type_name(hint: Any) -> str:
    if _is_int_or_auto(hint):
        return 'an integer or "auto"'
    if _is_int_or_string(hint):
        return "an integer or a string"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(v) for v in typing.get_args(hint))
    if origin is list:
        return "a list"
    if origin is dict or is_model(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_bounds(value: float, markers: tuple[Any, ...]) -> bool:
    low, high = _marker(markers, Minimum), _marker(markers, Maximum)
    if low is not None and (value <= low.value if low.exclusive else value < low.value):
        return False
    if high is not None and (value >= high.value if high.exclusive else value > high.value):
        return False
    return True


def _parse_value(hint: Any, markers: tuple[Any, ...], value: Any, path: str, problems: list[str]) -> Any:
    """`value` converted to `hint`, or None after appending the problems found."""
    before = len(problems)
    result = _convert(hint, markers, value, path, problems)
    if len(problems) > before:
        return None
    _check_markers(hint, markers, result, path, problems)
    return result


def _convert(hint: Any, markers: tuple[Any, ...], value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    wrong = f"{path}: must be {_type_name(hint)}, got {_describe(value)}"
    if hint is Any:  # any JSON value (a message's open-ended part; never in a CRD)
        return value
    if _is_int_or_auto(hint):
        if value == AUTO:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif _is_int_or_string(hint):
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
    elif origin is list:
        if isinstance(value, list):
            item_hint, item_markers, _ = _strip(typing.get_args(hint)[0])
            return [_parse_value(item_hint, item_markers, item, f"{path}[{i}]", problems)
                    for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            value_hint, value_markers, _ = _strip(typing.get_args(hint)[1])
            return {str(k): _parse_value(value_hint, value_markers, v, f"{path}.{k}", problems)
                    for k, v in value.items()}
    elif is_model(hint):
        if isinstance(value, Mapping):
            return _parse_model(hint, value, path, problems, open_ended=_marker(markers, PreserveUnknownFields) is not None)
    problems.append(wrong)
    return None


def _check_markers(hint: Any, markers: tuple[Any, ...], value: Any, path: str, problems: list[str]) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _check_bounds(value, markers):
        suffix = ' or "auto"' if _is_int_or_auto(hint) else ""
        problems.append(f"{path}: must be {_bounds_text(markers)}{suffix}, got {_describe(value)}")
    if isinstance(value, str):
        shortest, longest = _marker(markers, MinLength), _marker(markers, MaxLength)
        if shortest is not None and len(value) < shortest.value:
            problems.append(f"{path}: must have at least {shortest.value} characters, got {_describe(value)}")
        if longest is not None and len(value) > longest.value:
            problems.append(f"{path}: must have at most {longest.value} characters, got {len(value)}")
        pattern = _marker(markers, Pattern)
        if pattern is not None and not re.search(pattern.regex, value):
            problems.append(f"{path}: must match {pattern.regex}, got {_describe(value)}")
        if _marker(markers, Quantity) is not None and not re.search(QUANTITY_REGEX, value):
            problems.append(f"{path}: must be a Kubernetes quantity such as 4, 500m or 16Gi, got {_describe(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0 and _marker(markers, Quantity) is not None:
        problems.append(f"{path}: must be a non-negative quantity, got {value}")
    if isinstance(value, list):
        fewest, most = _marker(markers, MinItems), _marker(markers, MaxItems)
        if fewest is not None and len(value) < fewest.value:
            problems.append(f"{path}: must have at least {fewest.value} items, got {len(value)}")
        if most is not None and len(value) > most.value:
            problems.append(f"{path}: must have at most {most.value} items, got {len(value)}")
        list_type = _marker(markers, ListType)
        if list_type is not None and list_type.kind == "set":
            seen = [json.dumps(item, sort_keys=True, default=str) for item in value]
            if len(set(seen)) != len(seen):
                problems.append(f"{path}: items must be unique")
    for rule in markers:
        if isinstance(rule, Rule) and rule.check is not None and value is not None and not rule.check(value):
            problems.append(f"{path}: {rule.message}")
    if isinstance(value, dict):
        most_keys = _marker(markers, MaxProperties)
        if most_keys is not None and len(value) > most_keys.value:
            problems.append(f"{path}: must have at most {most_keys.value} entries, got {len(value)}")


def _parse_model(model: type, data: Mapping[str, Any], path: str, problems: list[str], *,
                 open_ended: bool = False) -> Any:
    infos = fields_of(model)
    start = len(problems)
    known = {info.key for info in infos}
    if not open_ended:
        for key in data:
            if key not in known:
                problems.append(f"{path}.{key}: unknown field; allowed: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for info in infos:
        field_path = f"{path}.{info.key}"
        if info.key not in data or data[info.key] is None:
            if info.required:
                problems.append(f"{field_path}: required")
            continue
        parsed = _parse_value(info.hint, info.markers, data[info.key], field_path, problems)
        if parsed is not None:
            values[info.name] = parsed
    if typing.is_typeddict(model):
        extra = {k: v for k, v in data.items() if k not in known} if open_ended else {}
        return {**extra, **values}
    try:
        result = model(**values)
    except TypeError:  # a required field was missing or bad: already reported
        return None
    if len(problems) == start:  # rules across fields only once the fields themselves are right
        for rule in model_rules(model):
            if rule.check is not None and not rule.check(result):
                problems.append(f"{path}{rule.field_path or ''}: {rule.message}")
    return result


def model_rules(model: type) -> tuple[Rule, ...]:
    """The rules across a model's fields (`@rules`), in declaration order."""
    return tuple(getattr(model, "__api_rules__", ()))


def parse(model: type[T], data: Any, path: str) -> T:
    """Build `model` from JSON-like `data` (applying defaults); ValidationError names every bad field under `path`."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ValidationError([f"{path}: must be a mapping, got {_describe(data)}"])
    result = _parse_model(model, data, path, problems)
    if problems:
        raise ValidationError(problems)
    return typing.cast(T, result)


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict)) and not value)


def to_dict(value: Any) -> Any:
    """A model instance (or list/map of them) as JSON-ready data with camelCase keys.

    None fields and empty lists/maps are left out: the schema gives them no default
    (absent means empty), so this is what the API server stores.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {info.key: to_dict(getattr(value, info.name)) for info in fields_of(type(value))
                if not _absent(getattr(value, info.name))}
    if isinstance(value, list):
        return [to_dict(item) for item in value]
    if isinstance(value, dict):
        return {key: to_dict(item) for key, item in value.items()}
    return value
