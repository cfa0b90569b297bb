"""A FineTuneJob's typed spec, parsed once per version of the object.

Reconcile parses its job's spec, and with a quota in force, the quota parses every job of the
namespace on every reconcile: at 1,000 jobs that is 1,000 parses (~0.2 s) per reconcile, though
almost none of them changed. An object read from the API server has a uid and a resourceVersion,
and its spec cannot change without a new resourceVersion: so the parse of each version is kept
(least recently used first out, `CACHE_SIZE` versions, ~3 KB each). Specs are frozen dataclasses,
safe to share. A body without both (built by a test or a tool) is parsed every time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.api.schema import ValidationError
from kubetune.operator import conditions

CACHE_SIZE = 4096
"""Versions kept: more than the jobs one namespace's quota reads at once in any test of scale."""

_CACHE: OrderedDict[tuple[str, str], FineTuneJobSpec | ValidationError] = OrderedDict()
_GUARD = threading.Lock()


def has_pending_work(spec: Any, status: Any) -> bool:
    """Unfinished jobs have work left, and finished ones that still keep something (serving
    children, a ttlSecondsAfterFinished clock); a finished job without either has nothing to
    converge: neither the timer nor its old Jobs' and pods' events need to reconcile it."""
    found = list((status or {}).get("conditions") or [])
    if not (conditions.is_true(found, conditions.SUCCEEDED) or conditions.is_true(found, conditions.FAILED)):
        return True
    serving = (spec or {}).get("serving") or {}
    return bool(serving.get("enabled")) or (spec or {}).get("ttlSecondsAfterFinished") is not None


def spec_of(job: dict[str, Any], keep: bool = True) -> FineTuneJobSpec:
    """The typed spec of a FineTuneJob body (the API server's defaults applied); ValidationError names
    every bad field, every time it is asked. `keep=False` parses without keeping the result (a kept
    parse of the same version is still used): the reconcile of a job with nothing pending, which
    nothing reconciles again until it changes; kept, thousands of finished jobs would fill the cache
    with parses (~2.7 KB each) that are never read again."""
    metadata = job.get("metadata") or {}
    uid, version = metadata.get("uid"), metadata.get("resourceVersion")
    if not uid or not version:
        return FineTuneJobSpec.from_dict(job.get("spec"))
    key = (str(uid), str(version))
    with _GUARD:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
    if found is None:
        try:
            found = FineTuneJobSpec.from_dict(job.get("spec"))
        except ValidationError as error:
            found = error
        if keep:
            with _GUARD:
                _CACHE[key] = found
                while len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
    if isinstance(found, ValidationError):
        raise ValidationError(found.problems)
    return found
