"""The terminal views of a FineTuneJob's status."""

from __future__ import annotations

from kubetune.cli import progress_view


RUNNING = {
    "phase": "Running",
    "progress": {"step": 21, "totalSteps": 50, "epoch": 1.26, "percent": 42.0, "etaSeconds": 95,
                 "tokensPerSecond": 812.4},
    "metrics": {"trainLoss": 2.3125, "valLoss": 2.4},
    "conditions": [{"type": "Running", "status": "True", "reason": "Training", "message": "step 21/50"}],
}


class TestProgressLine:
    def test_shows_bar_step_epoch_losses_speed_eta_and_phase(self) -> None:
        line = progress_view.progress_line(RUNNING)
        assert line.startswith("[" + "#" * 11 + "." * 17 + "]  42.0%")
        for part in ("step 21/50", "epoch 1.26", "loss 2.3125", "val 2.4000", "812 tok/s", "ETA 01:35", "Running"):
            assert part in line

    def test_empty_status_reads_as_pending_without_numbers(self) -> None:
        line = progress_view.progress_line({})
        assert "step 0/?" in line and "loss -" in line and "ETA --:--" in line and line.endswith("Pending")

    def test_percent_is_derived_from_steps_when_absent(self) -> None:
        assert "50.0%" in progress_view.progress_line({"progress": {"step": 5, "totalSteps": 10}})


class TestConditions:
    def test_is_true_reads_the_named_condition_only(self) -> None:
        assert progress_view.is_true(RUNNING, "Running")
        assert not progress_view.is_true(RUNNING, "Succeeded")

    def test_summary_lists_conditions_results_model_and_endpoint(self) -> None:
        job = {"metadata": {"namespace": "team-a", "name": "faq"},
               "status": {**RUNNING, "results": {"perplexity": 9.5, "tokenAccuracy": 0.41},
                          "model": {"uri": "pvc://models/faq/model", "digest": "sha256:" + "a" * 64},
                          "endpoint": "http://faq-serving.team-a.svc:8000"}}
        text = progress_view.summary(job)
        assert text.splitlines()[0] == "team-a/faq: Running"
        assert "Running       True   Training: step 21/50" in text
        assert "perplexity=9.5000" in text and "pvc://models/faq/model" in text
        assert "endpoint: http://faq-serving.team-a.svc:8000" in text


def test_format_seconds() -> None:
    assert progress_view.format_seconds(3725) == "1:02:05"
    assert progress_view.format_seconds(59) == "00:59"
    assert progress_view.format_seconds(None) == "--:--"
