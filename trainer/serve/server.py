"""The built-in OpenAI-compatible model server: `python -m kubetune.trainer.serve --model DIR`.

Endpoints:

- `POST /v1/completions`, `POST /v1/chat/completions` (prompt rendered with the
  model's chat template); `stream: true` answers with server-sent events in
  OpenAI's chunk format, ending with `data: [DONE]`;
- `GET /v1/models`, `GET /v1/models/{id}`;
- `GET /healthz` (the process is alive), `GET /readyz` (200 only once the model
  is loaded), `GET /metrics` (Prometheus text format).

The port opens first and the model loads in a background thread, so Kubernetes
sees a live process whose readiness flips when it can serve. Until then the
generation endpoints answer 503.

Concurrency: generation runs on one thread (never on the event loop) that
decodes concurrent requests together in batches of up to `--max-batch-size`
(`serve/batch.py`); each request keeps its own sampling settings and seed.
`--max-concurrency` bounds how many generation requests are admitted at once
(generating + waiting); more get 429, which the `openai` client retries.

Admission before work: the body size is checked from Content-Length before it
is read, and parsing the JSON and tokenising the prompt run on a small thread
pool, not on the event loop, so a 4 MiB prompt never delays `/healthz`.

Authentication: when the environment variable `KUBETUNE_SERVE_API_KEY` is set
(the operator sets it from the job's serving-key Secret), every `/v1/*` request
must carry `Authorization: Bearer <that key>`; others get 401 in OpenAI's error
shape. Probes and `/metrics` stay open (kubelet and Prometheus hold no key).

Errors: every refused request gets an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` with a 4xx status (503 while
loading, 500 with no internals for a bug, which is logged here); the server
keeps serving.

SIGTERM/SIGINT: stop accepting connections, let in-flight requests (streams
included) finish within `--shutdown-timeout`, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from kubetune.trainer.serve import protocol as protocol
from kubetune.trainer.serve.adapters import AdapterConfigError, AdapterEntry, read_adapter_config
from kubetune.trainer.serve.batch import BatchScheduler
from kubetune.trainer.serve.engine import (
    MAIN_ADAPTER,
    AdapterSource,
    ChatTemplateMissing,
    DType,
    Device,
    Engine,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    ModelSource,
    ModelSourceError,
    load_engine,
    resolve_adapter,
    resolve_model_source,
)
from kubetune.trainer.serve.metrics import ServerMetrics
from kubetune.trainer.serve.protocol import ApiError

log = logging.getLogger("kubetune.serve")

EXIT_BAD_ARGUMENTS = 2
"""`--model` (or another option) cannot work; nothing was served."""
EXIT_LOAD_FAILED = 1
"""The model files were found but loading them failed."""
API_KEY_ENV = "KUBETUNE_SERVE_API_KEY"
"""Environment variable with the API key clients must present (unset or empty: no authentication)."""
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted (413 beyond it)."""

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Command-line settings of the server."""

    model: str
    """Model folder, trainer output folder, peft adapter folder or .gguf file."""
    served_model_name: str | None = None
    """Name clients pass as `model`; default: the model folder's (or .gguf file's) name."""
    host: str = "0.0.0.0"
    """Address to listen on; all interfaces by default, as a pod needs."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed on stdout)."""
    max_tokens_limit: int = 512
    """Largest `max_tokens` a request may ask for; bounds the time one request holds the model."""
    max_concurrency: int = 64
    """Generation requests admitted at once (generating or queued); more get 429."""
    max_batch_size: int = 16
    """Most requests decoded together in one batch; more wait for the next batch."""
    batch_window_ms: float = 0.0
    """How long an idle model waits for more requests to start a batch with (milliseconds)."""
    device: Device = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    dtype: DType = "auto"
    """Weights dtype; `auto` = float32 on CPU, bfloat16 (or float16) on GPU."""
    chat_template: str | None = None
    """Path of a Jinja chat template that replaces the tokenizer's."""
    threads: int = 0
    """Torch intra-op threads for generation; 0 = auto (on CPU: usable cores minus one for the event loop)."""
    adapters: tuple[str, ...] = ()
    """More LoRA adapters over the same base, as `NAME=PATH`; a request selects one by `model`."""
    adapter_config: str | None = None
    """A JSON file listing more adapters (`serve/adapters.py`), re-read while serving: adapters are
    added and removed without a restart. The operator mounts it from a ConfigMap."""
    adapter_config_interval: float = 5.0
    """Seconds between two reads of `adapter_config`."""
    shutdown_timeout: float = 60.0
    """Seconds in-flight requests get to finish after SIGTERM before they are cut."""
    api_key: str | None = dataclasses.field(default=None, repr=False)
    """The bearer token `/v1/*` requests must carry; None = no authentication. From the
    environment (`KUBETUNE_SERVE_API_KEY`), never the command line, which other processes can read."""


def parse_args(argv: Sequence[str] | None = None) -> ServeSettings:
    """Parse the command line into `ServeSettings`."""
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.serve", description=__doc__.split("\n")[0])
    defaults = ServeSettings(model="")
    parser.add_argument("--model", required=True, help="model folder, trainer output, peft adapter folder or .gguf file")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: the folder name)")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 = pick a free port")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="most requests decoded together")
    parser.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms,
                        help="how long an idle model waits for companions before starting a batch")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=defaults.dtype)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads for generation (0 = auto: on CPU the usable cores minus one)")
    parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                        help="also serve this LoRA adapter (over the same base model) as model NAME; repeatable")
    parser.add_argument("--adapter-config", default=None, metavar="FILE",
                        help="JSON file listing LoRA adapters to serve, re-read while serving (hot loading)")
    parser.add_argument("--adapter-config-interval", type=float, default=defaults.adapter_config_interval,
                        help="seconds between two reads of --adapter-config")
    parser.add_argument("--chat-template", default=None, help="file with a Jinja chat template to use instead of the tokenizer's")
    parser.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout)
    args = parser.parse_args(argv)
    if args.max_tokens_limit < 1:
        parser.error(f"--max-tokens-limit: must be >= 1, got {args.max_tokens_limit}")
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency: must be >= 1, got {args.max_concurrency}")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size: must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.batch_window_ms <= 1000:
        parser.error(f"--batch-window-ms: must be from 0 to 1000, got {args.batch_window_ms}")
    if not 0.1 <= args.adapter_config_interval <= 3600:
        parser.error(f"--adapter-config-interval: must be from 0.1 to 3600 seconds, got {args.adapter_config_interval}")
    if args.threads < 0:
        parser.error(f"--threads: must be >= 0 (0 = auto), got {args.threads}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be from 0 to 65535, got {args.port}")
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServeSettings) if field.name != "api_key"}
    values["adapters"] = tuple(args.adapters)
    return ServeSettings(**values, api_key=os.environ.get(API_KEY_ENV) or None)


def _sse(payload: object) -> bytes:
    """One server-sent event carrying `payload` as JSON (or the literal [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class ModelServer:
    """The aiohttp application and the state behind it: the engine (once loaded), metrics, admission."""

    def __init__(self, settings: ServeSettings, source: ModelSource, chat_template: str | None = None,
                 adapters: Sequence[AdapterSource] = ()) -> None:
        self.settings = settings
        self.source = source
        self.model_name = settings.served_model_name or source.default_name
        """The main model's name (what `--model` loads); requests without `model` get it."""
        # The main adapter stays unmerged (and is selected by name) when others share its base.
        unmerged = bool(source.adapter_dir and (adapters or settings.adapter_config))
        self.routes: dict[str, str | None] = {self.model_name: MAIN_ADAPTER if unmerged else None}
        """Every servable `model` name -> the LoRA adapter that generates for it (None: the model as loaded)."""
        self.routes |= {adapter.name: adapter.name for adapter in adapters}
        self._adapters = tuple(adapters)
        self.created = protocol.now()
        self.metrics = ServerMetrics()
        self.engine: Engine | None = None
        """Set (on the event loop) once loading finished."""
        self.load_error: str | None = None
        """Why loading failed, if it did."""
        self.draining = False
        """Set on SIGTERM: /readyz turns 503 so no new traffic is routed here."""
        self._chat_template = chat_template
        self._admitted = 0
        self._scheduler: BatchScheduler | None = None
        """Runs generations in batches; created once the model is loaded."""
        self._dynamic: dict[str, AdapterEntry] = {}
        """Adapters loaded from --adapter-config (routed under their own names)."""
        self._adapter_problems: dict[str, str] = {}
        """The last problem logged per --adapter-config entry ("" for the file), so each is logged once."""
        self._watcher: asyncio.Task[None] | None = None
        self._waker: _LoopWaker | None = None
        """Wakes streaming handlers from the generation thread; created with the first stream."""
        # Parsing and tokenising big bodies happen here, off the event loop (probes stay fast).
        self._prepare = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")

    # --- lifecycle -------------------------------------------------------------

    def start_loading(self, loop: asyncio.AbstractEventLoop, on_failure: Callable[[], None]) -> None:
        """Load the model in a daemon thread (a SIGTERM during a long load need not wait for it)."""

        def load() -> None:
            try:
                engine = load_engine(self.source, device=self.settings.device, dtype=self.settings.dtype,
                                     chat_template=self._chat_template, adapters=self._adapters,
                                     threads=self.settings.threads,
                                     unmerged=self.settings.adapter_config is not None)
            except Exception as error:  # noqa: BLE001 - any failure to load is reported the same way
                log.exception("loading the model failed")
                message = f"{type(error).__name__}: {error}"
                loop.call_soon_threadsafe(self._loading_failed, message, on_failure)
                return
            loop.call_soon_threadsafe(self._loaded, engine)

        threading.Thread(target=load, name="load-model", daemon=True).start()

    def _loaded(self, engine: Engine) -> None:
        self._scheduler = BatchScheduler(engine, max_batch_size=self.settings.max_batch_size,
                                         window=self.settings.batch_window_ms / 1000,
                                         on_step=self.metrics.batch_size.observe)
        if self.settings.adapter_config is not None:
            # Ready only once the listed adapters are loaded: a new replica answers for all of them.
            self._watcher = asyncio.ensure_future(self._watch_adapter_config(engine))
            return
        self._ready(engine)

    def _ready(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics.model_loaded.set(1)
        log.info("model %r ready on %s (context length %s)", self.model_name, engine.device, engine.context_length)

    def _loading_failed(self, message: str, on_failure: Callable[[], None]) -> None:
        self.load_error = message
        on_failure()

    # --- adapters loaded while serving ----------------------------------------

    async def _watch_adapter_config(self, engine: Engine) -> None:
        """Apply --adapter-config now, report ready, then re-apply it every interval."""
        await self.sync_adapter_config(engine)
        self._ready(engine)
        while True:
            await asyncio.sleep(self.settings.adapter_config_interval)
            try:
                await self.sync_adapter_config(engine)
            except Exception:  # noqa: BLE001 - keep serving what is loaded; the next read retries
                log.exception("applying --adapter-config failed")

    async def sync_adapter_config(self, engine: Engine) -> None:
        """Load, reload and unload adapters so the served ones are what the file lists.

        A route is removed before its adapter is unloaded and added only after it is loaded, so no
        request is ever routed to an adapter that is not there. An entry that cannot be served is
        logged (once per distinct problem) and retried at the next read: its files may not exist yet.
        """
        assert self._scheduler is not None and self.settings.adapter_config is not None
        scheduler = self._scheduler
        try:
            wanted = await self._off_loop(read_adapter_config, Path(self.settings.adapter_config))
        except AdapterConfigError as error:
            self._adapter_problem("", str(error))
            return
        self._adapter_problems.pop("", None)
        for name, entry in list(self._dynamic.items()):
            if wanted.get(name) != entry:
                self.routes.pop(name, None)
                del self._dynamic[name]
                await asyncio.wrap_future(scheduler.call(lambda n=name: engine.remove_adapter(n)))
        for name, entry in wanted.items():
            if name in self._dynamic:
                continue
            try:
                if name in self.routes:
                    raise ModelSourceError(f"the name {name!r} is already served (by --model or --adapter)")
                adapter = await self._off_loop(resolve_adapter, f"{name}={entry.path}", self.source)
                await asyncio.wrap_future(scheduler.call(lambda a=adapter: engine.add_adapter(a)))
            except Exception as error:  # noqa: BLE001 - one bad entry must not stop the others
                self._adapter_problem(name, f"--adapter-config entry {name!r} ({entry.path}) is not served: {error}")
                continue
            self._adapter_problems.pop(name, None)
            self._dynamic[name] = entry
            self.routes[name] = name

    def _adapter_problem(self, key: str, message: str) -> None:
        if self._adapter_problems.get(key) != message:
            self._adapter_problems[key] = message
            log.error("%s", message)

    def stop_watching(self) -> None:
        """Stop re-reading --adapter-config (shutdown)."""
        if self._watcher is not None:
            self._watcher.cancel()

    def close(self) -> None:
        """Wait for the generation thread (after the HTTP server stopped)."""
        if self._scheduler is not None:
            self._scheduler.close()
        self._prepare.shutdown(wait=True)

    def app(self) -> web.Application:
        """The aiohttp application with all routes."""
        app = web.Application(middlewares=[self._errors_and_metrics], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    # --- middleware ------------------------------------------------------------

    @web.middleware
    async def _errors_and_metrics(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Turn every failure into an OpenAI-style error body, and count every answer."""
        started = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        status = 500
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            response = await handler(request)
            status = response.status
            return response
        except ApiError as error:
            status = error.status
            headers = {"WWW-Authenticate": 'Bearer realm="kubetune"'} if error.status == 401 else None
            return web.json_response(error.body(), status=error.status, headers=headers)
        except web.HTTPException as error:
            # Router and body-size errors (404 unknown path, 405, 413), in the same error shape.
            status = error.status
            message = f"{request.method} {request.path}: {error.reason}"
            if error.status == 405:
                message += f"; allowed: {error.headers.get('Allow', '')}"
            code = error.reason.lower().replace(" ", "_")
            return web.json_response(protocol.error_body(message, code=code), status=error.status)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            body = protocol.error_body("Internal server error; details are in the server log", error_type="server_error")
            return web.json_response(body, status=500)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _authenticate(self, request: web.Request) -> None:
        """401 unless the request carries the server's API key as a bearer token (when it has one)."""
        expected = self.settings.api_key
        if expected is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "Missing API key: send the header 'Authorization: Bearer <key>' (the api-key entry of "
                           "the job's <job>-serving-key Secret)", code="missing_api_key")  # fmt: skip
        if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    # --- probes and metadata ---------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 once the model is loaded (and not shutting down)."""
        if self.engine is not None and not self.draining:
            return web.json_response({"status": "ready", "model": self.model_name})
        state = "draining" if self.draining else ("failed" if self.load_error else "loading")
        return web.json_response({"status": state, "model": self.model_name}, status=503)

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus metrics of this server."""
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`."""
        return web.json_response(protocol.models_body(list(self.routes), self.created))

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`."""
        self._check_model_name(request.match_info["model"])
        return web.json_response(protocol.model_body(request.match_info["model"], self.created))

    # --- generation endpoints --------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`."""
        engine = self._ready_engine()
        body = await self._json_body(request)
        parsed = protocol.parse_completion_request(body, max_tokens_limit=self.settings.max_tokens_limit)
        name, adapter = self._route(body)
        if isinstance(parsed.prompt, str):
            self._check_prompt_chars(len(parsed.prompt), engine, "prompt")
            prompt_ids = await self._off_loop(engine.encode_prompt, parsed.prompt)
            prompt_text = parsed.prompt
        else:
            self._check_prompt_tokens(len(parsed.prompt), engine)
            self._check_token_ids(parsed.prompt, engine)
            prompt_ids = list(parsed.prompt)
            prompt_text = await self._off_loop(engine.decode, prompt_ids) if parsed.echo else ""
        params = self._generation_params(parsed.sampling, len(prompt_ids), engine, "prompt", protocol.DEFAULT_COMPLETION_MAX_TOKENS)
        echo = prompt_text if parsed.echo else ""
        response_id, created = protocol.new_completion_id("cmpl"), protocol.now()

        async with self._admission():
            if not parsed.stream:
                result = await self._generate(engine, prompt_ids, params, adapter)
                usage = protocol.Usage(len(prompt_ids), result.completion_tokens)
                body_out = protocol.completion_body(
                    response_id, created, name, echo + result.text, result.finish_reason, usage
                )
                return web.json_response(body_out)

            def piece(text: str) -> dict[str, Any]:
                return protocol.completion_chunk(response_id, created, name, text)

            def last(result: GenerationResult) -> list[dict[str, Any]]:
                return [protocol.completion_chunk(response_id, created, name, "", result.finish_reason)]

            first = [piece(echo)] if echo else []
            return await self._stream(
                request, engine, prompt_ids, params, first, piece, last, parsed.include_usage, response_id, created, chat=False, model=name, adapter=adapter
            )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        engine = self._ready_engine()
        body = await self._json_body(request)
        parsed = protocol.parse_chat_request(body, max_tokens_limit=self.settings.max_tokens_limit)
        name, adapter = self._route(body)
        self._check_prompt_chars(sum(len(m.content) for m in parsed.messages), engine, "messages")
        try:
            prompt_ids = await self._off_loop(engine.encode_chat, parsed.messages)
        except ChatTemplateMissing as error:
            raise ApiError(400, str(error), param="messages", code="chat_template_missing") from error
        # Chat's default: as much as the limit and the context allow (OpenAI's behaviour).
        params = self._generation_params(parsed.sampling, len(prompt_ids), engine, "messages", None)
        response_id, created = protocol.new_completion_id("chatcmpl"), protocol.now()

        async with self._admission():
            if not parsed.stream:
                result = await self._generate(engine, prompt_ids, params, adapter)
                usage = protocol.Usage(len(prompt_ids), result.completion_tokens)
                return web.json_response(
                    protocol.chat_body(response_id, created, name, result.text, result.finish_reason, usage)
                )

            def piece(text: str) -> dict[str, Any]:
                return protocol.chat_chunk(response_id, created, name, {"content": text})

            def last(result: GenerationResult) -> list[dict[str, Any]]:
                return [protocol.chat_chunk(response_id, created, name, {}, result.finish_reason)]

            first = [protocol.chat_chunk(response_id, created, name, {"role": "assistant", "content": ""})]
            return await self._stream(
                request, engine, prompt_ids, params, first, piece, last, parsed.include_usage, response_id, created, chat=True, model=name, adapter=adapter
            )

    # --- helpers ---------------------------------------------------------------

    def _ready_engine(self) -> Engine:
        if self.engine is None or self.draining:
            state = "shutting down" if self.draining else "still loading"
            raise ApiError(503, f"The model is {state}; retry later (GET /readyz says when it is ready)",
                           code="model_not_ready", error_type="server_error")  # fmt: skip
        return self.engine

    async def _off_loop(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run CPU work proportional to the body's size (JSON, tokenising) on the prepare pool."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, function, *args)

    async def _json_body(self, request: web.Request) -> object:
        # Refuse an oversized body from its announced length, before reading a byte of it.
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body has {request.content_length} bytes; at most {MAX_BODY_BYTES} "
                           "(4 MiB) are accepted", code="request_entity_too_large")  # fmt: skip
        raw = await request.read()
        try:
            body = await self._off_loop(json.loads, raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON: {error}", code="invalid_json") from error
        # The model is checked before the other fields, so a wrong name gets 404 whatever else is wrong.
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
            self._check_model_name(body["model"])
        return body

    def _check_model_name(self, name: str) -> None:
        if name not in self.routes:
            served = ", ".join(f"'{n}'" for n in self.routes)
            raise ApiError(404, f"The model '{name}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")  # fmt: skip

    def _route(self, body: object) -> tuple[str, str | None]:
        """The model name a request asked for (already checked) and the adapter that serves it."""
        name = body.get("model") if isinstance(body, dict) else None
        name = name if isinstance(name, str) and name in self.routes else self.model_name
        return name, self.routes[name]

    @staticmethod
    def _check_prompt_chars(chars: int, engine: Engine, param: str) -> None:
        """Refuse, without tokenising, a prompt too long for the context whatever its tokens.

        No token is longer than the vocabulary's longest, so a text of `chars`
        characters has at least `chars / longest` tokens.
        """
        context = engine.context_length
        if context is None:
            return
        most = context * engine.longest_token_chars
        if chars > most:
            raise ApiError(400, f"The prompt has {chars} characters; this model's context length is {context} tokens, "
                           f"and no token of its vocabulary is longer than {engine.longest_token_chars} characters, "
                           f"so at most {most} characters can fit", param=param, code="context_length_exceeded")  # fmt: skip

    @staticmethod
    def _check_prompt_tokens(count: int, engine: Engine) -> None:
        context = engine.context_length
        if context is not None and count >= context:
            raise ApiError(400, f"The prompt has {count} tokens; this model's context length is {context} tokens, "
                           "which leaves no room for a completion", param="prompt", code="context_length_exceeded")  # fmt: skip

    @staticmethod
    def _check_token_ids(ids: Sequence[int], engine: Engine) -> None:
        bad = [t for t in ids if t >= engine.vocab_size]
        if bad:
            raise protocol.invalid("prompt", f"token ids must be below the vocabulary size {engine.vocab_size}, got {bad[0]}")

    def _generation_params(
        self,
        sampling: protocol.SamplingParams,
        prompt_tokens: int,
        engine: Engine,
        prompt_param: str,
        default_max_tokens: int | None,
    ) -> GenerationParams:
        """Resolve max_tokens against the limit and the model's context length."""
        limit = self.settings.max_tokens_limit
        context = engine.context_length
        room = None if context is None else context - prompt_tokens
        if room is not None and room < 1:
            raise ApiError(400, f"The prompt has {prompt_tokens} tokens; this model's context length is {context} tokens, "
                           "which leaves no room for a completion", param=prompt_param, code="context_length_exceeded")  # fmt: skip
        if sampling.max_tokens is not None:
            max_tokens = sampling.max_tokens
            if room is not None and max_tokens > room:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens "
                    f"and max_tokens asks for {max_tokens} (at most {room} fit)",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        else:
            max_tokens = min(default_max_tokens or limit, limit, room if room is not None else limit)
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=sampling.stop,
            seed=sampling.seed,
        )

    def _admission(self) -> _Admission:
        return _Admission(self)

    def _submit(self, request: GenerationRequest) -> None:
        assert self._scheduler is not None, "the scheduler exists once the engine does"
        self._scheduler.submit(request)

    async def _generate(self, engine: Engine, prompt_ids: list[int], params: GenerationParams,
                        adapter: str | None) -> GenerationResult:
        request = GenerationRequest(prompt_ids, params, adapter=adapter)
        self._submit(request)
        try:
            result = await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            request.cancelled.set()  # the handler was cancelled (shutdown timeout): stop the generation too
            raise
        self._count_tokens(len(prompt_ids), result)
        return result

    def _count_tokens(self, prompt_tokens: int, result: GenerationResult) -> None:
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(result.completion_tokens)

    async def _stream(
        self,
        request: web.Request,
        engine: Engine,
        prompt_ids: list[int],
        params: GenerationParams,
        first: list[dict[str, Any]],
        piece: Callable[[str], dict[str, Any]],
        last: Callable[[GenerationResult], list[dict[str, Any]]],
        include_usage: bool,
        response_id: str,
        created: int,
        *,
        chat: bool,
        model: str,
        adapter: str | None,
    ) -> web.StreamResponse:
        """Run one generation and send its text as server-sent events while it is produced."""
        if self._waker is None:
            self._waker = _LoopWaker(asyncio.get_running_loop())
        pieces = _PieceBuffer(self._waker)
        job = GenerationRequest(prompt_ids, params, pieces.put, adapter=adapter)
        cancelled = job.cancelled
        # The end marker is put from the generation thread after every on_text callback, so it comes last.
        job.future.add_done_callback(lambda _: pieces.put(None))
        self._submit(job)
        generation = asyncio.wrap_future(job.future)

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            for chunk in first:
                await response.write(_sse(chunk))
            finished = False
            while not finished:
                texts = await pieces.take()
                finished = texts[-1] is None
                # The pieces that arrived since the last write: one event each, one write for all.
                events = b"".join(_sse(piece(text)) for text in texts if text is not None)
                if events:
                    await response.write(events)
            try:
                result = await generation
            except Exception:
                log.exception("generation failed while streaming")
                error = protocol.error_body("Internal server error during generation", error_type="server_error")
                await response.write(_sse(error))
                await response.write(_sse("[DONE]"))
                return response
            self._count_tokens(len(prompt_ids), result)
            for chunk in last(result):
                await response.write(_sse(chunk))
            if include_usage:
                usage = protocol.Usage(len(prompt_ids), result.completion_tokens)
                await response.write(_sse(protocol.usage_chunk(response_id, created, model, usage, chat=chat)))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
            return response
        except (ConnectionError, asyncio.CancelledError):
            # The client went away (or shutdown timed out): free the model at the next token.
            cancelled.set()
            raise


class _LoopWaker:
    """Wakes event-loop waiters from the generation thread, with at most one wake-up of the loop pending.

    Every generated token of every streamed row must reach the event loop. A
    `call_soon_threadsafe` per token costs a self-pipe write and a loop
    iteration each (8 streamed rows: 8 per decoding step), and the generation
    thread then waits for the GIL while the loop runs them. Here all the
    tokens produced until the loop gets round to it share one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._due: set[asyncio.Event] = set()
        self._scheduled = False

    def wake(self, event: asyncio.Event) -> None:
        """Set `event` on the loop soon (thread-safe)."""
        with self._lock:
            self._due.add(event)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        with self._lock:
            due, self._due, self._scheduled = self._due, set(), False
        for event in due:
            event.set()


class _PieceBuffer:
    """The text pieces of one stream, put by the generation thread, taken in batches by its handler."""

    def __init__(self, waker: _LoopWaker) -> None:
        self._waker = waker
        self._lock = threading.Lock()
        self._items: list[str | None] = []
        self._ready = asyncio.Event()

    def put(self, text: str | None) -> None:
        """Add a piece (None: the end); thread-safe."""
        with self._lock:
            self._items.append(text)
        self._waker.wake(self._ready)

    async def take(self) -> list[str | None]:
        """Every piece put since the last call, waiting for at least one."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                items, self._items = self._items, []
            if items:
                return items


class _Admission:
    """Counts a generation request in flight; refuses it with 429 when --max-concurrency are already admitted."""

    def __init__(self, server: ModelServer) -> None:
        self._server = server

    async def __aenter__(self) -> None:
        server = self._server
        if server._admitted >= server.settings.max_concurrency:
            raise ApiError(429, f"The server is busy: {server._admitted} requests are in progress "
                           f"(--max-concurrency {server.settings.max_concurrency}); retry later",
                           code="too_many_requests", error_type="rate_limit_error")  # fmt: skip
        server._admitted += 1
        server.metrics.in_flight.inc()

    async def __aexit__(self, *exc: object) -> None:
        self._server._admitted -= 1
        self._server.metrics.in_flight.dec()


def _read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as error:
        raise ModelSourceError(f"--chat-template: cannot read {path}: {error}") from error


async def serve(settings: ServeSettings, source: ModelSource, chat_template: str | None = None,
                adapters: Sequence[AdapterSource] = ()) -> int:
    """Run the server until SIGTERM/SIGINT (exit code 0) or a failed model load (1)."""
    server = ModelServer(settings, source, chat_template, adapters)
    runner = web.AppRunner(server.app(), shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    # One machine-readable line on stdout: tests and scripts started with --port 0 read the port from it.
    print(f"kubetune.serve listening on http://{host}:{port} model={server.model_name}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server.start_loading(loop, stop.set)
    await stop.wait()

    server.draining = True
    server.stop_watching()
    log.info("shutting down: no new connections, waiting for in-flight requests (up to %ss)", settings.shutdown_timeout)
    await runner.cleanup()
    server.close()
    if server.load_error:
        log.error("exiting: the model could not be loaded: %s", server.load_error)
        return EXIT_LOAD_FAILED
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m kubetune.trainer.serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_args(argv)
    try:
        source = resolve_model_source(settings.model)
        adapters = [resolve_adapter(spec, source) for spec in settings.adapters]
        taken = {settings.served_model_name or source.default_name}
        for adapter in adapters:
            if adapter.name in taken:
                raise ModelSourceError(f"--adapter {adapter.name}=...: the name {adapter.name!r} is already served; "
                                       "each model name must be unique")
            taken.add(adapter.name)
        chat_template = _read_chat_template(settings.chat_template)
    except ModelSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    log.info("serving %s as %r", source.describe(), settings.served_model_name or source.default_name)
    code = asyncio.run(serve(settings, source, chat_template, adapters))
    if code == EXIT_LOAD_FAILED:
        # A load that failed inside native code (safetensors, torch) can leave native threads behind
        # whose destructors abort interpreter finalisation ("terminate called without an active
        # exception", exit -6 instead of 1, seen in CI): nothing is left to clean up, leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
