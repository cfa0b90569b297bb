"""The documented uninstall on a control plane of its own: after the operator ran and stopped,
`kubectl delete crd` completes, because no FineTuneJob carries a finalizer (a kopf timer would have
added `kubetune.io/finalizer`, which nobody removes once the operator is gone). A finalizer an older
operator left is removed by the current one."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import controlplane
from tests.integration.operator.conftest import CRD_FILE, NAMESPACE_PREFIX, OperatorProcess, finetunejob, wait_for

OLD_FINALIZER = "kubetune.io/finalizer"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    with controlplane.ControlPlane(tmp_path_factory.mktemp("uninstall-plane")) as started:
        yield started


def get_json(plane: controlplane.ControlPlane, *args: str) -> Any:
    proc = plane.kubectl("get", *args, "-o", "yaml", check=False)
    return yaml.safe_load(proc.stdout) if proc.returncode == 0 else None


def test_delete_crd_after_the_operator_is_gone_does_not_hang(plane: controlplane.ControlPlane,
                                                              tmp_path: Path) -> None:
    plane.kubectl("apply", "-f", str(CRD_FILE))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
    namespace = f"{NAMESPACE_PREFIX}uninstall"
    plane.kubectl("create", "namespace", namespace)
    operator = OperatorProcess(plane.kubeconfig, tmp_path)
    operator.env["KUBETUNE_RESYNC_SECONDS"] = "1"
    operator.start()
    try:
        plane.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(finetunejob("running")))
        legacy = finetunejob("legacy")
        legacy["metadata"]["finalizers"] = [OLD_FINALIZER]  # as an operator with a kopf timer left it
        plane.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(legacy))
        for name in ("running", "legacy"):
            wait_for(lambda: ((get_json(plane, "-n", namespace, "finetunejob", name) or {}).get("status") or {})
                     .get("phase"), f"the operator's first reconcile of {name}", timeout=90)
        wait_for(lambda: not (get_json(plane, "-n", namespace, "finetunejob", "legacy") or {})
                 .get("metadata", {}).get("finalizers"), "the old finalizer removed", timeout=60)
        # A few resync intervals: still no finalizer on any job.
        time.sleep(3)
        jobs = get_json(plane, "-n", namespace, "finetunejobs")["items"]
        assert [j["metadata"].get("finalizers") for j in jobs] == [None, None]
    finally:
        operator.stop()
    proc = plane.kubectl("delete", "crd", "finetunejobs.kubetune.io", "--timeout=60s", check=False)
    assert proc.returncode == 0, proc.stderr
    gone = subprocess.run([str(plane.bin_dir / "kubectl"), "--kubeconfig", str(plane.kubeconfig), "get", "crd",
                           "finetunejobs.kubetune.io"], capture_output=True, text=True)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
