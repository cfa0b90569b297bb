"""`python -m kubetune.trainer --config FILE [--validate-only]`: setup -> fit -> evaluate -> save.

Exit codes (constants in kubetune.trainer.config): 0 success; 78 permanent
error (bad config, bad data, missing model: never retried); 75 preempted
(SIGTERM: a checkpoint was saved, a retry resumes from it); anything else is
a retryable failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.trainer import config as cfg
from kubetune.trainer import reporting
from kubetune.trainer.errors import PermanentError, Preempted

log = logging.getLogger("kubetune.trainer")


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
    from kubetune.trainer import data, modeling

    tokenizer = modeling.load_tokenizer(config.model)
    return tokenizer, data.prepare(config.dataset, synthetic_model=config.model if synthetic else None)


def validate_only(config: cfg.TrainerConfig) -> dict[str, Any]:
    """Data statistics including token counts, as --validate-only prints them."""
    from kubetune.trainer import data

    tokenizer, prepared = load_data(config, synthetic=False)
    statistics = prepared.statistics()
    lengths = [len(t.input_ids) for t in data.tokenize_examples(prepared.splits.train, tokenizer)]
    statistics["trainTokens"] = {"total": sum(lengths), "longestExample": max(lengths), "meanExample": round(sum(lengths) / len(lengths), 1)}
    return statistics


def validation_sizing(config: cfg.TrainerConfig, statistics: dict[str, Any]) -> dict[str, Any] | None:
    """Model and data facts for the operator's resource estimate; None when the model's shape cannot be read."""
    from kubetune.trainer import sizing

    tokens = statistics["trainTokens"]
    try:
        return sizing.sizing_facts(config, train_examples=int(statistics.get("splits", {}).get("train", 0) or 0),
                                   train_tokens=tokens["total"], longest_example=tokens["longestExample"])
    except Exception as error:  # noqa: BLE001 - the estimate is advisory; validation itself passed
        log.warning("no sizing facts for the resource estimate: %s: %s", type(error).__name__, error)
        return None


def test_metrics(run: Any, prepared: Any) -> dict[str, Any]:
    """Perplexity and token accuracy on the test split; classification metrics by label likelihood."""
    from kubetune.trainer import data, evaluate

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
    lm = evaluate.language_model_metrics(
        run.model,
        sequences[run.accelerator.process_index :: run.world_size],
        batch_size=run.hp.batch_size,
        pad_id=run.pad_id,
        device=run.accelerator.device,
        reduce=run.accelerator.reduce,
    )
    results: dict[str, Any] = {"loss": lm.get("loss"), "perplexity": lm.get("perplexity"), "tokenAccuracy": lm.get("tokenAccuracy"), "examples": len(examples)}
    if run.labels:
        model = run.accelerator.unwrap_model(run.model)
        predicted = evaluate.predict_labels(model, run.tokenizer, [e.prompt for e in examples], run.labels, run.accelerator.device)
        results |= evaluate.classification_metrics([e.label for e in examples], predicted, run.labels)
    return results


def train_and_save(config: cfg.TrainerConfig, reporter: reporting.Reporter) -> dict[str, Any]:
    """The whole run; returns the final metrics (also written to metrics.json)."""
    from kubetune.trainer import outputs, train

    started = time.monotonic()
    reporter.report("started", message=f"loading data and model {config.model.source}")
    tokenizer, prepared = load_data(config)
    run = train.setup(config, prepared, tokenizer)
    if train.resume(run):
        reporter.report("started", step=run.state.step, totalSteps=run.total_steps, message=f"resumed from {run.resumed_from}")
    log.info(
        "training %s (%d parameters, %d trainable) for %d steps, hyperparameters %s",
        config.model.source, run.num_parameters, run.trainable_parameters, run.total_steps, json.dumps(run.hp.to_report()),
    )
    state = train.fit(run, reporter)
    model_step = train.restore_best(run)
    results = test_metrics(run, prepared)
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
        "device": f"{run.accelerator.num_processes}x {run.device_kind}",
        "resumedFrom": run.resumed_from,
        "history": {"trainLoss": state.train_losses, "evaluations": state.evaluations},
    }
    if run.accelerator.is_main_process:
        from kubetune.trainer import modeling

        folder = outputs.save_model(run.accelerator.unwrap_model(run.model), tokenizer, config, modeling.locate(config.model).name_or_path)
        metrics["model"] = {"uri": str(folder.resolve()), "digest": outputs.model_digest(folder)}
        metrics["wallSeconds"] = round(time.monotonic() - started, 2)
        outputs.write_outputs(config, metrics, state.train_losses, state.evaluations)
    run.accelerator.wait_for_everyone()
    reporter.report(
        "completed",
        step=state.step,
        totalSteps=run.total_steps,
        valLoss=metrics["valLoss"],
        valPerplexity=metrics["valPerplexity"],
        tokensSeen=state.tokens_seen,
        results=results,
        model=metrics.get("model"),
    )
    return metrics


def _fail(reporter: reporting.Reporter | None, outcome: str, message: str) -> None:
    print(f"kubetune.trainer: {message}", file=sys.stderr)
    if reporter is not None:
        reporter.report("failed", message=message)
    reporting.write_termination_message(reporting.termination_summary(outcome, message=message))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = cfg.load_config(args.config)
    except cfg.ConfigError as error:
        _fail(None, "failed", str(error))
        return cfg.EXIT_PERMANENT
    if args.validate_only:
        try:
            statistics = validate_only(config)
            facts = validation_sizing(config, statistics)
            print(json.dumps({"kind": "validation", "valid": True, "statistics": statistics, "sizing": facts}, default=str))
            reporting.write_termination_message(reporting.validation_summary(statistics, facts))
        except (PermanentError, cfg.ConfigError) as error:
            _fail(None, "failed", str(error))
            return cfg.EXIT_PERMANENT
        return cfg.EXIT_OK
    Path(config.output.dir).mkdir(parents=True, exist_ok=True)
    reporter = reporting.Reporter.from_environment(config.job)
    try:
        metrics = train_and_save(config, reporter)
    except (PermanentError, cfg.ConfigError) as error:
        _fail(reporter, "failed", str(error))
        return cfg.EXIT_PERMANENT
    except Preempted as stop:
        reporter.report("failed", message=f"preempted: {stop}")
        reporting.write_termination_message(reporting.termination_summary("preempted", message=str(stop)))
        return cfg.EXIT_PREEMPTED
    except Exception as error:  # noqa: BLE001 - anything unexpected is retryable
        traceback.print_exc()
        _fail(reporter, "error", f"{type(error).__name__}: {error}")
        return 1
    finally:
        reporter.close()
    reporting.write_termination_message(
        reporting.termination_summary(
            "succeeded",
            step=metrics["step"],
            val_loss=metrics["valLoss"],
            results=metrics["results"],
            model_digest=(metrics.get("model") or {}).get("digest"),
            message=f"trained {metrics['step']} steps",
        )
    )
    return cfg.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
