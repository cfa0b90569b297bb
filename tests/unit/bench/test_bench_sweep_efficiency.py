"""bench/sweep_efficiency.py runs end to end in --quick mode and prints its figures (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~1 CPU-minute, but 13 minutes of wall time were measured at load average 17
def test_grid_random_and_tpe_asha_each_run_real_trials_within_their_budgets() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sweep_efficiency.py"), "--quick"],
                          capture_output=True, text=True, timeout=2300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert "best valLoss at B/9" in proc.stdout and "TPE+ASHA trial-steps / grid trial-steps" in proc.stdout
    assert result["budget"] == 4 * 4, "the quick grid: 2 x 1 x 2 trials of 4 steps"
    assert result["gridTrialSteps"] == [16]
    for search in ("random", "tpe+asha"):
        assert 0 < result[f"{search}TrialSteps"][0] <= 16 // 3, "a third of the grid's budget, never more"
        assert result[f"{search}CpuSeconds"][0] > 0
    assert all(v > 0 for v in result["gridBestAtB"])
