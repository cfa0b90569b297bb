"""Prometheus metrics of the built-in server, in a registry of their own.

A dedicated `CollectorRegistry` (not prometheus-client's global one) keeps the
server's metrics independent of anything else imported into the process, and
lets tests create several servers' metrics side by side.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds; from cheap probes up to long generations on a CPU."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Requests per batch; powers of two up to the largest --max-batch-size worth using."""


class ServerMetrics:
    """The server's counters, histogram and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        """Holds only this server's metrics; rendered by `GET /metrics`."""
        self.requests = Counter(
            "kubetune_serve_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        """Requests by endpoint (route path, `unmatched` for unknown paths) and status code."""
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Time from request arrival to the last byte of the answer (streams included).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        """Request latency by endpoint."""
        self.generated_tokens = Counter(
            "kubetune_serve_generated_tokens",
            "Completion tokens generated.",
            registry=self.registry,
        )
        """Completion tokens (as reported in usage.completion_tokens)."""
        self.prompt_tokens = Counter(
            "kubetune_serve_prompt_tokens",
            "Prompt tokens processed.",
            registry=self.registry,
        )
        """Prompt tokens (as reported in usage.prompt_tokens)."""
        self.in_flight = Gauge(
            "kubetune_serve_requests_in_flight",
            "Generation requests admitted and not yet answered (generating or waiting for the model).",
            registry=self.registry,
        )
        """Generation requests in progress."""
        self.model_loaded = Gauge(
            "kubetune_serve_model_loaded",
            "1 once the model is loaded and the server is ready, else 0.",
            registry=self.registry,
        )
        """Readiness as a number, for alerts."""

        self.batch_size = Histogram(
            "kubetune_serve_batch_size",
            "Requests decoded together, observed at every decoding step.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        """How many requests each decoding step ran for (always 1 = no batching happened)."""

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
