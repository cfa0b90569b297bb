"""Fixtures for the augmentation tests: a tiny generator model built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.dev import tinymodel


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2-style model folder (shared, never modified by tests)."""
    return tinymodel.create_tiny_model(tmp_path_factory.mktemp("tiny-generator"), arch="gpt2")
