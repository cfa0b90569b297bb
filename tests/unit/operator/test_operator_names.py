"""Child names are deterministic, distinct, and valid Kubernetes names."""

from __future__ import annotations

from kubetune.operator import names


def test_child_names_depend_only_on_the_job_name() -> None:
    assert names.trainer_job("demo") == "demo-train"
    assert names.validation_job("demo") == "demo-validate"
    assert names.config_map("demo") == "demo-config"
    assert names.progress_secret("demo") == "demo-progress"


def test_long_job_names_are_shortened_to_63_characters_and_stay_unique() -> None:
    first, second = "a" * 60 + "-one", "a" * 60 + "-two"
    shortened = {names.trainer_job(first), names.trainer_job(second)}
    assert len(shortened) == 2
    for name in shortened:
        assert len(name) <= 63
        assert name.endswith("-train")
        assert name[0].isalnum()
    assert names.trainer_job(first) == names.trainer_job(first)
