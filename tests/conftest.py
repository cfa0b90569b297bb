"""Shared fixtures: the real control plane for integration and e2e tests, a real S3 store and a real
MLflow tracking server.

The control plane starts once per test session, on loopback with random ports,
and only when a test asks for it (the `cluster` fixture); unit tests never
start it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import process as api_process
from kubetune.dev import controlplane, mlflow_server, objectstore


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    """A running etcd + kube-apiserver + kube-controller-manager, admin kubeconfig ready."""
    workdir = Path(os.environ.get("KUBETUNE_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    with controlplane.ControlPlane(workdir) as plane:
        yield plane


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[objectstore.SeaweedS3]:
    """A real S3-compatible store (SeaweedFS, built from its Go module) on loopback, one access key."""
    with objectstore.SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as store:
        yield store


@pytest.fixture(scope="session")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mlflow_server.MlflowServer]:
    """A real MLflow tracking server (`mlflow server`, SQLite, proxied artifacts) on loopback."""
    with mlflow_server.MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the control plane are integration tests, whether marked or not."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran an operator process shows that operator's last log lines: what it did (or
    did not) in the seconds a wait ran out is the first thing to read, and CI keeps no other copy."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    seen: set[int] = set()
    for name, value in (getattr(item, "funcargs", None) or {}).items():
        for one in value if isinstance(value, list) else [value]:
            tail = getattr(one, "log_tail", None)
            if callable(tail) and (hasattr(one, "proc") or hasattr(one, "operator")) and id(one) not in seen:
                seen.add(id(one))
                report.sections.append((f"operator log, last 80 lines ({name})", str(tail(80))))


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where a trainer run in this process writes its termination summary; no progress endpoint."""
    path = tmp_path / "termination-log"
    monkeypatch.setenv(api_process.ENV_TERMINATION_LOG, str(path))
    monkeypatch.delenv(api_process.ENV_PROGRESS_URL, raising=False)
    return path
