"""The operator's HTTP servers: progress reports from trainer pods, and Prometheus metrics.

The report port (`http_port`; HTTPS when a certificate is configured):

- `POST /v1/reports`: a trainer's JSON report (see `reports` for what is
  accepted and in which order it is checked). Answers 202 when accepted, 4xx
  naming the problem otherwise (429 with Retry-After past the per-job rate).
  Status writes are throttled per job (`status_write_interval`); a write that
  is not due yet is merged and flushed later; `completed`/`failed` flush at once.
- `GET /healthz`: liveness.

The metrics port (`metrics_port`, plain HTTP): `GET /metrics` (the series name
every tenant's jobs, so it is not on the port every trainer pod reaches) and
`GET /healthz`.

Reports of one job are handled one at a time (a lock per job); no lock is
shared between jobs, so a slow API call for one job never holds up another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetune.operator import metrics as metrics_module
from kubetune.operator.progress import reports
from kubetune.operator.progress.reports import ReportError
from kubetune.operator.settings import OperatorSettings

Body = dict[str, Any]
log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 30.0
"""A report body must arrive within this long (a trainer sends a few KiB at once); a sender that
trickles bytes would otherwise hold a connection and its buffer forever."""

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
        self.limiter = reports.RateLimiter(settings.report_rate, settings.report_burst)
        self.jobs: dict[str, _JobState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        """One lock per job uid: its reports and status writes stay in order; other jobs never wait."""

    def app(self) -> web.Application:
        """The report port's routes."""
        app = web.Application(client_max_size=self.settings.max_report_bytes + 1)
        app.router.add_post("/v1/reports", self.handle_report)
        app.router.add_get("/healthz", self.handle_health)
        return app

    def metrics_app(self) -> web.Application:
        """The metrics port's routes."""
        app = web.Application()
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
            body = reports.decode_report(raw, self.settings.max_report_bytes)
            job = reports.report_job(body)
            reports.authenticate(self.settings.secret_key, request.headers.get("Authorization"), job)
            self._check_rate(job)
            await self.accept(reports.validate_report(body, job))
        except ReportError as error:
            self.metrics.report_rejected(error.reason)
            log.info("rejected a progress report (%s): %s", error.reason, error)
            headers = ({"Retry-After": str(max(1, math.ceil(error.retry_after)))}
                       if error.retry_after is not None else None)
            return web.json_response({"error": error.reason, "message": str(error)}, status=error.status,
                                     headers=headers)
        self.metrics.report_accepted()
        return web.json_response({"accepted": True}, status=202)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, up to one byte past the limit: `content.read(n)` returns what has arrived so
        far (a body split across TCP segments comes in pieces), so read until the limit or EOF."""
        limit = self.settings.max_report_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ReportError(413, "TooLarge", f"report is {request.content_length} bytes; at most {limit} allowed")
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                while received <= limit and (chunk := await request.content.read(limit + 1 - received)):
                    chunks.append(chunk)
                    received += len(chunk)
        except TimeoutError:
            raise ReportError(408, "Timeout", f"the report body did not arrive within {READ_TIMEOUT_SECONDS:.0f} s")
        if received > limit:
            raise ReportError(413, "TooLarge", f"report is over {limit} bytes")
        return b"".join(chunks)

    def _check_rate(self, job: reports.JobKey) -> None:
        wait = self.limiter.take(job.uid, time.monotonic())
        if wait > 0:
            raise ReportError(429, "RateLimited",
                              f"job {job.signed_text()} sent more than {self.settings.report_burst} reports at "
                              f"once or {self.settings.report_rate:g} a second; retry in {wait:.1f} s",
                              retry_after=wait)

    def _lock(self, uid: str) -> asyncio.Lock:
        lock = self._locks.get(uid)
        if lock is None:
            lock = self._locks[uid] = asyncio.Lock()
        return lock

    async def accept(self, report: reports.Report) -> None:
        """Record an authenticated report: replay check, metrics, status (throttled)."""
        uid = report.job.uid
        try:
            async with self._lock(uid):
                await self._accept_locked(report)
        finally:
            if uid not in self.jobs:  # an unknown job: keep no lock for it
                self._locks.pop(uid, None)

    async def _accept_locked(self, report: reports.Report) -> None:
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
        seed = {k: status[k] for k in ("progress", "metrics", "checkpoints", "results", "model", "resolved",
                                            "tracking")
                if k in status}
        state = _JobState(key=key, status=seed)
        self.jobs[key.uid] = state
        return state

    async def _flush(self, uid: str) -> None:
        if uid not in self.jobs:
            return
        async with self._lock(uid):
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
        self.limiter.forget(uid)
        self._locks.pop(uid, None)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """HTTPS for the report port: TLS 1.2 or newer, the given certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class HttpServer:
    """Runs a ProgressService: its report app on `http_port` (HTTPS when the settings name a certificate)
    and its metrics app on `metrics_port`, both on `http_host`."""

    def __init__(self, service: ProgressService) -> None:
        self.service = service
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        """The report port, once started (the bound one when 0 was asked for)."""
        self.metrics_port: int | None = None
        """The metrics port, once started."""

    async def start(self) -> None:
        settings = self.service.settings
        tls = server_tls_context(settings.tls_cert_file, settings.tls_key_file) if settings.tls_cert_file else None
        self.port = await self._serve(self.service.app(), settings.http_port, tls)
        self.metrics_port = await self._serve(self.service.metrics_app(), settings.metrics_port, None)
        log.info("progress reports on %s:%s (%s), metrics on %s:%s (http)", settings.http_host, self.port,
                 "https" if tls else "http", settings.http_host, self.metrics_port)

    async def _serve(self, app: web.Application, port: int, tls: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.service.settings.http_host, port, ssl_context=tls)
        await site.start()
        server = site._server  # the bound port, when 0 asked for a free one
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()
