"""Fixtures for the chart's unit tests: helm built from Go modules, and rendering shortcuts.

These tests need no control plane: `helm lint` and `helm template` run offline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev import chart


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm binary (hack/helm/build.sh; built once, then cached by content)."""
    return chart.helm_binary()


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Callable[..., list[dict[str, Any]]]:
    """`render(values=None, **kwargs)`: the chart's objects for those values."""
    def _render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        return chart.render(helm_bin, values, **kwargs)
    return _render
