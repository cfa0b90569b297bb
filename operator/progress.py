"""The operator's HTTP server: progress reports from trainer pods, and Prometheus metrics.

- `POST /v1/reports`: a trainer's JSON report (see `reports` for what is
  accepted). Answers 202 when accepted, 4xx naming the problem otherwise.
  Status writes are throttled per job (`status_write_interval`); a write that
  is not due yet is merged and flushed later; `completed`/`failed` flush at once.
- `GET /metrics`: the operator's Prometheus series.
- `GET /healthz`: liveness.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetune.operator import metrics as metrics_module
from kubetune.operator import reports
from kubetune.operator.reports import ReportError
from kubetune.operator.settings import OperatorSettings

Body = dict[str, Any]
log = logging.getLogger(__name__)

GetJob = Callable[[str, str], Awaitable[Body | None]]
"""Reads a FineTuneJob (namespace, name); None when absent."""
PatchStatus = Callable[[str, str, Body], Awaitable[None]]
"""Merge-patches a FineTuneJob's status."""


@dataclasses.dataclass
class _JobState:
    key: reports.JobKey
    status: Body
    """progress/metrics/checkpoints/results/model as last merged."""
    dirty: bool = False
    flush: asyncio.TimerHandle | None = None


class ProgressService:
    """Accepts reports, keeps the latest per job, writes status at a bounded rate."""

    def __init__(self, settings: OperatorSettings, metrics: metrics_module.OperatorMetrics,
                 get_job: GetJob, patch_status: PatchStatus) -> None:
        self.settings = settings
        self.metrics = metrics
        self.get_job = get_job
        self.patch_status = patch_status
        self.guard = reports.ReplayGuard()
        self.throttle = reports.WriteThrottle(settings.status_write_interval)
        self.jobs: dict[str, _JobState] = {}
        self._lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_report_bytes + 1)
        app.router.add_post("/v1/reports", self.handle_report)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_health)
        return app

    async def handle_health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def handle_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": metrics_module.CONTENT_TYPE})

    async def handle_report(self, request: web.Request) -> web.Response:
        try:
            raw = await self._read_body(request)
            report = reports.parse_report(raw, self.settings.max_report_bytes)
            reports.authenticate(self.settings.secret_key, request.headers.get("Authorization"), report.job)
            await self.accept(report)
        except ReportError as error:
            self.metrics.report_rejected(error.reason)
            log.info("rejected a progress report (%s): %s", error.reason, error)
            return web.json_response({"error": error.reason, "message": str(error)}, status=error.status)
        self.metrics.report_accepted()
        return web.json_response({"accepted": True}, status=202)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_report_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ReportError(413, "TooLarge", f"report is {request.content_length} bytes; at most {limit} allowed")
        raw = await request.content.read(limit + 1)
        if len(raw) > limit:
            raise ReportError(413, "TooLarge", f"report is over {limit} bytes")
        return raw

    async def accept(self, report: reports.Report) -> None:
        """Record an authenticated report: replay check, metrics, status (throttled)."""
        async with self._lock:
            state = await self._state_for(report.job)
            self.guard.check(report)
            self.guard.record(report)
            values: dict[str, object] = dict(report.body)
            self.metrics.observe_report(report.job.namespace, report.job.name, report.attempt, values)
            state.status = {**state.status, **reports.merge_report(
                state.status, report, recent_checkpoints=self.settings.recent_checkpoints)}
            state.dirty = True
            now = time.monotonic()
            uid = report.job.uid
            if self.throttle.due(uid, now, terminal=report.terminal):
                await self._write(state)
            elif state.flush is None:
                delay = self.throttle.wait_seconds(uid, now)
                state.flush = asyncio.get_running_loop().call_later(
                    delay, lambda: asyncio.ensure_future(self._flush(uid)))

    async def _state_for(self, key: reports.JobKey) -> _JobState:
        state = self.jobs.get(key.uid)
        if state is not None:
            return state
        job = await self.get_job(key.namespace, key.name)
        if job is None or (job.get("metadata") or {}).get("uid") != key.uid:
            raise ReportError(404, "UnknownJob", f"no FineTuneJob {key.signed_text()}")
        status = job.get("status") or {}
        seed = {k: status[k] for k in ("progress", "metrics", "checkpoints", "results", "model", "resolved")
                if k in status}
        state = _JobState(key=key, status=seed)
        self.jobs[key.uid] = state
        return state

    async def _flush(self, uid: str) -> None:
        async with self._lock:
            state = self.jobs.get(uid)
            if state is not None:
                state.flush = None
                if state.dirty:
                    await self._write(state)

    async def _write(self, state: _JobState) -> None:
        if state.flush is not None:
            state.flush.cancel()
            state.flush = None
        self.throttle.wrote(state.key.uid, time.monotonic())
        state.dirty = False
        try:
            await self.patch_status(state.key.namespace, state.key.name, dict(state.status))
        except Exception:  # the next report or flush writes again; reports must never 5xx on this
            state.dirty = True
            log.exception("could not write the status of %s", state.key.signed_text())

    def forget(self, uid: str) -> None:
        """Drop a deleted job's state."""
        state = self.jobs.pop(uid, None)
        if state is not None and state.flush is not None:
            state.flush.cancel()
        self.guard.forget(uid)


class HttpServer:
    """Runs a ProgressService's app on the settings' host and port."""

    def __init__(self, service: ProgressService) -> None:
        self.service = service
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.service.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.service.settings.http_host, self.service.settings.http_port)
        await site.start()
        server = site._server  # the bound port, when 0 asked for a free one
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.service.settings.http_port
        log.info("progress and metrics server listening on %s:%s", self.service.settings.http_host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
