"""The Argo CD health check for FineTuneJob, run by a real Lua 5.4 interpreter on sample jobs.

Argo CD runs the script with the object in the global `obj` and uses the table it returns;
the tests do the same: the sample is turned into a Lua table literal, the script is run
with `dofile`, and the returned status and message are printed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "docs" / "argocd-health.lua"
INSTALL_DOC = REPO / "docs" / "install.md"


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON-like value (None becomes nil: absent, as in Argo CD)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def lua() -> str:
    found = shutil.which("lua5.4")
    if found is None:
        pytest.fail("lua5.4 is not installed: the Argo CD health check cannot be tested "
                    "(Debian: apt-get install lua5.4; hack/setup.sh installs it)")
    return found


def health(job: dict[str, Any], script: Path = SCRIPT) -> tuple[str, str]:
    program = (f"obj = {lua_literal(job)}\n"
               f"local hs = dofile({json.dumps(str(script))})\n"
               "io.write(hs.status, '\\n', hs.message or '', '\\n')\n")
    proc = subprocess.run([lua(), "-"], input=program, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    status, message = proc.stdout.split("\n")[:2]
    return status, message


def job(*conditions: tuple[str, str, str, str], serving: bool = False, generation: int = 1,
        observed: int | None = 1, **status: Any) -> dict[str, Any]:
    """A FineTuneJob with conditions given as (type, status, reason, message)."""
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "team-a", "generation": generation},
        "spec": {"model": {"source": "pvc://models/base"}, "serving": {"enabled": serving}},
    }
    if conditions or status or observed is not None:
        body["status"] = {
            "observedGeneration": observed,
            "conditions": [{"type": t, "status": s, "reason": r, "message": m,
                            "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, s, r, m in conditions],
            **status,
        }
    return body


VALIDATED = ("Validated", "True", "DatasetValid", "12000 examples")


class TestHealthStatus:
    def test_a_new_job_without_status_is_progressing(self) -> None:
        assert health(job(observed=None))[0] == "Progressing"

    def test_validating_queued_and_training_jobs_are_progressing(self) -> None:
        validating = job(("Validated", "Unknown", "Validating", "checking the dataset"))
        queued = job(VALIDATED, ("Running", "False", "QuotaExceeded", "team-a runs 2 of 2 jobs"))
        training = job(VALIDATED, ("Running", "True", "Training", "step 40/100"))
        assert health(validating) == ("Progressing", "checking the dataset")
        assert health(queued) == ("Progressing", "team-a runs 2 of 2 jobs")
        assert health(training) == ("Progressing", "step 40/100")

    def test_a_succeeded_job_without_serving_is_healthy(self) -> None:
        succeeded = job(VALIDATED, ("Running", "False", "Completed", ""),
                        ("Succeeded", "True", "TrainingSucceeded", "val loss 1.23"))
        assert health(succeeded) == ("Healthy", "val loss 1.23")

    def test_a_succeeded_job_waits_for_its_model_server_when_serving_is_enabled(self) -> None:
        starting = job(VALIDATED, ("Succeeded", "True", "TrainingSucceeded", ""),
                       ("ServingReady", "False", "DeploymentNotReady", "0/1 replicas ready"), serving=True)
        ready = job(VALIDATED, ("Succeeded", "True", "TrainingSucceeded", ""),
                    ("ServingReady", "True", "DeploymentReady", ""), serving=True,
                    endpoint="http://tune-serving.team-a.svc.cluster.local:8000")
        no_condition_yet = job(VALIDATED, ("Succeeded", "True", "TrainingSucceeded", ""), serving=True)
        assert health(starting) == ("Progressing", "0/1 replicas ready")
        assert health(ready) == ("Healthy", "Serving at http://tune-serving.team-a.svc.cluster.local:8000")
        assert health(no_condition_yet)[0] == "Progressing"

    def test_a_failed_job_is_degraded_even_if_it_was_serving(self) -> None:
        failed = job(("Validated", "False", "DatasetInvalid", "dataset.train: 0 examples after cleaning"),
                     ("Failed", "True", "DatasetInvalid", "dataset.train: 0 examples after cleaning"))
        assert health(failed) == ("Degraded", "dataset.train: 0 examples after cleaning")
        assert health(job(("Failed", "True", "BackoffLimitExceeded", ""),
                          ("ServingReady", "True", "DeploymentReady", ""), serving=True)) == (
            "Degraded", "BackoffLimitExceeded")

    def test_a_suspended_job_is_suspended(self) -> None:
        suspended = job(VALIDATED, ("Suspended", "True", "SuspendedByUser", "spec.suspend is true"))
        resumed = job(VALIDATED, ("Suspended", "False", "NotSuspended", ""), ("Running", "True", "Training", ""))
        assert health(suspended) == ("Suspended", "spec.suspend is true")
        assert health(resumed)[0] == "Progressing"

    def test_a_status_from_an_older_generation_is_progressing(self) -> None:
        stale = job(("Succeeded", "True", "TrainingSucceeded", ""), generation=3, observed=2)
        assert health(stale) == ("Progressing", "Waiting for the operator to observe generation 3")


class TestDocumentation:
    def test_install_doc_embeds_exactly_the_tested_script(self) -> None:
        doc = INSTALL_DOC.read_text()
        match = re.search(r"resource\.customizations\.health\.kubetune\.io_FineTuneJob: \|\n(.*?)```", doc, re.S)
        assert match, "docs/install.md has no argocd-cm health customization for FineTuneJob"
        embedded = "\n".join(line[4:] for line in match.group(1).splitlines())
        assert embedded.strip() == SCRIPT.read_text().strip()

    def test_the_embedded_script_runs_the_same(self, tmp_path: Path) -> None:
        doc = INSTALL_DOC.read_text()
        block = doc.split("resource.customizations.health.kubetune.io_FineTuneJob: |\n")[1].split("```")[0]
        copy = tmp_path / "from-doc.lua"
        copy.write_text("\n".join(line[4:] for line in block.splitlines()))
        failed = job(("Failed", "True", "TrainerFailed", "exit 1"))
        assert health(failed, copy) == health(failed) == ("Degraded", "exit 1")
