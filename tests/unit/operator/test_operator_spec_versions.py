"""`specs.spec_of`: a FineTuneJob body's spec is parsed once per version of the object (uid and
resourceVersion), so a quota reading every job of a namespace does not re-parse unchanged specs."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.api.schema import ValidationError
from kubetune.operator import specs

SPEC = {"model": {"source": "pvc://models/base"}, "dataset": {"train": {"source": "pvc://data/t.jsonl"}},
        "output": {"storage": "pvc://models/out"}, "resources": {"gpus": 2}}


def body(uid: str = "u-1", version: str | None = "7", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "job", "namespace": "team-a", "uid": uid}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"metadata": metadata, "spec": {**copy.deepcopy(SPEC), **spec}}


@pytest.fixture(autouse=True)
def counted_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = FineTuneJobSpec.from_dict.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FineTuneJobSpec], data: Any, path: str = "spec") -> FineTuneJobSpec:
        calls.append(1)
        return real(cls, data, path)  # type: ignore[no-any-return]

    monkeypatch.setattr(FineTuneJobSpec, "from_dict", classmethod(counting))
    monkeypatch.setattr(specs, "_CACHE", type(specs._CACHE)())  # noqa: SLF001 - a fresh cache per test
    return calls


def test_one_parse_per_version_of_the_object(counted_parses: list[int]) -> None:
    first = specs.spec_of(body())
    assert specs.spec_of(body()) is first and len(counted_parses) == 1
    changed = specs.spec_of(body(version="8", resources={"gpus": 4}))
    assert changed.resource_settings().gpu_count() == 4 and len(counted_parses) == 2
    assert specs.spec_of(body(uid="u-2")) is not first and len(counted_parses) == 3


def test_a_body_without_uid_or_version_is_parsed_every_time(counted_parses: list[int]) -> None:
    specs.spec_of(body(version=None))
    specs.spec_of(body(version=None, resources={"gpus": 1}))
    assert len(counted_parses) == 2


def test_a_bad_spec_is_refused_every_time_it_is_asked_for(counted_parses: list[int]) -> None:
    bad = body(resources={"gpus": "two"})
    for _ in range(2):
        with pytest.raises(ValidationError) as caught:
            specs.spec_of(bad)
        assert caught.value.problems == ['spec.resources.gpus: must be an integer or "auto", got "two"']
    assert len(counted_parses) == 1


def test_the_cache_is_bounded(counted_parses: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs, "CACHE_SIZE", 3)
    for version in range(5):
        specs.spec_of(body(version=str(version)))
    assert len(specs._CACHE) == 3  # noqa: SLF001
    specs.spec_of(body(version="0"))  # evicted: parsed again
    assert len(counted_parses) == 6


FINISHED = {"conditions": [{"type": "Succeeded", "status": "True"}]}


def test_a_parse_not_kept_is_parsed_again_and_a_kept_one_is_still_used(counted_parses: list[int]) -> None:
    specs.spec_of(body(), keep=False)
    specs.spec_of(body(), keep=False)
    assert len(counted_parses) == 2 and len(specs._CACHE) == 0  # noqa: SLF001
    kept = specs.spec_of(body())
    assert specs.spec_of(body(), keep=False) is kept and len(counted_parses) == 3


def test_the_reconcile_of_a_job_with_nothing_pending_keeps_no_parse(counted_parses: list[int]) -> None:
    """Thousands of finished jobs are reconciled once each when the operator starts, and then not again:
    their parses would fill the cache for nothing. A finished job that serves is reconciled every
    resync pass: its parse is kept, as is an unfinished job's."""
    from datetime import datetime, timezone

    from kubetune.operator.jobs import reconcile

    def draft(job: dict[str, Any]) -> None:
        reconcile._Draft(reconcile.Observed(job=job, now=datetime.now(timezone.utc)))  # noqa: SLF001

    draft({**body(uid="done"), "status": FINISHED})
    assert len(specs._CACHE) == 0  # noqa: SLF001
    draft({**body(uid="serving", serving={"enabled": True}), "status": FINISHED})
    draft(body(uid="running"))
    assert sorted(uid for uid, _version in specs._CACHE) == ["running", "serving"]  # noqa: SLF001
    assert specs.has_pending_work(SPEC, {}) and not specs.has_pending_work(SPEC, FINISHED)
