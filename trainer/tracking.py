"""Experiment tracking: the run logged to an MLflow tracking server over its REST API (best effort).

The trainer image does not carry the `mlflow` package (hundreds of MB of server-side dependencies for a
few HTTP calls): this module speaks MLflow's REST API with urllib. What is logged:

    params     resolved hyperparameters, model source, method (once per run)
    metrics    trainLoss every step, learningRate at each progress report, validation figures at each
               evaluation, the test results at the end (`test.<name>`, `baseline.<name>`,
               `improvement.<name>`)
    artifacts  metrics.json, README.md (model card), loss_curve.png, loss_curve.csv, through the
               server's `mlflow-artifacts` proxy
    tags       the FineTuneJob's namespace, name and uid, the attempt

A resumed attempt continues the same MLflow run: its id, and how far the logging got, are kept in
`<output>/tracking.json`. Only rank 0 logs.

Tracking never fails or stalls training: the first request the server refuses or does not answer in
`REQUEST_TIMEOUT_SECONDS` turns tracking off for the rest of the attempt (`state: unavailable`, with
a message naming the tracking URI), and the reports and the termination summary say so. Metrics go
out on a background thread through a bounded queue; when the server falls that far behind, tracking
is off too, so nothing is buffered without bound.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubetune.api import config as cfg, layout, messages, process
from kubetune.api.finetunejob import MlflowTracking

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
"""In `output.dir`: the MLflow run id and how far logging got, so a resumed attempt continues the run."""
REQUEST_TIMEOUT_SECONDS = 5.0
"""One request may take this long; a slower server counts as unavailable."""
MAX_PENDING_BATCHES = 64
"""Metric batches waiting for the sender; one more means the server is too slow, and tracking stops."""
MAX_METRICS_PER_BATCH = 1000
"""MLflow's log-batch limit for metrics (and for all entities together)."""
MAX_PARAMS_PER_BATCH = 100
"""MLflow's log-batch limit for params and for tags."""
MAX_PARAM_CHARS = 6000
"""Longest param value MLflow stores."""
CLOSE_TIMEOUT_SECONDS = 30.0
"""At the end, queued metrics get this long to go out before the run is closed."""
ARTIFACTS = (layout.METRICS_FILE, "README.md", "loss_curve.png")
"""Files of the output folder uploaded as run artifacts (those that exist)."""


class TrackingError(Exception):
    """The tracking server refused a request or could not be reached."""


class MlflowClient:
    """The few MLflow REST calls the trainer needs (https://mlflow.org/docs/latest/rest-api.html)."""

    def __init__(self, base_url: str, *, token: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif username and password is not None:
            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"

    @classmethod
    def from_environment(cls, base_url: str) -> MlflowClient:
        """Credentials from the pod's environment (`spec.credentials.mlflow`, by secretKeyRef)."""
        return cls(base_url, token=os.environ.get(process.ENV_MLFLOW_TOKEN) or None,
                   username=os.environ.get(process.ENV_MLFLOW_USERNAME) or None,
                   password=os.environ.get(process.ENV_MLFLOW_PASSWORD))

    def request(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        """One call; the decoded JSON answer ({} when empty). TrackingError on any failure, with the
        server's error code when it sent one (the server's message never carries our credentials)."""
        if body is not None:
            data = json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise TrackingError(f"HTTP {error.code} {_error_code(error)}".rstrip()) from None
        except (OSError, ValueError) as error:  # URLError, timeouts, connection refused, bad URL
            raise TrackingError(str(getattr(error, "reason", error))) from None
        try:
            return dict(json.loads(text)) if text.strip() else {}
        except (ValueError, TypeError):
            raise TrackingError("the answer is not JSON: is this an MLflow tracking server?") from None

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created when it does not exist."""
        query = urllib.parse.urlencode({"experiment_name": name})
        try:
            answer = self.request("GET", f"/api/2.0/mlflow/experiments/get-by-name?{query}")
            return str(answer["experiment"]["experiment_id"])
        except TrackingError as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(error):
                raise
        try:
            return str(self.request("POST", "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"])
        except TrackingError as error:  # created by another job since
            if "RESOURCE_ALREADY_EXISTS" not in str(error):
                raise
            answer = self.request("GET", f"/api/2.0/mlflow/experiments/get-by-name?{query}")
            return str(answer["experiment"]["experiment_id"])

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> dict[str, Any]:
        """A new run's info (`run_id`, `artifact_uri`, ...)."""
        answer = self.request("POST", "/api/2.0/mlflow/runs/create", {
            "experiment_id": experiment_id, "run_name": run_name, "start_time": _millis(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})
        return dict(answer["run"]["info"])

    def get_run(self, run_id: str) -> dict[str, Any]:
        query = urllib.parse.urlencode({"run_id": run_id})
        return dict(self.request("GET", f"/api/2.0/mlflow/runs/get?{query}")["run"]["info"])

    def log_batch(self, run_id: str, *, metrics: Iterable[Mapping[str, Any]] = (),
                  params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.request("POST", "/api/2.0/mlflow/runs/log-batch", {
            "run_id": run_id, "metrics": list(metrics),
            "params": [{"key": k, "value": v} for k, v in (params or {}).items()],
            "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]})

    def update_run(self, run_id: str, status: str) -> None:
        """Set the run's status (RUNNING, FINISHED, FAILED, KILLED); an ended run gets its end time."""
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = _millis()
        self.request("POST", "/api/2.0/mlflow/runs/update", body)

    def upload_artifact(self, artifact_uri: str, path: str, content: bytes, content_type: str) -> None:
        """PUT one file through the server's artifact proxy; TrackingError when the run's artifacts are
        not proxied (`mlflow-artifacts:` URIs are; a bucket the trainer has no access to is not)."""
        parsed = urllib.parse.urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts":
            raise TrackingError(f"the run's artifact location {artifact_uri!r} is not served by the tracking server "
                                "(start it with --serve-artifacts)")
        location = urllib.parse.quote(f"{parsed.path.strip('/')}/{path}")
        self.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}", data=content, content_type=content_type)


def _error_code(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read() or b"{}").get("error_code", ""))
    except (ValueError, OSError, AttributeError):
        return ""


def _millis() -> int:
    return int(time.time() * 1000)


def _metric(key: str, value: Any, step: int) -> dict[str, Any] | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return {"key": key, "value": float(value), "timestamp": _millis(), "step": int(step)}


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as MLflow params: `{"lora": {"r": 8}}` -> {"lora.r": "8"}; lists comma-joined."""
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return flat
    if value is None:
        return {}
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return {prefix: text[:MAX_PARAM_CHARS]}


def run_params(config: cfg.TrainerConfig, resolved: Mapping[str, Any]) -> dict[str, str]:
    """What defines the run, as params: resolved hyperparameters, model source, method, data format."""
    return (flatten("", resolved) | {"model.source": config.model.source or ""}
            | flatten("method", cfg.config_to_dict(config.method)) | {"dataset.format": config.dataset.format})


def result_metrics(results: Mapping[str, Any], step: int) -> list[dict[str, Any]]:
    """The test results as metrics: `test.<name>`, `baseline.<name>` and `improvement.<name>` (numbers only)."""
    entries = [_metric(f"test.{k}", v, step) for k, v in results.items()]
    for section in ("baseline", "improvement"):
        part = results.get(section)
        if isinstance(part, Mapping):
            entries += [_metric(f"{section}.{k}", v, step) for k, v in part.items()]
    return [e for e in entries if e is not None]


def loss_curve_csv(train_losses: list[list[float]], evaluations: list[dict[str, Any]]) -> bytes:
    """step,trainLoss,valLoss: one row per step (and per evaluation step), for spreadsheets and plots."""
    rows: dict[int, dict[str, Any]] = {}
    for step, loss in train_losses:
        rows.setdefault(int(step), {})["trainLoss"] = loss
    for evaluation in evaluations:
        rows.setdefault(int(evaluation["step"]), {})["valLoss"] = evaluation.get("valLoss")
    lines = ["step,trainLoss,valLoss"]
    lines += [f"{step},{_cell(row.get('trainLoss'))},{_cell(row.get('valLoss'))}" for step, row in sorted(rows.items())]
    return ("\n".join(lines) + "\n").encode()


def _cell(value: Any) -> str:
    return "" if value is None else repr(float(value))


class Tracker:
    """The MLflow run of one attempt: set up at `start`, fed by the reports, closed by `finish` or `end`."""

    def __init__(self, settings: MlflowTracking | None, job: cfg.JobIdentity, *, attempt: int,
                 output_dir: Path, client: MlflowClient | None = None) -> None:
        self.settings = settings
        self.job = job
        self.attempt = attempt
        self.state_file = output_dir / STATE_FILE
        self.client = client or (MlflowClient.from_environment(settings.tracking_uri) if settings else None)
        self._status: messages.TrackingStatus | None = None
        self._saved: dict[str, Any] = {}
        """What tracking.json holds: runId, experimentId, trackingUri, experiment, loggedStep, ..."""
        self._artifact_uri = ""
        self._train_state: Any = None
        self._queued_step = 0
        self._queued_evaluation = -1
        self._rate_step = 0
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[list[dict[str, Any]], dict[str, int]] | None] = queue.Queue(MAX_PENDING_BATCHES)
        self._sender: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: cfg.TrainerConfig, *, attempt: int, main_rank: bool) -> Tracker:
        """The tracker of this process: switched off without `tracking.mlflow`, and on ranks other than 0."""
        settings = config.tracking.mlflow if main_rank else None
        return cls(settings, config.job, attempt=attempt, output_dir=Path(config.output.dir))

    @property
    def active(self) -> bool:
        """Set up and still logging."""
        return self._status is not None and self._status["state"] == "ok"

    def status(self) -> messages.TrackingStatus | None:
        """What the reports and the termination summary carry (`messages.TrackingStatus`); None when off."""
        with self._lock:
            return dict(self._status) if self._status is not None else None  # type: ignore[return-value]

    def start(self, params: Mapping[str, str]) -> None:
        """Find or create the experiment, continue this output's run or create one, log params and tags.
        Synchronous (a few requests, each at most `REQUEST_TIMEOUT_SECONDS`); never raises."""
        if self.settings is None or self.client is None:
            return
        experiment = self.settings.experiment or self.job.namespace or "Default"
        try:
            info = self._continued_run(experiment)
            if info is None:
                experiment_id = self.client.experiment_id(experiment)
                info = self.client.create_run(experiment_id, self.settings.run_name or self.job.name or "kubetune",
                                              self._tags())
                self._saved = {"runId": info["run_id"], "experimentId": experiment_id,
                               "trackingUri": self.settings.tracking_uri, "experiment": experiment,
                               "loggedStep": 0, "loggedEvaluationStep": -1, "paramsLogged": False}
                self._write_state()
            else:
                self.client.update_run(info["run_id"], "RUNNING")
                self.client.log_batch(info["run_id"], tags={"kubetune.attempt": str(self.attempt)})
            self._artifact_uri = str(info.get("artifact_uri") or "")
            if not self._saved.get("paramsLogged"):
                items = list(params.items())
                for first in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    self.client.log_batch(self._saved["runId"], params=dict(items[first:first + MAX_PARAMS_PER_BATCH]))
                self._saved["paramsLogged"] = True
                self._write_state()
        except (TrackingError, KeyError, TypeError) as error:
            self._unavailable(error)
            return
        with self._lock:
            self._status = {"state": "ok", "runId": self._saved["runId"], "experimentId": self._saved["experimentId"],
                            "url": self._run_url(), "message": f"logging to experiment {experiment!r} at "
                                                             f"{self.settings.tracking_uri}"}
        self._queued_step = int(self._saved.get("loggedStep", 0))
        self._queued_evaluation = int(self._saved.get("loggedEvaluationStep", -1))
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-tracking", daemon=True)
        self._sender.start()

    def _continued_run(self, experiment: str) -> dict[str, Any] | None:
        """The run an earlier attempt of this output created on the same server and experiment, if it still
        exists there; None: make a new one."""
        assert self.settings is not None and self.client is not None
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("trackingUri") != self.settings.tracking_uri \
                or saved.get("experiment") != experiment or not saved.get("runId"):
            return None
        try:
            info = self.client.get_run(str(saved["runId"]))
        except TrackingError as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(error):
                raise
            return None
        if info.get("lifecycle_stage") == "deleted":
            return None
        self._saved = saved
        log.info("continuing MLflow run %s of experiment %r", saved["runId"], experiment)
        return info

    def _tags(self) -> dict[str, str]:
        return {"kubetune.job.namespace": self.job.namespace, "kubetune.job.name": self.job.name,
                "kubetune.job.uid": self.job.uid, "kubetune.attempt": str(self.attempt),
                "mlflow.source.name": "kubetune.trainer", "mlflow.source.type": "JOB"}

    def _run_url(self) -> str:
        assert self.settings is not None
        return (f"{self.settings.tracking_uri.rstrip('/')}/#/experiments/{self._saved['experimentId']}"
                f"/runs/{self._saved['runId']}")

    def follow(self, train_state: Any) -> None:
        """Read every step's loss and every evaluation from the trainer's state (`train.TrainState`)."""
        self._train_state = train_state

    def observe(self, report: Mapping[str, Any]) -> None:
        """A report was sent (`reporting.Reporter` observer): queue the steps' losses and evaluations
        since the last one, and the learning rate. Never blocks."""
        if not self.active or self._train_state is None:
            return
        metrics, cursor = self._new_metrics()
        step = int(report.get("step") or 0)
        rate = _metric("learningRate", report.get("learningRate"), step)
        if rate is not None and step > self._rate_step:  # several reports may name one step
            metrics.append(rate)
            self._rate_step = step
        self._queue(metrics, cursor)

    def _new_metrics(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Metrics of the steps and evaluations not queued yet (on resume: not logged by an earlier attempt)."""
        state = self._train_state
        metrics = [m for step, loss in state.train_losses if step > self._queued_step
                   if (m := _metric("trainLoss", loss, step)) is not None]
        for evaluation in state.evaluations:
            if evaluation["step"] > self._queued_evaluation:
                metrics += [m for k, v in evaluation.items() if k != "step"
                            if (m := _metric(k, v, evaluation["step"])) is not None]
        if state.train_losses:
            self._queued_step = max(self._queued_step, int(state.train_losses[-1][0]))
        if state.evaluations:
            self._queued_evaluation = max(self._queued_evaluation, int(state.evaluations[-1]["step"]))
        return metrics, {"loggedStep": self._queued_step, "loggedEvaluationStep": self._queued_evaluation}

    def _queue(self, metrics: list[dict[str, Any]], cursor: dict[str, int]) -> None:
        for first in range(0, max(1, len(metrics)), MAX_METRICS_PER_BATCH):
            batch = metrics[first:first + MAX_METRICS_PER_BATCH]
            try:
                self._outbox.put_nowait((batch, cursor))
            except queue.Full:
                self._unavailable(TrackingError(f"the server is too slow: more than {MAX_PENDING_BATCHES} metric "
                                                "batches waiting"))
                return

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            batch, cursor = item
            if self.active:
                try:
                    if batch:
                        self.client.log_batch(self._saved["runId"], metrics=batch)  # type: ignore[union-attr]
                    self._saved.update(cursor)
                    self._write_state()
                except TrackingError as error:
                    self._unavailable(error)

    def _drain(self) -> None:
        """Let the sender send what is queued (at most `CLOSE_TIMEOUT_SECONDS`) and stop it."""
        if self._sender is None:
            return
        try:
            self._outbox.put(None, timeout=CLOSE_TIMEOUT_SECONDS)
        except queue.Full:
            self._unavailable(TrackingError("the server is too slow: queued metrics were dropped"))
        self._sender.join(CLOSE_TIMEOUT_SECONDS)
        if self._sender.is_alive():
            self._unavailable(TrackingError(f"queued metrics were not sent within {CLOSE_TIMEOUT_SECONDS:.0f} s"))
        self._sender = None

    def finish(self, metrics: Mapping[str, Any], output_dir: Path) -> None:
        """The run succeeded: the last steps, the test results, the artifacts, status FINISHED."""
        if not self.active:
            self._drain()
            return
        new, cursor = self._new_metrics() if self._train_state is not None else ([], {})
        self._queue(new + result_metrics(metrics.get("results") or {}, int(metrics.get("step") or 0)), cursor)
        self._drain()
        if not self.active:
            return
        run_id = self._saved["runId"]
        try:
            for name in ARTIFACTS:
                path = output_dir / name
                if path.is_file():
                    self.client.upload_artifact(self._artifact_uri, name, path.read_bytes(),  # type: ignore[union-attr]
                                                "image/png" if name.endswith(".png") else "application/octet-stream")
            history = metrics.get("history") or {}
            csv = loss_curve_csv(history.get("trainLoss") or [], history.get("evaluations") or [])
            self.client.upload_artifact(self._artifact_uri, "loss_curve.csv", csv, "text/csv")  # type: ignore[union-attr]
            self.client.update_run(run_id, "FINISHED")  # type: ignore[union-attr]
        except TrackingError as error:
            self._unavailable(error)
            return
        with self._lock:
            if self._status is not None:
                self._status["message"] = f"run {run_id} finished at {self.settings.tracking_uri}"  # type: ignore[union-attr]

    def end(self, status: str) -> None:
        """The attempt stops without a model: FAILED (an error), or KILLED (preempted: a retry continues the
        run and sets it RUNNING again). Never raises."""
        if self._train_state is not None and self.active:
            self._queue(*self._new_metrics())
        self._drain()
        if not self.active:
            return
        try:
            self.client.update_run(self._saved["runId"], status)  # type: ignore[union-attr]
        except TrackingError as error:
            self._unavailable(error)

    def _unavailable(self, error: Exception) -> None:
        """Stop logging for this attempt and say why, naming the server (never credentials: the URI has none)."""
        uri = self.settings.tracking_uri if self.settings else ""
        with self._lock:
            if self._status is not None and self._status["state"] == "unavailable":
                return
            message = f"MLflow tracking server {uri} unavailable: {error}; training goes on without tracking"
            status: messages.TrackingStatus = {"state": "unavailable", "message": message[:1000]}
            if self._saved.get("runId"):
                status["runId"] = str(self._saved["runId"])
                status["experimentId"] = str(self._saved["experimentId"])
            self._status = status
        log.warning("%s", message)

    def _write_state(self) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.state_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(self._saved, indent=2))
            temporary.replace(self.state_file)
        except OSError as error:  # a resume then makes a second run: worth a warning, not a failure
            log.warning("cannot write %s: %s", self.state_file, error)
