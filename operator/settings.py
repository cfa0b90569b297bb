"""Operator settings: one dataclass, read from the environment at start-up.

Every field has a `KUBETUNE_*` environment variable (named in its docstring).
The defaults suit a cluster install by the Helm chart; tests override them.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Mapping


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty = the whole cluster. `KUBETUNE_NAMESPACES`, comma-separated."""
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Image of the trainer pods (the Dockerfile's `trainer` target). `KUBETUNE_TRAINER_IMAGE`."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of trainer pods. `KUBETUNE_IMAGE_PULL_POLICY`."""
    progress_url: str = ""
    """URL trainer pods POST progress reports to, e.g. `http://kubetune-operator.kubetune:8080/v1/reports`;
    empty = pods push nothing and the operator finishes the status from termination messages.
    `KUBETUNE_PROGRESS_URL`."""
    secret_key: bytes = b""
    """Key that signs per-job progress tokens (HMAC-SHA256). Must be set for the progress endpoint to
    accept anything; keep it in a Secret. `KUBETUNE_SECRET_KEY`."""
    http_host: str = "0.0.0.0"
    """Address the progress and metrics server binds to. `KUBETUNE_HTTP_HOST`."""
    http_port: int = 8080
    """Port of the progress-report server (`/v1/reports`, `/healthz`); 0 = pick a free one.
    `KUBETUNE_HTTP_PORT`."""
    metrics_port: int = 8081
    """Port of the Prometheus server (`/metrics`, `/healthz`), always plain HTTP. Separate from the
    report port because the series name every tenant's jobs: a NetworkPolicy can open this port to the
    monitoring namespace only while trainer pods reach the report port. 0 = pick a free one.
    `KUBETUNE_METRICS_PORT`."""
    tls_cert_file: str = ""
    """PEM certificate (chain) the report port serves HTTPS with; empty = plain HTTP (local mode, tests).
    The chart generates one for the Service's DNS names. `KUBETUNE_TLS_CERT_FILE`."""
    tls_key_file: str = ""
    """PEM private key of `tls_cert_file`. `KUBETUNE_TLS_KEY_FILE`."""
    progress_ca: str = ""
    """PEM of the CA that issued the report port's certificate; given to trainer pods
    (`KUBETUNE_PROGRESS_CA`) so they verify the endpoint before sending their token. Empty = pods use
    the system's trust store. `KUBETUNE_PROGRESS_CA`."""
    report_rate: float = 20.0
    """Progress reports per second one job may send on average (a trainer sends a few); more get
    HTTP 429 with Retry-After. 0 = no limit. `KUBETUNE_REPORT_RATE`."""
    report_burst: int = 100
    """Progress reports one job may send at once before `report_rate` applies. `KUBETUNE_REPORT_BURST`."""
    resync_seconds: float = 30.0
    """Interval of the timer that re-runs reconcile for every job (seconds). Child events trigger
    reconcile at once, so this only bounds how stale a missed event can leave a status.
    `KUBETUNE_RESYNC_SECONDS`."""
    worker_limit: int = 64
    """Objects of one kind kopf works on at once (its per-object workers; the reconciles themselves run
    on 8 threads). Events for other objects wait in the watch stream meanwhile. Without a limit, an
    operator starting among thousands of FineTuneJobs starts a worker, with its own copies of the body,
    for every one of them at once: 842 MiB resident with 2,000 finished jobs, 233 MiB with a limit
    (`bench/operator_scale.py --finished`). A worker leaves 0.5 s after its object's last event.
    0 = no limit. `KUBETUNE_WORKER_LIMIT`."""
    reconcile_threads: int = 8
    """Threads in each of two pools: the operator's, where every FineTuneJob reconcile runs (asked for by
    kopf's FineTuneJob events and the informers' child events; each waits on the API server for its
    writes), and kopf's, for its handlers (sweeps, and the FineTuneJob event handler that only queues a
    reconcile). The API client keeps twice as many connections, plus 4. `KUBETUNE_RECONCILE_THREADS`."""
    status_write_interval: float = 2.0
    """At most one status write per job per this many seconds from progress reports; terminal
    reports (`completed`, `failed`) are always written at once. `KUBETUNE_STATUS_WRITE_INTERVAL`."""
    max_report_bytes: int = 64 * 1024
    """Progress reports larger than this are rejected with 413 (bytes). `KUBETUNE_MAX_REPORT_BYTES`."""
    recent_checkpoints: int = 5
    """How many recent checkpoints `status.checkpoints` keeps. `KUBETUNE_RECENT_CHECKPOINTS`."""
    validation_cpu: str = "500m"
    """CPU request of the dataset-validation pod (it holds no GPU). `KUBETUNE_VALIDATION_CPU`."""
    validation_memory: str = "1Gi"
    """Memory request and limit of the dataset-validation pod. `KUBETUNE_VALIDATION_MEMORY`."""
    peering_name: str = "kubetune"
    """kopf peering object name: a second operator copy with the same name pauses. `KUBETUNE_PEERING`."""
    peering_priority: int = 0
    """kopf peering priority of this replica: of the live copies with one peering name, only the highest
    works; the others stand by and take over once its peering record expires (kopf's 60 s lifetime).
    Copies of equal priority both keep working (kopf only warns), so replicas of one Deployment use
    `random`: a random priority drawn at start. `KUBETUNE_PEERING_PRIORITY`, an integer or `random`."""
    peering_lifetime: int = 60
    """Seconds a replica's peering record stays valid without renewal (kopf renews it every few seconds):
    how long a standby waits before it takes over from an active replica that died without a goodbye
    (SIGKILL, a lost node); a clean shutdown hands over at once. `KUBETUNE_PEERING_LIFETIME`."""
    cache: bool = True
    """Serve reconcile's reads from watch-fed memory (`operator/cache.py`) instead of GETs per pass.
    `false` = read the API server every pass, as before (for comparisons). `KUBETUNE_CACHE`."""
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    """Image of `runtime: vllm` serving pods (the vLLM OpenAI-compatible server), pinned so an
    operator version always serves with the vLLM it was tested with. `KUBETUNE_VLLM_IMAGE`."""
    cluster_domain: str = "cluster.local"
    """DNS domain of the cluster, for `status.endpoint`
    (`http://<service>.<namespace>.svc.<domain>:8000`). `KUBETUNE_CLUSTER_DOMAIN`."""
    policy_file: str = ""
    """YAML file with the platform policy (per-namespace quotas, allowed model sources and
    images; see docs/operator.md); empty = no limits. `KUBETUNE_POLICY_FILE`."""
    secret_key_secret: str = ""
    """`<namespace>/<name>` of the Secret holding the signing key (under `secret-key`), used when
    `secret_key` is empty: the operator creates it with a random key when absent and reuses it
    after, so no deploy tool (Argo CD renders without Helm's `lookup`) can rotate it by accident.
    `KUBETUNE_SECRET_KEY_SECRET`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from `KUBETUNE_*` variables (default: os.environ); unknown values raise SettingsError."""
        source = os.environ if env is None else env
        defaults = cls()

        def text(key: str, default: str) -> str:
            return source.get(key, default).strip()

        def number(key: str, default: float, kind: type[float] | type[int]) -> float:
            raw = source.get(key)
            if raw is None or not raw.strip():
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{key}: must be a number, got {raw!r}") from None
            if value < 0:
                raise SettingsError(f"{key}: must be >= 0, got {raw!r}")
            return value

        if bool(text("KUBETUNE_TLS_CERT_FILE", "")) != bool(text("KUBETUNE_TLS_KEY_FILE", "")):
            raise SettingsError("KUBETUNE_TLS_CERT_FILE and KUBETUNE_TLS_KEY_FILE: set both (HTTPS) or neither "
                                "(plain HTTP)")
        ports = [text(key, str(default)) for key, default in (("KUBETUNE_HTTP_PORT", defaults.http_port),
                                                               ("KUBETUNE_METRICS_PORT", defaults.metrics_port))]
        if ports[0] == ports[1] and ports[0] not in ("", "0"):
            raise SettingsError(f"KUBETUNE_METRICS_PORT: must differ from KUBETUNE_HTTP_PORT ({ports[0]}); "
                                f"metrics are served on a port of their own")
        namespaces = tuple(n.strip() for n in text("KUBETUNE_NAMESPACES", "").split(",") if n.strip())
        raw_priority = text("KUBETUNE_PEERING_PRIORITY", "0")
        if raw_priority == "random":
            priority = secrets.randbelow(2**31 - 1) + 1
        else:
            try:
                priority = int(raw_priority or "0")
            except ValueError:
                raise SettingsError(f"KUBETUNE_PEERING_PRIORITY: must be an integer or 'random', "
                                    f"got {raw_priority!r}") from None
        raw_cache = text("KUBETUNE_CACHE", "true").lower()
        if raw_cache not in ("true", "false", "1", "0", "yes", "no"):
            raise SettingsError(f"KUBETUNE_CACHE: must be true or false, got {raw_cache!r}")
        return cls(
            namespaces=namespaces,
            trainer_image=text("KUBETUNE_TRAINER_IMAGE", defaults.trainer_image),
            image_pull_policy=text("KUBETUNE_IMAGE_PULL_POLICY", defaults.image_pull_policy),
            progress_url=text("KUBETUNE_PROGRESS_URL", defaults.progress_url),
            secret_key=text("KUBETUNE_SECRET_KEY", "").encode(),
            http_host=text("KUBETUNE_HTTP_HOST", defaults.http_host),
            http_port=int(number("KUBETUNE_HTTP_PORT", defaults.http_port, int)),
            metrics_port=int(number("KUBETUNE_METRICS_PORT", defaults.metrics_port, int)),
            tls_cert_file=text("KUBETUNE_TLS_CERT_FILE", defaults.tls_cert_file),
            tls_key_file=text("KUBETUNE_TLS_KEY_FILE", defaults.tls_key_file),
            progress_ca=text("KUBETUNE_PROGRESS_CA", defaults.progress_ca),
            report_rate=float(number("KUBETUNE_REPORT_RATE", defaults.report_rate, float)),
            report_burst=int(number("KUBETUNE_REPORT_BURST", defaults.report_burst, int)),
            resync_seconds=float(number("KUBETUNE_RESYNC_SECONDS", defaults.resync_seconds, float)),
            worker_limit=int(number("KUBETUNE_WORKER_LIMIT", defaults.worker_limit, int)),
            reconcile_threads=max(1, int(number("KUBETUNE_RECONCILE_THREADS", defaults.reconcile_threads, int))),
            status_write_interval=float(
                number("KUBETUNE_STATUS_WRITE_INTERVAL", defaults.status_write_interval, float)),
            max_report_bytes=int(number("KUBETUNE_MAX_REPORT_BYTES", defaults.max_report_bytes, int)),
            recent_checkpoints=int(number("KUBETUNE_RECENT_CHECKPOINTS", defaults.recent_checkpoints, int)),
            validation_cpu=text("KUBETUNE_VALIDATION_CPU", defaults.validation_cpu),
            validation_memory=text("KUBETUNE_VALIDATION_MEMORY", defaults.validation_memory),
            peering_name=text("KUBETUNE_PEERING", defaults.peering_name),
            peering_priority=priority,
            peering_lifetime=int(number("KUBETUNE_PEERING_LIFETIME", defaults.peering_lifetime, int)) or 1,
            cache=raw_cache in ("true", "1", "yes"),
            vllm_image=text("KUBETUNE_VLLM_IMAGE", defaults.vllm_image),
            cluster_domain=text("KUBETUNE_CLUSTER_DOMAIN", defaults.cluster_domain).strip("."),
            policy_file=text("KUBETUNE_POLICY_FILE", defaults.policy_file),
            secret_key_secret=text("KUBETUNE_SECRET_KEY_SECRET", defaults.secret_key_secret),
        )
