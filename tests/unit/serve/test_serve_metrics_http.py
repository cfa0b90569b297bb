"""`GET /metrics` counts requests by endpoint and status, latency, tokens and work in flight."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised


def _samples(served: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, raw = served.get("/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(raw.decode())
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_latency_and_tokens_move_with_traffic(served: ServerProcess, memorised: Memorised) -> None:
    before = _samples(served)
    status, answer = served.post_json("/v1/completions", {"model": memorised.model_name, "prompt": "The", "max_tokens": 5})
    assert status == 200
    assert served.post_json("/v1/completions", {"model": "nope", "prompt": "x"})[0] == 404
    after = _samples(served)

    endpoint = "/v1/completions"
    requests = "kubetune_serve_requests_total"
    assert _value(after, requests, endpoint=endpoint, status="200") == _value(before, requests, endpoint=endpoint, status="200") + 1
    assert _value(after, requests, endpoint=endpoint, status="404") == _value(before, requests, endpoint=endpoint, status="404") + 1
    latency = "kubetune_serve_request_duration_seconds_count"
    assert _value(after, latency, endpoint=endpoint) == _value(before, latency, endpoint=endpoint) + 2
    tokens = "kubetune_serve_generated_tokens_total"
    assert _value(after, tokens) == _value(before, tokens) + answer["usage"]["completion_tokens"]
    prompt = "kubetune_serve_prompt_tokens_total"
    assert _value(after, prompt) == _value(before, prompt) + answer["usage"]["prompt_tokens"]
    assert _value(after, "kubetune_serve_requests_in_flight") == 0
    assert _value(after, "kubetune_serve_model_loaded") == 1


def test_unknown_paths_share_one_label(served: ServerProcess) -> None:
    served.get("/some/random/path")
    samples = _samples(served)
    assert _value(samples, "kubetune_serve_requests_total", endpoint="unmatched", status="404") >= 1
    assert not any("/some/random/path" in str(labels) for _, labels in samples)


def test_only_the_servers_own_metrics_are_exposed(served: ServerProcess) -> None:
    # A dedicated registry: no process/platform collectors from prometheus-client's global one.
    names = {name for name, _ in _samples(served)}
    assert names and all(name.startswith("kubetune_serve_") for name in names)
