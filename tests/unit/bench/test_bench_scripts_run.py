"""Every benchmark script runs end to end in its --quick mode and prints its figures.

Smoke tests only: they check that each script runs the real code paths and
prints the figure lines and a RESULT record with every figure, never how fast
anything was (timings on a shared machine prove nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]


def run_bench(script: str, *args: str, timeout: float = 600) -> tuple[str, dict[str, Any]]:
    """Runs bench/<script> and returns its stdout and the parsed RESULT record."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, proc.stdout
    return proc.stdout, json.loads(results[0].removeprefix("RESULT "))


@pytest.mark.slow
def test_trainer_throughput_compares_with_the_hf_trainer_on_the_same_tokens() -> None:
    out, result = run_bench("trainer_throughput.py", "--quick", "--examples", "40")
    assert "ratio" in out and "padding" in out
    assert result["kubetuneTokensPerSecond"] > 0 and result["baselineTokensPerSecond"] > 0
    # Both sides trained on exactly the same non-padding tokens; packing leaves far less padding.
    assert result["kubetunePaddingFraction"] < result["baselinePaddingFraction"]
    assert result["kubetuneValLoss"] > 0 and result["baselineValLoss"] > 0


@pytest.mark.slow
def test_trainer_overhead_reports_per_step_overhead_with_a_report_posted_every_step() -> None:
    out, result = run_bench("trainer_overhead.py", "--quick", "--examples", "40", "--checkpoint-every", "2")
    assert "overhead" in out and "peak memory" in out
    assert 0 <= result["overheadFraction"] < 1
    assert result["reportsPosted"] >= result["steps"]  # every step's progress report reached the HTTP sink
    assert result["peakRssMiB"] > 0


@pytest.mark.slow
def test_gpu_mfu_runs_and_says_where_it_ran() -> None:
    out, result = run_bench("gpu_mfu.py", "--quick")
    if result["device"] == "cpu":
        assert out.count("no GPU: CPU figures") >= 2 and result["mfu"]["mfu"] is None
    assert result["mfu"]["tokensPerSecond"] > 0 and result["lora"]["tokensPerSecond"] > 0
    assert result["lora"]["trainable"] < result["lora"]["parameters"]


@pytest.mark.slow
@pytest.mark.integration
def test_operator_scale_runs_jobs_through_their_lifecycle_on_the_real_control_plane() -> None:
    out, result = run_bench("operator_scale.py", "--quick", "--jobs", "5", "--rate", "5", "--settle", "3",
                            "--idle", "3")
    assert "create -> trainer Job" in out and "API requests" in out
    assert result["succeeded"] >= 5
    assert result["createToTrainerJobP50"] is not None and result["operatorPeakMiB"] > 0
    assert result["requestsPerJob"] > 0


def test_data_read_memory_compares_the_streamed_reader_with_reading_whole() -> None:
    out, result = run_bench("data_read_memory.py", "--quick")
    assert "peak RSS ratio" in out and "read whole" in out and "streamed" in out
    assert result["wholePeakRssMiB"][0] > 0 and result["kubetunePeakRssMiB"][0] > 0
    assert result["rounds"] == 1


@pytest.mark.slow
def test_serve_overhead_prints_overhead_and_concurrency_rows_for_both_servers() -> None:
    out, result = run_bench("serve_overhead.py", "--quick")
    assert "overhead ratio" in out and "load average" in out
    figures = result["concurrency"]
    for side in ("sequential", "batching"):
        for clients in (1, 4):
            row = figures[f"{side}-{clients}"]
            assert row["refused"] == 0 and row["requests"] == clients
            assert row["tokensPerSecond"]["min"] > 0 and row["ttftP50"] > 0
    assert figures["batching4VsOneClient"] > 0 and figures["batchingVsSequential4"] > 0
