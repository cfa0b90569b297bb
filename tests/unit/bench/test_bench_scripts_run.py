"""Every benchmark script runs end to end in its --quick mode and prints its figures.

Smoke tests only: they check that each script runs the real code paths and
prints the figure lines and a RESULT record with every figure, never how fast
anything was (timings on a shared machine prove nothing).
"""

from __future__ import annotations

import json
import os
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
def test_trainer_throughput_compares_with_the_peers_a_user_would_pick_on_the_same_tokens() -> None:
    out, result = run_bench("trainer_throughput.py", "--quick", "--examples", "40")
    sides = result["sides"]
    assert set(sides) == {"kubetune", "TRL SFTTrainer", "HF Trainer+flattening", "HF Trainer padded"}
    assert "min/med/max" in out and "best peer" in out and "(side row)" in out
    # Every side trained on exactly the same non-padding tokens, each in its own process.
    assert len({side["tokens"] for side in sides.values()}) == 1
    assert all(side["medianTokensPerSecond"] > 0 and side["medianValLoss"] > 0 for side in sides.values())
    # The padding-free peers and kubetune's packing compute far fewer padding positions than the padded side row.
    assert sides["HF Trainer+flattening"]["paddingFraction"] == 0 and sides["TRL SFTTrainer"]["paddingFraction"] == 0
    assert sides["kubetune"]["paddingFraction"] < sides["HF Trainer padded"]["paddingFraction"]
    assert result["bestPeer"] in ("TRL SFTTrainer", "HF Trainer+flattening")
    assert set(result["ratios"]) == {"TRL SFTTrainer", "HF Trainer+flattening", "HF Trainer padded"}


@pytest.mark.slow
def test_trainer_overhead_reports_per_step_overhead_with_a_report_posted_every_step() -> None:
    out, result = run_bench("trainer_overhead.py", "--quick", "--examples", "40", "--checkpoint-every", "2")
    assert "overhead" in out and "peak memory" in out
    assert 0 <= result["overheadFraction"] < 1
    assert result["reportsPosted"] >= result["steps"]  # every step's progress report reached the HTTP sink
    assert result["peakRssMiB"] > 0


def test_collate_host_time_compares_both_builds_in_their_own_processes() -> None:
    out, result = run_bench("collate_host_time.py", "--rounds", "2", "--batches", "3")
    assert len(result["msPerBatch"]["plain"]) == len(result["msPerBatch"]["kubetune"]) == 2
    assert result["speedup"] > 0 and "min / median / max" in out


def _gpu_mfu() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_mfu", REPO / "bench" / "gpu_mfu.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(REPO / "bench"))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def test_mfu_uses_the_palm_formula_and_an_exact_peak_table() -> None:
    gpu_mfu: Any = _gpu_mfu()
    # GPT-2-124M without position embeddings (123.7M - 0.8M), 12 layers x 768, 1024 tokens.
    assert gpu_mfu.flops_per_token(122_880_000, 12, 768, 1024) == 6 * 122_880_000 + 12 * 12 * 768 * 1024
    assert gpu_mfu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert gpu_mfu.peak_tflops("Some GPU", 100.0) == 100.0
    with pytest.raises(SystemExit, match="no dense bf16 peak for 'NVIDIA H100'"):
        gpu_mfu.peak_tflops("NVIDIA H100", None)  # a prefix is not a name: PCIe and SXM differ by 30%


@pytest.mark.slow
def test_gpu_mfu_plan_only_runs_both_parts_through_kubetunes_trainer() -> None:
    out, result = run_bench("gpu_mfu.py", "--plan-only", "--profile")
    assert result["planOnly"] and out.count("plan only: CPU, tiny shapes") >= 4
    mfu, lora = result["mfu"], result["lora"]
    assert mfu["kubetune"]["windows"] == mfu["reference"]["windows"] == 3
    assert mfu["kubetune"]["medianMfu"] > 0 and mfu["reference"]["medianMfu"] > 0 and mfu["ratio"] > 0
    assert mfu["kubetune"]["attention"] == "sdpa"
    assert 0 < lora["kubetune"]["trainable"] < lora["kubetune"]["parameters"]
    assert lora["kubetune"]["trainable"] == lora["trl"]["trainable"]  # the same adapters on both sides
    assert lora["trl"]["medianTokensPerSecond"] > 0 and lora["kubetune"]["peakMemoryGiB"] > 0
    assert result["failedSides"] == []
    # --profile: each side's last window ran under torch.profiler, and its top operators are printed.
    assert out.count("Top operators by self cpu time") == 4 and "aten::" in out
    assert mfu["kubetune"]["lastWindowProfiled"] and lora["trl"]["lastWindowProfiled"]


def test_gpu_suite_refuses_an_unknown_step_before_running_anything(tmp_path: Path) -> None:
    env = {**os.environ, "KUBETUNE_RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--only", "gpu-mfu,mfu"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2
    assert "--only: unknown step 'mfu' (steps: packed-attention, trainer-check, gpu-mfu," in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_suite_plan_only_writes_every_steps_result(tmp_path: Path) -> None:
    env = {**os.environ, "KUBETUNE_RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--plan-only"], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    (written,) = tmp_path.glob("*-cpu-plan.json")
    record = json.loads(written.read_text())
    assert record["planOnly"] and record["gpu"] is None
    steps = record["steps"]
    assert steps["packed-attention"]["exit"] == 0
    assert steps["gpu-mfu"]["exit"] == 0 and steps["gpu-mfu"]["result"]["mfu"]["ratio"] > 0
    check = steps["trainer-check"]
    assert check["exit"] == 0 and check["result"]["failures"] == []
    assert check["result"]["full"]["falls"] and check["result"]["resume"]["firstStepAfterResume"] > 1
    assert check["result"]["resume"]["maxLossDifference"] <= check["result"]["resume"]["tolerance"]
    assert steps["throughput"]["exit"] == 0 and steps["throughput"]["result"]["ratios"]
    for name, script in (("scaling", "distributed_scaling.py"), ("serve-vllm", "serve_vllm_check.py")):
        if (REPO / "bench" / script).exists():
            assert steps[name]["exit"] == 0
        else:  # said plainly, in the output and the record
            assert steps[name]["exit"] == "skipped" and script in steps[name]["result"]
            assert f"== {name}: skipped: bench/{script} is not in this checkout" in proc.stdout
    assert written.with_suffix(".log").read_text().count("== ") >= 4


@pytest.mark.slow
@pytest.mark.integration
def test_operator_scale_runs_jobs_through_their_lifecycle_on_the_real_control_plane() -> None:
    out, result = run_bench("operator_scale.py", "--quick", "--jobs", "5", "--rate", "5", "--settle", "3",
                            "--idle", "3", "--finished", "5")
    assert "create -> trainer Job" in out and "API requests" in out
    assert "with 5 finished jobs present" in out and result["residentWithFinishedMiB"] > 0
    assert result["succeeded"] == 5  # the run's own jobs (not the warm-up one, not the finished ones)
    assert result["createToTrainerJobP50"] is not None and result["operatorPeakMiB"] > 0
    assert result["requestsPerJob"] > 0


def test_data_read_memory_compares_the_streamed_reader_with_reading_whole() -> None:
    out, result = run_bench("data_read_memory.py", "--quick")
    assert "peak RSS ratio" in out and "read whole" in out and "streamed" in out
    assert result["wholePeakRssMiB"][0] > 0 and result["kubetunePeakRssMiB"][0] > 0
    assert result["rounds"] == 1


def test_quota_spec_parse_times_both_sides_in_alternating_processes() -> None:
    out, result = run_bench("quota_spec_parse.py", "--quick")
    assert "every parse / cached (medians)" in out and "min / median / max" in out
    assert set(result["sides"]) == {"every parse", "cached"}
    assert all(len(side["passMs"]) == 3 and side["medianPassMs"] > 0 for side in result["sides"].values())


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


@pytest.mark.slow
def test_augmentation_effect_trains_with_and_without_augmentation_and_prints_both() -> None:
    out, result = run_bench("augmentation_effect.py", "--quick")
    assert "val loss ratio augmented / baseline" in out
    assert set(result["meanBestValLoss"]) == {"baseline", "augmented"}
    assert all(loss > 0 for loss in result["meanBestValLoss"].values())
    # multiplier 1: the augmented run trains on twice the examples, the baseline on the real ones
    assert result["trainExamples"]["augmented"] == 2 * result["trainExamples"]["baseline"] > 0


@pytest.mark.slow
def test_trainer_smollm2_lora_trains_the_real_model_and_prints_perplexity_before_and_after() -> None:
    # The real 135M model (dequantised from GGUF) on a few paragraphs: minutes on a loaded 2-core machine.
    out, result = run_bench("trainer_smollm2_lora.py", "--quick", timeout=840)
    assert "val perplexity    before" in out and "base model, test" in out
    assert result["steps"] >= 1 and result["tokensSeen"] > 0
    assert result["valPerplexityBefore"] > 1 and result["valPerplexityAfter"] > 1
    assert result["baseTestPerplexity"] > 1 and result["testPerplexity"] > 1


@pytest.mark.slow
def test_distributed_scaling_runs_one_rank_and_two_gloo_ranks_on_the_same_steps() -> None:
    out, result = run_bench("distributed_scaling.py", "--quick")
    assert "scaling efficiency" in out and "1 rank:  tokens/s min/median/max" in out
    assert result["device"] == "cpu" and result["ranks"] == 2 and result["reps"] == 1
    assert result["oneRank"]["median"] > 0 and result["manyRanks"]["median"] > 0 and result["efficiency"] > 0
    assert result["sameSteps"] and result["sameTokens"]  # both sides did the same work
