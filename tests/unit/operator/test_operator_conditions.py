"""Conditions follow the API conventions: lastTransitionTime moves only on a status flip."""

from __future__ import annotations

from kubetune.operator import conditions


def test_setting_a_new_condition_stamps_the_transition_time() -> None:
    result = conditions.set_condition([], conditions.RUNNING, "True", conditions.TRAINING, "training",
                                      generation=3, now="2026-01-01T00:00:00Z")
    assert result == [{"type": "Running", "status": "True", "reason": "Training", "message": "training",
                       "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"}]


def test_same_status_with_a_new_reason_keeps_the_transition_time() -> None:
    before = conditions.set_condition([], conditions.RUNNING, "False", conditions.PENDING, "",
                                      generation=1, now="2026-01-01T00:00:00Z")
    after = conditions.set_condition(before, conditions.RUNNING, "False", conditions.RESUMING, "attempt 1",
                                     generation=2, now="2026-01-01T00:05:00Z")
    assert after[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert after[0]["reason"] == "Resuming" and after[0]["observedGeneration"] == 2


def test_a_status_flip_moves_the_transition_time() -> None:
    before = conditions.set_condition([], conditions.RUNNING, "False", conditions.PENDING, "",
                                      generation=1, now="2026-01-01T00:00:00Z")
    after = conditions.set_condition(before, conditions.RUNNING, "True", conditions.TRAINING, "",
                                     generation=1, now="2026-01-01T00:05:00Z")
    assert after[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def test_set_condition_does_not_mutate_its_input_and_keeps_a_stable_order() -> None:
    first = conditions.set_condition([], conditions.FAILED, "False", "NotFinished", "", generation=1, now="t")
    second = conditions.set_condition(first, conditions.VALIDATED, "True", "DatasetValid", "", generation=1, now="t")
    assert [c["type"] for c in first] == ["Failed"]
    assert [c["type"] for c in second] == ["Validated", "Failed"]


def test_changes_lists_conditions_whose_status_or_reason_changed() -> None:
    before = conditions.set_condition([], conditions.RUNNING, "False", conditions.PENDING, "a", generation=1, now="t")
    same_but_new_message = conditions.set_condition(before, conditions.RUNNING, "False", conditions.PENDING, "b",
                                                    generation=1, now="t")
    assert conditions.changes(before, same_but_new_message) == []
    flipped = conditions.set_condition(before, conditions.RUNNING, "True", conditions.TRAINING, "", generation=1,
                                       now="t")
    assert [c["reason"] for c in conditions.changes(before, flipped)] == ["Training"]
