"""How much the built-in server adds on top of calling `generate` directly.

Same model, same prompts, same settings (greedy, fixed max_tokens, stopping at
the model's end-of-sequence tokens on both sides, so both generate the same
tokens; the script checks the counts agree):

(a) baseline: `model.generate` in this process;
(b) the server (`python -m kubetune.trainer.serve`, a subprocess on loopback),
    one HTTP request at a time.

Both sides are warmed up first, then called alternately (`--repeats` times per
prompt) so background load hits both alike; prints the median latency per
prompt for both and the overhead ratio (server / direct). The server's extra
work: HTTP + JSON, request validation, tokenisation, and the per-token
stopping check and incremental detokenisation of its token sink.

    python bench/serve_overhead.py                    # tiny model made on the fly
    python bench/serve_overhead.py --model PATH.gguf  # e.g. SmolLM2-135M-Instruct Q4_1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kubetune.trainer.serve_engine import load_engine, resolve_model_source
from kubetune.trainer.serve_process import ServerProcess

PROMPTS = (
    "The operator watches",
    "A trainer pod reads the training data and",
    "Kubernetes schedules each pod on a node that",
    "The learning rate starts small, then",
    "After each epoch the controller",
    "Our team deploys the model when",
    "The validation split shows",
    "A checkpoint holds",
)


Runner = Callable[[str], int]
"""Generates a completion of one prompt; returns the number of tokens generated."""


def direct_runner(model_path: str, max_tokens: int, device: str) -> Runner:
    """(a) `model.generate` in this process, with the settings the server uses."""
    import torch

    engine = load_engine(resolve_model_source(model_path), device=device)  # type: ignore[arg-type]

    def run(prompt: str) -> int:
        ids = torch.tensor([engine.encode_prompt(prompt)], device=engine.device)
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=sorted(engine.eos_ids),
                pad_token_id=engine.pad_id,
            )
        return int(out.shape[1] - ids.shape[1])

    return run


def server_runner(server: ServerProcess, max_tokens: int) -> Runner:
    """(b) one HTTP request to the running server."""
    model_name = json.loads(server.get("/v1/models")[1])["data"][0]["id"]

    def run(prompt: str) -> int:
        status, answer = server.post_json(
            "/v1/completions",
            {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
            timeout=3600,
        )
        assert status == 200, answer
        return int(answer["usage"]["completion_tokens"])

    return run


def timed(run: Runner, prompt: str) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = run(prompt)
    return time.perf_counter() - started, tokens


def measure(direct: Runner, served: Runner, prompts: Sequence[str], repeats: int) -> list[tuple[str, int, float, float]]:
    """Per prompt: (prompt, tokens, median direct seconds, median server seconds).

    Direct and server calls alternate, so background load on the machine hits both alike.
    """
    direct(prompts[0]), served(prompts[0])  # warm-up both
    rows = []
    for prompt in prompts:
        direct_times, served_times = [], []
        for _ in range(repeats):
            seconds, direct_tokens = timed(direct, prompt)
            direct_times.append(seconds)
            seconds, served_tokens = timed(served, prompt)
            served_times.append(seconds)
            if direct_tokens != served_tokens:
                print(f"warning: {prompt!r}: direct generated {direct_tokens} tokens, the server {served_tokens}")
        rows.append((prompt, direct_tokens, statistics.median(direct_times), statistics.median(served_times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or .gguf file (default: a tiny model created in a temp folder)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts (fewer for slow models)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per prompt and side; medians are compared")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = args.model
        if model_path is None:
            from kubetune.dev.tinymodel import create_tiny_model

            model_path = str(create_tiny_model(workdir / "tiny"))
        server = ServerProcess(
            ["--model", model_path, "--device", args.device, "--max-tokens-limit", str(args.max_tokens)],
            workdir / "server.log",
        )
        try:
            server.wait_listening()
            direct = direct_runner(model_path, args.max_tokens, args.device)
            server.wait_ready(timeout=600)
            rows = measure(direct, server_runner(server, args.max_tokens), PROMPTS[: args.prompts], args.repeats)
        finally:
            server.stop()

    print(f"\nmodel: {model_path}\nmax_tokens: {args.max_tokens} (greedy), {len(rows)} prompts, device {args.device}")
    print(f"{'prompt':<48} {'tokens':>6} {'direct ms':>10} {'server ms':>10} {'ratio':>6}")
    for prompt, tokens, a, b in rows:
        print(f"{prompt:<48} {tokens:>6} {a * 1000:>10.1f} {b * 1000:>10.1f} {b / a:>6.2f}")
    direct_total = sum(row[2] for row in rows)
    served_total = sum(row[3] for row in rows)
    print(f"{'total':<55} {direct_total * 1000:>10.1f} {served_total * 1000:>10.1f} {served_total / direct_total:>6.2f}")
    per_request = (served_total - direct_total) / len(rows) * 1000
    print(f"\noverhead ratio (server / direct, medians of {args.repeats} alternating runs per prompt): "
          f"{served_total / direct_total:.2f}x ({per_request:+.1f} ms per request)")  # fmt: skip


if __name__ == "__main__":
    main()
