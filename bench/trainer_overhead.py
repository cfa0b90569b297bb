"""Trainer overhead: time per step outside forward, backward and the optimizer, and peak memory.

Runs the real loop (`trainer.train.setup` + `trainer.train.fit`) with the
costly-to-get-right parts switched on: a progress report after *every* step
(`KUBETUNE_PROGRESS_INTERVAL=0`), POSTed over real HTTP to a loopback server
by the reporter's background thread, and a checkpoint every `--checkpoint-every`
steps. The compute calls are wrapped from outside (nothing in the trainer is
changed for this): the model's forward (incl. the loss), `accelerator.backward`,
gradient clipping, `optimizer.step` and `zero_grad`. Everything
else inside the step loop is overhead: collating the batch, counting tokens,
reading the step losses (once per report), reporting, checkpoint scheduling. Checkpoint *writing* and
validation are measured separately (they are work, not per-step overhead).

    python bench/trainer_overhead.py            # the throughput bench's model, ~1-2 min on 2 CPU cores
    python bench/trainer_overhead.py --quick    # tiny model (where Python overhead weighs most)
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import workload


class PhaseClock:
    """Accumulates wall time per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Sink(http.server.BaseHTTPRequestHandler):
    received = 0

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received += 1
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def report_sink() -> tuple[str, http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1/reports", server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few examples: a smoke test")
    parser.add_argument("--examples", type=int, default=None, help="training examples (default 400; quick 120)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    args = parser.parse_args()
    shape = workload.QUICK_SHAPE if args.quick else workload.BENCH_SHAPE
    count = args.examples or (120 if args.quick else 400)

    from kubetune.api import config as cfg
    from kubetune.trainer.__main__ import load_data
    from kubetune.trainer.evaluation import evaluate
    from kubetune.trainer.reporting import Reporter
    from kubetune.trainer.training import train

    print(f"hardware          {workload.hardware_line()}")
    url, server = report_sink()
    os.environ["KUBETUNE_PROGRESS_INTERVAL"] = "0"
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model = workload.create_bench_model(scratch / "model", shape)
        train_file = workload.write_jsonl(scratch / "train.jsonl", workload.instruction_like_texts(count, seed=1))
        config = cfg.config_from_dict({
            "model": {"source": str(model)},
            "dataset": {"format": "text", "train": {"source": str(train_file)},
                        "split": {"validation": 0.05, "test": 0}},
            "method": {"type": "full"},
            "hyperparameters": {"epochs": 1, "batchSize": 4, "gradientAccumulationSteps": 1, "maxSeqLength": 256,
                                "learningRate": 1e-3},
            "training": {"precision": "bf16" if workload.device_kind() == "cuda" else "fp32",
                         "checkpointInterval": args.checkpoint_every, "evalInterval": 0},
            "job": {"name": "bench-overhead"},
            "output": {"dir": str(scratch / "out")},
        })
        tokenizer, prepared = load_data(config)
        run = train.setup(config, prepared, tokenizer)

        clock = PhaseClock()
        compute = ("forward", "backward", "clip", "optimizer", "zero_grad")
        original_loss = evaluate.training_loss
        evaluate.training_loss = clock.wrap("forward", original_loss)  # the model's forward and the loss
        run.accelerator.backward = clock.wrap("backward", run.accelerator.backward)
        run.accelerator.clip_grad_norm_ = clock.wrap("clip", run.accelerator.clip_grad_norm_)
        run.optimizer.step = clock.wrap("optimizer", run.optimizer.step)
        # scheduler.step stays unwrapped (the scheduler's state_dict pickles its attributes): its
        # few microseconds count as overhead here, which only makes the figure conservative.
        run.optimizer.zero_grad = clock.wrap("zero_grad", run.optimizer.zero_grad)
        original_validate, original_save = train.validate, train.save_checkpoint
        train.validate = clock.wrap("validation", original_validate)
        train.save_checkpoint = clock.wrap("checkpoint write", original_save)

        reporter = Reporter(config.job, url=url, stream=io.StringIO())
        started = time.perf_counter()
        state = train.fit(run, reporter)
        _sync()
        total = time.perf_counter() - started
        reporter.close()
        train.validate, train.save_checkpoint = original_validate, original_save
        evaluate.training_loss = original_loss
        server.shutdown()

    inside = sum(clock.seconds.get(name, 0.0) for name in compute)
    separate = clock.seconds.get("validation", 0.0) + clock.seconds.get("checkpoint write", 0.0)
    loop = total - separate
    overhead = loop - inside
    steps = max(1, state.step)
    print(f"model             {shape.describe()}, {run.num_parameters / 1e6:.1f}M parameters; {steps} steps of "
          f"{run.hp.batch_size} x {run.hp.max_seq_length} tokens")
    print(f"step time         {loop / steps * 1000:.1f} ms per step: forward {_ms(clock, 'forward', steps)}, "
          f"backward {_ms(clock, 'backward', steps)}, optimizer+clip "
          f"{sum(clock.seconds.get(n, 0.0) for n in ('clip', 'optimizer', 'zero_grad')) / steps * 1000:.1f} ms")
    print(f"overhead          {overhead / steps * 1000:.2f} ms per step = {overhead / loop:.2%} of step time "
          f"(batching, token counts, reading losses, a progress report per step: {_Sink.received} POSTs received, "
          f"checkpoint scheduling) (target < 5%)")
    print(f"separately        checkpoint writes {clock.seconds.get('checkpoint write', 0.0):.2f} s "
          f"(every {args.checkpoint_every} steps), validation {clock.seconds.get('validation', 0.0):.2f} s")
    print(f"peak memory       {workload.peak_rss_mib():.0f} MiB resident (this process: model, optimizer, data)")
    print("RESULT " + json.dumps({
        "bench": "trainer_overhead", "quick": args.quick, "device": workload.device_kind(), "steps": steps,
        "stepMs": round(loop / steps * 1000, 2), "overheadMs": round(overhead / steps * 1000, 3),
        "overheadFraction": round(overhead / loop, 4), "reportsPosted": _Sink.received,
        "peakRssMiB": round(workload.peak_rss_mib(), 1),
    }))
    return 0


def _ms(clock: PhaseClock, name: str, steps: int) -> str:
    return f"{clock.seconds.get(name, 0.0) / steps * 1000:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
