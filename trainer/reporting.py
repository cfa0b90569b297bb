"""Progress reports: JSON lines on stdout, best-effort POSTs to the operator, the termination message.

Every report is one JSON object (`kubetune.api.messages.ProgressReport`) printed on
stdout and, when `KUBETUNE_PROGRESS_URL` is set, POSTed there with the bearer
token from `KUBETUNE_PROGRESS_TOKEN`. POSTs run on a background thread with a
short timeout: a slow or failing endpoint never stops or slows training.

An https:// endpoint is verified against the CA in `KUBETUNE_PROGRESS_CA`
(the operator's chart-generated CA), or the system's CAs when that is unset,
before the token is sent. A 429 answer is honoured: the sender waits the
Retry-After seconds (capped) and sends the same report again, so reports stay
in order and none is dropped for being early.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from kubetune.api import config as cfg, messages, process

log = logging.getLogger(__name__)

POST_TIMEOUT_SECONDS = 5.0
"""One POST may take this long before it is given up."""
FLUSH_TIMEOUT_SECONDS = 10.0
"""At exit, queued reports get this long to go out."""
TERMINATION_MESSAGE_LIMIT = messages.TERMINATION_MESSAGE_LIMIT
RATE_LIMIT_RETRIES = 3
"""Times one report is sent again after HTTP 429 before it is given up."""
MAX_RETRY_AFTER_SECONDS = 5.0
"""Longest wait honoured from a Retry-After header (the operator asks for about a second)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Reporter:
    """Numbers, prints and sends reports for one attempt."""

    def __init__(
        self,
        job: cfg.JobIdentity,
        *,
        url: str | None = None,
        token: str | None = None,
        attempt: int = 0,
        stream: TextIO | None = None,
        ca: str | None = None,
    ) -> None:
        self.job = {"namespace": job.namespace, "name": job.name, "uid": job.uid}
        self.url = url
        self.token = token
        self.attempt = attempt
        self.stream = stream or sys.stdout
        self.seq = 0
        self.failed_posts = 0
        self._tls = ssl.create_default_context(cadata=ca) if ca else None
        """Verifies an https:// endpoint against this CA only; None = urllib's default (system CAs)."""
        self.tracking: Callable[[], Mapping[str, Any] | None] | None = None
        """The experiment tracking state (`tracking.Tracker.status`), sent with every report once set up."""
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        """Called with each report after it is printed (experiment tracking logs from them)."""
        self._lock = threading.Lock()
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._sender: threading.Thread | None = None
        if url:
            self._sender = threading.Thread(target=self._send_loop, name="progress-reports", daemon=True)
            self._sender.start()

    @classmethod
    def from_environment(cls, job: cfg.JobIdentity, stream: TextIO | None = None) -> Reporter:
        attempt_text = os.environ.get(process.ENV_ATTEMPT, "0")
        return cls(
            job,
            url=os.environ.get(process.ENV_PROGRESS_URL) or None,
            token=os.environ.get(process.ENV_PROGRESS_TOKEN) or None,
            attempt=int(attempt_text) if attempt_text.isdigit() else 0,
            stream=stream,
            ca=os.environ.get(process.ENV_PROGRESS_CA) or None,
        )

    def report(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Print and queue one report; fields with value None are left out, at any depth.

        `kind` and the field names are those of `messages.ProgressReport`; anything else is a
        programming error (ValueError), caught by the tests rather than rejected by the operator."""
        unknown = sorted(set(fields) - set(messages.field_types(messages.ReportFields)))
        if kind not in messages.KINDS or unknown:
            raise ValueError(f"not a progress report of the contract: kind {kind!r}, unknown fields {unknown}")
        if self.tracking is not None and "tracking" not in fields:
            fields["tracking"] = self.tracking()
        with self._lock:
            self.seq += 1
            body = {"job": self.job, "attempt": self.attempt, "seq": self.seq, "time": _now(), "kind": kind}
            body.update(messages.compact(fields))
            line = json.dumps(body, default=str)
            print(line, file=self.stream, flush=True)
        if self._sender is not None:
            self._outbox.put(line.encode())
        for observer in self.observers:
            try:
                observer(body)
            except Exception as error:  # noqa: BLE001 - an observer (tracking) never stops training
                log.warning("report observer %s failed: %s: %s", observer, type(error).__name__, error)
        return body

    def _send_loop(self) -> None:
        while (payload := self._outbox.get()) is not None:
            self._post(payload)
            self._outbox.task_done()
        self._outbox.task_done()

    def _post(self, payload: bytes) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url or "", data=payload, headers=headers, method="POST")
        try:
            for retry in range(RATE_LIMIT_RETRIES + 1):
                try:
                    with urllib.request.urlopen(request, timeout=POST_TIMEOUT_SECONDS, context=self._tls) as response:
                        response.read()
                    return
                except urllib.error.HTTPError as error:
                    if error.code != 429 or retry == RATE_LIMIT_RETRIES:
                        raise
                    time.sleep(_retry_after(error.headers.get("Retry-After")))
        except Exception as error:  # noqa: BLE001 - best effort: never let reporting stop training
            self.failed_posts += 1
            if self.failed_posts <= 3:
                log.warning("progress report to %s failed: %s", self.url, error)

    def close(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Send what is queued (for at most `timeout` seconds) and stop the sender."""
        if self._sender is None:
            return
        self._outbox.put(None)
        self._sender.join(timeout)
        self._sender = None


def _retry_after(header: str | None) -> float:
    try:
        seconds = float(header or 1)
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def termination_summary(
    outcome: str,
    *,
    step: int | None = None,
    val_loss: float | None = None,
    results: Mapping[str, Any] | None = None,
    model_digest: str | None = None,
    message: str = "",
    samples: Sequence[Mapping[str, str]] | None = None,
    tokens_processed: int | None = None,
    resolved: Mapping[str, Any] | None = None,
    reason: str = "",
    tracking: Mapping[str, Any] | None = None,
) -> str:
    """The pod's termination message (`messages.TerminationSummary`): short JSON, under 4 KiB.
    `reason`: a permanent error's kind (`errors.PermanentError.reason`), which the operator uses as
    the condition's reason. `tracking`: the experiment tracking state (`messages.TrackingStatus`).

    `tokensProcessed` (training tokens this process trained on) is what the operator records in
    `status.usage`: the pod itself writes it, unlike a progress report, which anyone holding the
    job's token could send.

    When it would be longer, per-class details go first (the baseline's, then the run's own), then
    the sample excerpt, then the message is cut; the headline figures of both models always stay.
    """
    summary: dict[str, Any] = messages.compact({
        "outcome": outcome,
        "step": step,
        "valLoss": val_loss,
        "results": dict(results or {}),
        "modelDigest": model_digest,
        "message": message,
        "resolved": dict(resolved) if resolved else None,
    })
    if tokens_processed is not None:
        summary["tokensProcessed"] = int(tokens_processed)
    if reason:
        summary["reason"] = reason
    if tracking:
        summary["tracking"] = dict(tracking)
    if samples:
        # One sample, each text cut short: enough for the operator's Event when the report was lost.
        summary["samples"] = [{k: _excerpt(v) for k, v in samples[0].items()}]
    text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and isinstance(summary["results"].get("baseline"), dict):
        summary["results"]["baseline"] = _scalars(summary["results"]["baseline"])
        text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        kept = {k: v for k, v in summary["results"].items() if k in ("baseline", "improvement") and isinstance(v, dict)}
        summary["results"] = _scalars(summary["results"]) | kept
        text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and "samples" in summary:
        del summary["samples"]
        text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        summary["message"] = message[:1000]
        text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        summary.pop("resolved", None)  # the completed report carries it too
        text = json.dumps(summary)
    return text


def _scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str))}


def _excerpt(text: str, limit: int = 160) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def validation_summary(statistics: Mapping[str, Any], sizing: Mapping[str, Any] | None) -> str:
    """The validation pod's termination message: outcome `validated`, a one-line data summary and the
    sizing facts the operator estimates resources from (dropped if they would pass 4 KiB)."""
    splits = statistics.get("splits") or {}
    tokens = (statistics.get("trainTokens") or {}).get("total")
    message = (f"{splits.get('train', 0)} train / {splits.get('validation', 0)} validation / "
               f"{splits.get('test', 0)} test examples, {tokens} training tokens")
    summary: dict[str, Any] = {"outcome": "validated", "message": message}
    if sizing:
        summary["sizing"] = dict(sizing)
    text = json.dumps(summary)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        text = json.dumps({"outcome": "validated", "message": message})
    return text


def termination_log_path() -> Path | None:
    """KUBETUNE_TERMINATION_LOG, else /dev/termination-log when it exists and is writable."""
    configured = os.environ.get(process.ENV_TERMINATION_LOG)
    if configured:
        return Path(configured)
    default = Path(process.DEFAULT_TERMINATION_LOG)
    return default if default.exists() and os.access(default, os.W_OK) else None


def write_termination_message(text: str) -> None:
    path = termination_log_path()
    if path is None:
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        log.warning("cannot write the termination message to %s: %s", path, error)
