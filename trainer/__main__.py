"""`python -m kubetune.trainer --config FILE [--validate-only]`: setup -> fit -> evaluate -> save.

Exit codes (constants in kubetune.api.process): 0 success; 78 permanent
error (bad config, bad data, missing model: never retried); 75 preempted
(SIGTERM: a checkpoint was saved, a retry resumes from it); anything else is
a retryable failure.

Under `python -m kubetune.trainer.launch` several ranks run this program: every
rank reads the same config and trains its share; rank 0 alone sends progress
reports, writes outputs and the termination summary (`is_main_rank`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api import config as cfg, process
from kubetune.trainer import config_file, rank_exit, reporting, tracking
from kubetune.trainer.errors import PermanentError, Preempted

log = logging.getLogger("kubetune.trainer")


def is_main_rank() -> bool:
    """Rank 0 of the run (torchrun sets `RANK`; a single process is rank 0)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _terminate(text: str) -> None:
    """The pod's termination summary, written by rank 0 only (one file per container)."""
    if is_main_rank():
        reporting.write_termination_message(text)


def _reporter(config: cfg.TrainerConfig) -> reporting.Reporter:
    """Rank 0 reports to the operator and stdout; other ranks' reports go nowhere (they would repeat
    rank 0's figures, which are already global)."""
    if is_main_rank():
        return reporting.Reporter.from_environment(config.job)
    return reporting.Reporter(config.job, stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run


def _tracker(config: cfg.TrainerConfig, reporter: reporting.Reporter) -> tracking.Tracker:
    """Rank 0 logs to MLflow (`tracking.mlflow`); its state rides on every report, and the reports'
    figures feed it. Other ranks get a tracker that is off (their figures are rank 0's)."""
    attempt_text = os.environ.get(process.ENV_ATTEMPT, "0")
    tracker = tracking.Tracker.from_config(config, attempt=int(attempt_text) if attempt_text.isdigit() else 0,
                                           main_rank=is_main_rank())
    reporter.tracking = tracker.status
    reporter.observers.append(tracker.observe)
    return tracker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="trainer config file (JSON or YAML)")
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="check config, data and tokenizer without loading weights; print data statistics",
    )
    return parser


def load_data(config: cfg.TrainerConfig, *, synthetic: bool = True) -> tuple[Any, Any]:
    """The tokenizer (proves the model source exists) and the cleaned, split (and augmented) dataset;
    `synthetic=False` skips model-generated examples (no weights are loaded)."""
    from kubetune.trainer.prep import data
    from kubetune.trainer.training import modeling

    tokenizer = modeling.load_tokenizer(config.model)
    return tokenizer, data.prepare(config.dataset, synthetic_model=config.model if synthetic else None)


def validate_only(config: cfg.TrainerConfig) -> dict[str, Any]:
    """Data statistics including token counts, as --validate-only prints them."""
    from kubetune.trainer.prep import data
    from kubetune.trainer.training import sizing

    problem = sizing.fsdp_wrap_problem(config)
    if problem:
        raise PermanentError(problem)
    tokenizer, prepared = load_data(config, synthetic=False)
    statistics = prepared.statistics()
    lengths = [len(t.input_ids) for t in data.tokenize_examples(prepared.splits.train, tokenizer)]
    statistics["trainTokens"] = {"total": sum(lengths), "longestExample": max(lengths), "meanExample": round(sum(lengths) / len(lengths), 1)}
    return statistics


def validation_sizing(config: cfg.TrainerConfig, statistics: dict[str, Any]) -> dict[str, Any] | None:
    """Model and data facts for the operator's resource estimate; None when the model's shape cannot be read."""
    from kubetune.trainer.training import sizing

    tokens = statistics["trainTokens"]
    try:
        return sizing.sizing_facts(config, train_examples=int(statistics.get("splits", {}).get("train", 0) or 0),
                                   train_tokens=tokens["total"], longest_example=tokens["longestExample"])
    except Exception as error:  # noqa: BLE001 - the estimate is advisory; validation itself passed
        log.warning("no sizing facts for the resource estimate: %s: %s", type(error).__name__, error)
        return None


def test_metrics(run: Any, prepared: Any) -> dict[str, Any]:
    """Perplexity and token accuracy on the test split; classification metrics by label likelihood."""
    from kubetune.trainer.evaluation import evaluate
    from kubetune.trainer.prep import data

    examples = prepared.splits.test
    if run.config.evaluation.max_test_examples:
        examples = examples[: run.config.evaluation.max_test_examples]
    if not examples:
        return {}
    sequences, _ = data.pack(
        data.tokenize_examples(examples, run.tokenizer),
        run.hp.max_seq_length,
        packing=run.config.training.packing,
        chunk_long=run.config.dataset.format == "text",
    )
    if getattr(run, "sharded", False):  # before training under FSDP: every rank runs every batch, in step
        mine, reduce = sequences, (lambda t: t)
    else:
        mine, reduce = sequences[run.accelerator.process_index :: run.world_size], run.accelerator.reduce
    lm = evaluate.language_model_metrics(
        run.model,
        mine,
        batch_size=run.hp.batch_size,
        pad_id=run.pad_id,
        device=run.accelerator.device,
        reduce=reduce,
    )
    results: dict[str, Any] = {"loss": lm.get("loss"), "perplexity": lm.get("perplexity"), "tokenAccuracy": lm.get("tokenAccuracy"), "examples": len(examples)}
    if run.labels:
        model = run.accelerator.unwrap_model(run.model)
        predicted = evaluate.predict_labels(model, run.tokenizer, [e.prompt for e in examples], run.labels, run.accelerator.device)
        results |= evaluate.classification_metrics([e.label for e in examples], predicted, run.labels)
    return results


BASELINE_FILE = "baseline.json"
"""In `output.dir`: the base model's test results and sample answers, measured before the first step."""


def _sample_prompts(run: Any, prepared: Any) -> list[Any]:
    from kubetune.trainer.evaluation import samples

    count = run.config.evaluation.samples
    return samples.sample_prompts(prepared.splits.test, run.tokenizer, count) if count else []


def _answers(run: Any, prompts: list[Any]) -> list[str]:
    from kubetune.trainer.evaluation import samples
    from kubetune.trainer.training import modeling

    model = run.accelerator.unwrap_model(run.model)
    return samples.generate_answers(model, run.tokenizer, prompts, max_new_tokens=cfg.SAMPLE_MAX_NEW_TOKENS,
                                    context_length=modeling.context_length(model.config, run.tokenizer),
                                    device=run.accelerator.device)


def baseline_pass(run: Any, prepared: Any) -> dict[str, Any] | None:
    """The base model on the test split, before the first step: {"results", "seconds", "answers",
    "sampleSeconds"} (`seconds`: the evaluation pass alone; `sampleSeconds`: the base answers).

    Same tokenisation, packing, prompts and metrics as the final test evaluation (it is the same
    function on the untrained model; fresh LoRA adapters change nothing, their B matrices are 0).
    Written to `baseline.json`, so a resumed attempt, whose model is already partly trained,
    reuses it instead of measuring the wrong model.
    """
    evaluation = run.config.evaluation
    if not evaluation.baseline and not evaluation.samples:
        return None
    path = Path(run.config.output.dir) / BASELINE_FILE
    if run.resumed_from:
        if path.is_file():
            return dict(json.loads(path.read_text()))
        log.warning("no baseline: resumed from %s, and no %s was written before it", run.resumed_from, path)
        return None
    started = time.monotonic()
    baseline: dict[str, Any] = {"results": test_metrics(run, prepared) if evaluation.baseline else {}, "answers": None}
    baseline["seconds"] = round(time.monotonic() - started, 2) if evaluation.baseline else None
    prompts = _sample_prompts(run, prepared)
    if prompts and (run.accelerator.is_main_process or getattr(run, "sharded", False)):
        # A sharded model generates only with every rank in step: each rank generates the same answers.
        started = time.monotonic()
        baseline["answers"] = _answers(run, prompts)
        baseline["sampleSeconds"] = round(time.monotonic() - started, 2)
    if run.accelerator.is_main_process:
        from kubetune.trainer.evaluation import outputs

        outputs.write_json(path, baseline)
    log.info("base model on the test split (%s s, sample answers %s s): %s", baseline["seconds"],
             baseline.get("sampleSeconds"),
             json.dumps({k: v for k, v in baseline["results"].items() if isinstance(v, (int, float))}))
    return baseline


def compare_with_baseline(results: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """`results` plus `baseline` (the base model's results) and `improvement` when there is a baseline."""
    from kubetune.trainer.evaluation import evaluate

    base = (baseline or {}).get("results") or {}
    if not base or not results:
        return results
    return results | {"baseline": base, "improvement": evaluate.improvement(base, results)}


def comparison_text(results: dict[str, Any]) -> str:
    """`test perplexity 12.3 vs 45.6 for the base model (73% lower)`, or "" without a baseline."""
    base, tuned = (results.get("baseline") or {}).get("perplexity"), results.get("perplexity")
    drop = (results.get("improvement") or {}).get("perplexityDrop")
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)) or not isinstance(drop, (int, float)):
        return ""
    direction = "lower" if drop >= 0 else "higher"
    text = f"test perplexity {tuned:.4g} vs {base:.4g} for the base model ({abs(drop) * 100:.1f}% {direction})"
    f1_gain = (results.get("improvement") or {}).get("f1Gain")
    if isinstance(f1_gain, (int, float)):
        text += f", F1 {f1_gain:+.1f} points"
    return text


def train_and_save(config: cfg.TrainerConfig, reporter: reporting.Reporter,
                   tracker: tracking.Tracker | None = None) -> dict[str, Any]:
    """The whole run; returns the final metrics (also written to metrics.json). `tracker` logs it to
    MLflow (best effort) once the hyperparameters are resolved."""
    from kubetune.trainer.evaluation import outputs
    from kubetune.trainer.training import train

    started = time.monotonic()
    reporter.report("started", message=f"loading data and model {config.model.source}")
    tokenizer, prepared = load_data(config)
    run = train.setup(config, prepared, tokenizer)
    resumed = train.resume(run)
    if tracker is not None:
        tracker.start(tracking.run_params(config, run.hp.to_report()))
        tracker.follow(run.state)
    # The second `started` report carries the resolved hyperparameters (status.resolved) as soon as they are known.
    if resumed:
        reporter.report("started", step=run.state.step, totalSteps=run.total_steps, resolved=run.hp.to_report(),
                        message=f"resumed from {run.resumed_from}")
    else:
        reporter.report("started", totalSteps=run.total_steps, resolved=run.hp.to_report(),
                        message=f"training for {run.total_steps} steps")
    log.info(
        "training %s (%d parameters, %d trainable) for %d steps, hyperparameters %s",
        config.model.source, run.num_parameters, run.trainable_parameters, run.total_steps, json.dumps(run.hp.to_report()),
    )
    baseline = baseline_pass(run, prepared)
    tokens_at_start = run.state.tokens_seen  # after a resume: the checkpoint's count
    state = train.fit(run, reporter)
    model_step = train.restore_best(run)
    train.gather_model(run)  # FSDP: the full weights in a plain model on every rank, from here on
    results = compare_with_baseline(test_metrics(run, prepared), baseline)
    sample_answers: list[dict[str, str]] = []
    prompts = _sample_prompts(run, prepared)
    if prompts and run.accelerator.is_main_process:
        from kubetune.trainer.evaluation import samples

        sample_answers = samples.records(prompts, (baseline or {}).get("answers"), _answers(run, prompts))
    final_eval = next((e for e in reversed(state.evaluations) if e["step"] == model_step), {})
    initial_eval = next((e for e in state.evaluations if e["step"] == 0), {})
    metrics: dict[str, Any] = {
        "outcome": "succeeded",
        "step": state.step,
        "totalSteps": run.total_steps,
        "modelStep": model_step,
        "stoppedEarly": state.stopped_early,
        "trainLoss": state.train_losses[-1][1] if state.train_losses else None,
        "valLoss": final_eval.get("valLoss"),
        "valPerplexity": final_eval.get("valPerplexity"),
        "initialValLoss": initial_eval.get("valLoss"),
        "initialValPerplexity": initial_eval.get("valPerplexity"),
        "bestCheckpoint": state.best_checkpoint,
        "results": results,
        "hyperparameters": run.hp.to_report(),
        "data": run.statistics,
        "parameters": {"total": run.num_parameters, "trainable": run.trainable_parameters},
        "tokensSeen": state.tokens_seen,
        "tokensProcessed": state.tokens_seen - tokens_at_start,
        "device": f"{run.accelerator.num_processes}x {run.device_kind}",
        "resumedFrom": run.resumed_from,
        "history": {"trainLoss": state.train_losses, "evaluations": state.evaluations},
        "baselineSeconds": (baseline or {}).get("seconds"),
        "baseSampleSeconds": (baseline or {}).get("sampleSeconds"),
        "samples": sample_answers,
    }
    if run.accelerator.is_main_process:
        from kubetune.trainer.training import modeling

        folder = outputs.save_model(run.accelerator.unwrap_model(run.model), tokenizer, config, modeling.locate(config.model).name_or_path)
        # With object storage the model's home is the bucket (output_sync uploads it), not the scratch folder.
        uri = f"{config.output.uri.rstrip('/')}/{folder.name}" if config.output.uri else str(folder.resolve())
        metrics["model"] = {"uri": uri, "digest": outputs.model_digest(folder)}
        metrics["wallSeconds"] = round(time.monotonic() - started, 2)
        outputs.write_outputs(config, metrics, state.train_losses, state.evaluations)
        if tracker is not None:
            tracker.finish(metrics, Path(config.output.dir))
    run.accelerator.wait_for_everyone()
    reporter.report(
        "completed",
        step=state.step,
        totalSteps=run.total_steps,
        valLoss=metrics["valLoss"],
        valPerplexity=metrics["valPerplexity"],
        tokensSeen=state.tokens_seen,
        results=results,
        samples=sample_answers or None,
        model=metrics.get("model"),
        resolved=run.hp.to_report(),
    )
    return metrics


def _train_with_storage(config: cfg.TrainerConfig, reporter: reporting.Reporter,
                        tracker: tracking.Tracker | None = None) -> dict[str, Any]:
    """`train_and_save`, mirrored to object storage when `output.uri` is `s3://` (output_sync)."""
    from kubetune.trainer.evaluation import output_sync

    if not output_sync.enabled(config):
        return train_and_save(config, reporter, tracker)
    restored = output_sync.restore_checkpoints(config)
    if restored:
        log.info("restored %d checkpoints from %s", restored, config.output.uri)
    with output_sync.CheckpointUploader(config):
        metrics = train_and_save(config, reporter, tracker)
    output_sync.upload_outputs(config)
    return metrics


def _fail(reporter: reporting.Reporter | None, outcome: str, message: str, reason: str = "",
          tracker: tracking.Tracker | None = None) -> None:
    print(f"kubetune.trainer: {message}", file=sys.stderr)
    if tracker is not None:
        tracker.end("FAILED")
    if reporter is not None:
        reporter.report("failed", message=message)
    _terminate(reporting.termination_summary(outcome, message=message, reason=reason,
                                             tracking=tracker.status() if tracker else None))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; under the launcher, each rank also records its exit code for it."""
    code = _main(argv)
    rank_exit.record_exit_code(code)
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_file.load_config(args.config)
    except cfg.ConfigError as error:
        _fail(None, "failed", str(error))
        return process.EXIT_PERMANENT
    if args.validate_only:
        try:
            statistics = validate_only(config)
            facts = validation_sizing(config, statistics)
            print(json.dumps({"kind": "validation", "valid": True, "statistics": statistics, "sizing": facts}, default=str))
            _terminate(reporting.validation_summary(statistics, facts))
        except (PermanentError, cfg.ConfigError) as error:
            _fail(None, "failed", str(error), getattr(error, "reason", ""))
            return process.EXIT_PERMANENT
        return process.EXIT_OK
    Path(config.output.dir).mkdir(parents=True, exist_ok=True)
    reporter = _reporter(config)
    tracker = _tracker(config, reporter)
    try:
        metrics = _train_with_storage(config, reporter, tracker)
    except (PermanentError, cfg.ConfigError) as error:
        _fail(reporter, "failed", str(error), getattr(error, "reason", ""), tracker)
        return process.EXIT_PERMANENT
    except Preempted as stop:
        tracker.end("KILLED")
        reporter.report("failed", message=f"preempted: {stop}")
        _terminate(reporting.termination_summary(
            "preempted", message=str(stop), tokens_processed=stop.tokens_processed, tracking=tracker.status()))
        return process.EXIT_PREEMPTED
    except Exception as error:  # noqa: BLE001 - anything unexpected is retryable
        traceback.print_exc()
        _fail(reporter, "error", f"{type(error).__name__}: {error}", tracker=tracker)
        return 1
    finally:
        reporter.close()
    _terminate(
        reporting.termination_summary(
            "succeeded",
            step=metrics["step"],
            val_loss=metrics["valLoss"],
            results=metrics["results"],
            model_digest=(metrics.get("model") or {}).get("digest"),
            message="; ".join(filter(None, (f"trained {metrics['step']} steps", comparison_text(metrics["results"])))),
            samples=metrics.get("samples"),
            tokens_processed=metrics.get("tokensProcessed"),
            resolved=metrics.get("hyperparameters"),
            tracking=tracker.status(),
        )
    )
    return process.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
