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

Then concurrency: 1, 8 and 32 clients, each sending `--requests-per-client`
streamed completions back to back, against two server processes on the same
model: (c) the sequential baseline (`--max-batch-size 1`: one request at a
time, as the server did before batching) and (d) the batching server
(defaults). Every request generates exactly `--max-tokens` tokens (the
default model cannot end a sequence). The sides alternate, `--concurrency-repeats`
times per client count; printed per side and client count: aggregate generated
tokens/s (min/median/max over the repeats), p50/p99 time to first token and per
request over every request of every repeat, refused (429) requests, and the
ratios that matter (batching vs sequential at the same concurrency; 8 clients
vs 1 on the batching server). The load average is printed with the figures:
the machine is shared.

    python bench/serve_overhead.py                    # tiny model made on the fly
    python bench/serve_overhead.py --model PATH.gguf  # e.g. SmolLM2-135M-Instruct Q4_1
    python bench/serve_overhead.py --quick            # a smoke run, no figures worth reading
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetune.trainer.serve.engine import load_engine, resolve_model_source
from kubetune.trainer.serve.process import ServerProcess

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
    # The server's thread count (cores minus one on CPU), so both sides compute the same way.
    torch.set_num_threads(engine.threads)

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


def endless_tiny_model(path: Path) -> str:
    """A tiny GPT-2 model whose end-of-sequence logits are always 0 while another's is above: every
    greedy generation runs to max_tokens, so both sides generate exactly the same number of tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.dev.tinymodel import create_tiny_model

    create_tiny_model(path, arch="gpt2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    eos_ids = {i for i in tokenizer.convert_tokens_to_ids([tokenizer.eos_token, "<|im_end|>"]) if i is not None}
    with torch.no_grad():
        model.get_output_embeddings().weight[sorted(eos_ids)] = 0.0
    model.save_pretrained(path)
    return str(path)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One streamed request as a client saw it."""

    status: int
    """HTTP status."""
    first_token: float
    """Seconds from sending to the first generated text."""
    total: float
    """Seconds from sending to the end of the stream."""
    tokens: int
    """completion_tokens from the usage chunk."""


def streamed_completion(base_url: str, model: str, prompt: str, max_tokens: int) -> Timing:
    """One streamed completion over a fresh connection, timing the first content chunk."""
    host, port = base_url.split("://", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection(host, int(port), timeout=3600)
    started = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return Timing(response.status, 0.0, time.perf_counter() - started, 0)
        first = None
        tokens = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
        total = time.perf_counter() - started
        return Timing(200, first if first is not None else total, total, tokens)
    finally:
        connection.close()


@dataclasses.dataclass(frozen=True)
class Round:
    """C clients against one server, each sending its requests back to back."""

    clients: int
    wall: float
    """Seconds from the first request sent to the last answer received."""
    timings: list[Timing]

    @property
    def tokens_per_second(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall


def run_round(server: ServerProcess, clients: int, requests_per_client: int, max_tokens: int) -> Round:
    model = json.loads(server.get("/v1/models")[1])["data"][0]["id"]
    barrier = threading.Barrier(clients)

    def client(index: int) -> list[Timing]:
        barrier.wait()
        return [streamed_completion(server.base_url, model, PROMPTS[(index + k) % len(PROMPTS)], max_tokens)
                for k in range(requests_per_client)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        timings = [t for per_client in pool.map(client, range(clients)) for t in per_client]
    return Round(clients, time.perf_counter() - started, timings)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation over every value."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_concurrency(sides: dict[str, ServerProcess], client_counts: Sequence[int], repeats: int,
                        requests_per_client: int, max_tokens: int) -> dict[str, dict[int, list[Round]]]:
    """Every (side, client count) `repeats` times. Each repeat runs every client count on both sides,
    alternating, so a change in the shared machine's load hits all of them alike (comparing client
    counts measured minutes apart would compare the load, not the server)."""
    for server in sides.values():  # warm-up
        run_round(server, 2, 1, max_tokens)
    results: dict[str, dict[int, list[Round]]] = {side: {c: [] for c in client_counts} for side in sides}
    for _ in range(repeats):
        for clients in client_counts:
            for side, server in sides.items():
                results[side][clients].append(run_round(server, clients, requests_per_client, max_tokens))
    return results


def report_concurrency(results: dict[str, dict[int, list[Round]]], max_tokens: int) -> dict[str, Any]:
    print(f"\nconcurrency: streamed completions of {max_tokens} tokens (greedy), load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'side':<11} {'clients':>7} {'tok/s min':>9} {'median':>8} {'max':>8} {'TTFT p50':>9} {'p99':>7} "
          f"{'request p50':>11} {'p99':>7} {'429s':>5}")
    figures: dict[str, Any] = {}
    for side, by_clients in results.items():
        for clients, rounds in by_clients.items():
            rates = [r.tokens_per_second for r in rounds]
            timings = [t for r in rounds for t in r.timings]
            answered = [t for t in timings if t.status == 200]
            refused = sum(1 for t in timings if t.status == 429)
            ttft = [t.first_token for t in answered] or [0.0]
            total = [t.total for t in answered] or [0.0]
            row = {"tokensPerSecond": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
                   "ttftP50": percentile(ttft, 0.5), "ttftP99": percentile(ttft, 0.99),
                   "requestP50": percentile(total, 0.5), "requestP99": percentile(total, 0.99),
                   "refused": refused, "requests": len(timings)}
            figures[f"{side}-{clients}"] = row
            print(f"{side:<11} {clients:>7} {min(rates):>9.1f} {statistics.median(rates):>8.1f} {max(rates):>8.1f} "
                  f"{row['ttftP50'] * 1000:>7.0f}ms {row['ttftP99'] * 1000:>5.0f}ms "
                  f"{row['requestP50'] * 1000:>9.0f}ms {row['requestP99'] * 1000:>5.0f}ms {refused:>5}")
    batched, sequential = results["batching"], results["sequential"]
    print()
    for clients in batched:
        ratio = (statistics.median(r.tokens_per_second for r in batched[clients])
                 / statistics.median(r.tokens_per_second for r in sequential[clients]))
        figures[f"batchingVsSequential{clients}"] = ratio
        print(f"{clients:>2} clients: batching / sequential aggregate tokens/s (medians) = {ratio:.2f}x")
    one = statistics.median(r.tokens_per_second for r in batched[min(batched)])
    for clients in batched:
        if clients != min(batched):
            ratio = statistics.median(r.tokens_per_second for r in batched[clients]) / one
            figures[f"batching{clients}VsOneClient"] = ratio
            print(f"batching server: {clients} clients / {min(batched)} client aggregate tokens/s (medians) = "
                  f"{ratio:.2f}x")
    figures["loadAverage"] = list(os.getloadavg())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or .gguf file (default: a tiny model created in a temp folder)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts (fewer for slow models)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per prompt and side; medians are compared")
    parser.add_argument("--clients", default="1,8,32", help="client counts for the concurrency rows")
    parser.add_argument("--concurrency-repeats", type=int, default=3, help="rounds per client count and side")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends per round")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts, figures not meaningful")
    args = parser.parse_args()
    client_counts = sorted({int(c) for c in args.clients.split(",")})
    if args.quick:
        args.max_tokens, args.prompts, args.repeats = 4, 2, 1
        args.concurrency_repeats, args.requests_per_client = 1, 1
        client_counts = [1, 4]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = args.model
        if model_path is None:
            from kubetune.dev.tinymodel import create_tiny_model

            model_path = endless_tiny_model(workdir / "tiny")
        common = ["--model", model_path, "--device", args.device, "--max-tokens-limit", str(args.max_tokens),
                  "--max-concurrency", str(max(64, max(client_counts)))]
        server = ServerProcess(common, workdir / "server.log")
        sequential = ServerProcess([*common, "--max-batch-size", "1"], workdir / "sequential.log")
        try:
            server.wait_listening()
            sequential.wait_listening()
            direct = direct_runner(model_path, args.max_tokens, args.device)
            server.wait_ready(timeout=600)
            sequential.wait_ready(timeout=600)
            rows = measure(direct, server_runner(server, args.max_tokens), PROMPTS[: args.prompts], args.repeats)
            concurrency = measure_concurrency({"sequential": sequential, "batching": server}, client_counts,
                                              args.concurrency_repeats, args.requests_per_client, args.max_tokens)
        finally:
            server.stop()
            sequential.stop()

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
    figures = report_concurrency(concurrency, args.max_tokens)
    print("RESULT " + json.dumps({"overheadRatio": served_total / direct_total, "concurrency": figures,
                                  "maxTokens": args.max_tokens, "quick": args.quick}))


if __name__ == "__main__":
    main()
