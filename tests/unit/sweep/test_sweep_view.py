"""`kubetune sweep NAME`: the trials table and the two plots, from a sweep status the reconcile wrote."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from kubetune.cli import sweep_view
from kubetune.operator.sweeps import reconcile as sweep
from tests.unit.sweep.sweep_fixtures import sweep_body, trial

LR = "hyperparameters.learningRate"


def finished_sweep() -> dict[str, Any]:
    body = sweep_body(name="lr", parameters=[{"name": LR, "type": "logUniform", "min": 1e-5, "max": 1e-2},
                                             {"name": "method.lora.rank", "type": "int", "min": 4, "max": 16}],
                      algorithm={"type": "random", "seed": 1}, maxTrials=3, parallelTrials=3)
    children = [trial(body, 0, "Succeeded", val_loss=2.0), trial(body, 1, "Succeeded", val_loss=1.5),
                trial(body, 2, "Running")]
    children[2]["metadata"]["annotations"] = {sweep.ANNOTATION_PRUNED: "pruned by sweep (asha) at step 10"}
    for child in children:
        child["metadata"]["creationTimestamp"] = "2025-01-01T23:58:00Z"
    children[0]["status"]["completionTime"] = "2025-01-01T23:59:05Z"
    body["status"] = sweep.decide(body, children, now="2025-01-02T00:00:00Z").status
    return body


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


class TestTrialsTable:
    def test_one_row_per_trial_with_parameters_metric_state_and_duration(self) -> None:
        lines = sweep_view.trials_table(finished_sweep()).splitlines()
        assert lines[0].startswith("lr: Succeeded, 3 of 3 trials done (2 succeeded, 1 pruned, 0 failed)")
        assert "best trial lr-t1" in lines[0] and "with 1.5" in lines[0]
        assert lines[2].split() == ["#", "state", "learningRate", "lora.rank", "valLoss", "valLoss", "step",
                                    "duration", "message"]
        rows = [line.split() for line in lines[3:]]
        assert [r[:2] for r in rows] == [["0", "Succeeded"], ["1*", "Succeeded"], ["2", "Pruned"]]
        assert rows[0][4] == "2" and rows[0][7] == "1m05s", "objective and creation-to-completion time"
        assert rows[2][-1] == "10" and "pruned by sweep (asha)" in lines[5]


class TestPlots:
    def test_objective_and_parallel_coordinates_pngs_are_written(self, tmp_path: Path) -> None:
        paths = sweep_view.write_report(finished_sweep(), tmp_path / "plots")
        assert [p.name for p in paths] == ["objective.png", "parallel_coordinates.png"]
        assert png_size(paths[0]) == (700, 400)
        width, height = png_size(paths[1])
        assert height == 400 and width > 500

    def test_plots_go_next_to_a_local_output_else_to_the_current_folder(self, tmp_path: Path) -> None:
        body = finished_sweep()
        assert sweep_view.output_folder(body, None) == Path("lr-sweep")
        body["spec"]["template"]["output"]["storage"] = str(tmp_path)
        assert sweep_view.output_folder(body, None) == tmp_path / "lr-sweep"
        assert sweep_view.output_folder(body, "x") == Path("x")
