"""Pure manifest builders for a FineTuneJob's children.

Each builder takes the FineTuneJob body (its metadata: name, namespace, uid),
its typed spec (`FineTuneJobSpec`, parsed once by the reconcile, defaults
applied) and what was rendered from it, and returns a plain dict ready for the
API server: deterministic name (see `names`), the recommended
`app.kubernetes.io/*` labels, and an owner reference to the FineTuneJob so that
deleting the job deletes its children.

Pods meet the Pod Security Standards `restricted` profile and run with a
read-only root filesystem; everything that must write (caches, temp files)
writes to an emptyDir at /tmp.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from kubetune.api import process, schema as apischema
from kubetune.api.finetunejob import FineTuneJobSpec, ResourcesSpec
from kubetune.operator import names
from kubetune.operator.jobs import render
from kubetune.operator.platform.policy import NamespaceLimits
from kubetune.operator.settings import OperatorSettings

Body = dict[str, Any]

API_GROUP = "kubetune.io"
API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"

MANAGED_BY = "kubetune-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_CONFIG_HASH = "kubetune.io/config-hash"
ANNOTATION_ATTEMPT = "batch.kubernetes.io/job-index-failure-count"
"""The Job controller counts failed pods of an index here (backoffLimitPerIndex); it is the attempt."""

ANNOTATION_MODEL_DIGEST = "kubetune.io/model-digest"
"""On the serving pod template: a new model digest changes the template, so the Deployment rolls."""
ANNOTATION_SERVING_HASH = "kubetune.io/serving-hash"
"""On the serving Deployment: digest of the manifest the operator last wrote (tells when to replace it)."""

COMPONENT_SERVING = "serving"
COMPONENT_TRAINER = "trainer"
COMPONENT_VALIDATION = "validation"
COMPONENT_CONFIG = "config"
COMPONENT_CREDENTIALS = "credentials"

TRAINER_CONTAINER = "trainer"
VALIDATION_CONTAINER = "validate"
TOKEN_KEY = "token"
"""Key of the progress token in the progress Secret."""
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 1000
VALIDATION_BACKOFF_LIMIT = 2
"""Retries of the validation pod for failures that are not about the data (network blips)."""
TRAINER_GRACE_SECONDS = 300
"""Time a trainer pod gets after SIGTERM to write a checkpoint."""
VALIDATION_DEADLINE_SECONDS = 3600
"""A validation pod that runs longer than this is stopped."""
SCRATCH_VOLUME = "scratch"
CONFIG_VOLUME = "trainer-config"
DEFAULT_LIMITS = NamespaceLimits()
"""Pod defaults (scratch sizeLimit, default requests) when no platform policy applies."""


def selector_labels(job_name: str) -> dict[str, str]:
    """Labels that select every child of one FineTuneJob."""
    return {LABEL_INSTANCE: job_name, LABEL_MANAGED_BY: MANAGED_BY}


def labels(job: Body, component: str) -> dict[str, str]:
    """The recommended labels of a child."""
    return {
        LABEL_NAME: "kubetune",
        LABEL_INSTANCE: job["metadata"]["name"],
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "kubetune",
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def owner_reference(job: Body) -> Body:
    """The controller owner reference to the FineTuneJob (garbage collection deletes children with it)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: Body, name: str, component: str) -> Body:
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": labels(job, component),
        "ownerReferences": [owner_reference(job)],
    }


def config_hash(rendered: render.RenderedConfig) -> str:
    """A short digest of the config content (annotated on Jobs to tell which config they run)."""
    return _digest(rendered.config_json())


@functools.lru_cache(maxsize=256)
def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trainer_configmap(job: Body, rendered: render.RenderedConfig) -> Body:
    """The ConfigMap holding the rendered trainer config."""
    metadata = _metadata(job, names.config_map(job["metadata"]["name"]), COMPONENT_CONFIG)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(rendered)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {render.CONFIG_FILE_NAME: rendered.config_json()},
    }


def progress_secret(job: Body, token: str) -> Body:
    """The Secret with this job's progress-report token (valid only for this job's identity)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(job, names.progress_secret(job["metadata"]["name"]), COMPONENT_CREDENTIALS),
        "stringData": {TOKEN_KEY: token},
    }


# --- pod parts ---------------------------------------------------------------------

def pod_security_context() -> Body:
    """Pod-level settings required by the `restricted` Pod Security level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Body:
    """Container-level settings: `restricted` plus a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def claim_volume_name(claim: str) -> str:
    """Volume name of a mounted PVC (volume names are DNS labels too)."""
    return names.child_name("pvc", claim)[:63]


def scratch_volume(limits: NamespaceLimits) -> Body:
    """The /tmp emptyDir; its sizeLimit makes a pod that fills it get evicted, not the node's disk full."""
    empty_dir: Body = {"sizeLimit": limits.scratch_size_limit} if limits.scratch_size_limit else {}
    return {"name": SCRATCH_VOLUME, "emptyDir": empty_dir}


def _volumes(rendered: render.RenderedConfig, job_name: str, limits: NamespaceLimits) -> list[Body]:
    volumes: list[Body] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": names.config_map(job_name)}},
        scratch_volume(limits),
    ]
    for claim in rendered.claims:
        volumes.append({"name": claim_volume_name(claim), "persistentVolumeClaim": {"claimName": claim}})
    return volumes


def output_claim(rendered: render.RenderedConfig) -> str:
    """The claim the run writes to (`spec.output.storage`), or "" when the output is not on a claim."""
    if rendered.output_uri.startswith("pvc://"):
        return rendered.output_uri[len("pvc://"):].partition("/")[0]
    return ""


def _volume_mounts(rendered: render.RenderedConfig, *, writes_output: bool) -> list[Body]:
    mounts: list[Body] = [
        {"name": CONFIG_VOLUME, "mountPath": render.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": SCRATCH_VOLUME, "mountPath": "/tmp"},
    ]
    writable = output_claim(rendered) if writes_output else ""
    for claim in rendered.claims:
        mount: Body = {"name": claim_volume_name(claim), "mountPath": f"{render.PVC_MOUNT_ROOT}/{claim}"}
        if claim != writable:
            # Model and data claims are only read: a job must not become a way to write any claim.
            mount["readOnly"] = True
        mounts.append(mount)
    return mounts


def _scratch_env() -> list[Body]:
    """Caches and home point into /tmp: the root filesystem is read-only."""
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": "/tmp/.cache/huggingface"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/.cache/matplotlib"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/.cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


HF_TOKEN_ENV = "HF_TOKEN"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
S3_ENV_KEYS = (("access_key_id_key", "AWS_ACCESS_KEY_ID"), ("secret_access_key_key", "AWS_SECRET_ACCESS_KEY"),
               ("session_token_key", "AWS_SESSION_TOKEN"), ("endpoint_key", "AWS_ENDPOINT_URL"),
               ("region_key", "AWS_REGION"))
"""`spec.credentials.s3` keys (`S3Credentials` attributes) and the variables the AWS SDKs (botocore,
hence s3fs) read them from."""


def _secret_env(name: str, secret: str, key: str) -> Body:
    # optional: false: a missing Secret or key stops the container (CreateContainerConfigError),
    # which the operator reports as CredentialsUnavailable, naming spec.credentials.
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": False}}}


MLFLOW_ENV_KEYS = (("token_key", process.ENV_MLFLOW_TOKEN),
                   ("username_key", process.ENV_MLFLOW_USERNAME),
                   ("password_key", process.ENV_MLFLOW_PASSWORD))
"""`spec.credentials.mlflow` keys (`MlflowCredentials` attributes) and the variables the trainer's
MLflow client reads them from."""
MLFLOW_DEFAULT_TOKEN_KEY = "token"


def mlflow_credential_env(spec: FineTuneJobSpec) -> list[Body]:
    """The tracking server's credentials (`spec.credentials.mlflow`), by reference: trainer pods only
    (the only ones that talk to it). A token, or user name and password; none named: the key `token`."""
    mlflow = spec.credential_settings().mlflow
    if mlflow is None:
        return []
    keys = {field: str(getattr(mlflow, field)) for field, _ in MLFLOW_ENV_KEYS if getattr(mlflow, field)}
    if not keys:
        keys = {"token_key": MLFLOW_DEFAULT_TOKEN_KEY}
    return [_secret_env(variable, mlflow.secret_name, keys[field]) for field, variable in MLFLOW_ENV_KEYS
            if field in keys]


def credential_env(spec: FineTuneJobSpec, limits: NamespaceLimits = DEFAULT_LIMITS) -> list[Body]:
    """Environment from `spec.credentials`: each value by reference to the user's Secret, never copied;
    plus the platform's hub mirror (`hfEndpoint`)."""
    credentials = spec.credential_settings()
    env: list[Body] = []
    if limits.hf_endpoint:
        env.append({"name": HF_ENDPOINT_ENV, "value": limits.hf_endpoint})
    if credentials.hub is not None:
        env.append(_secret_env(HF_TOKEN_ENV, credentials.hub.secret_name, credentials.hub.token_key))
    s3 = credentials.s3
    if s3 is not None:
        for field, variable in S3_ENV_KEYS:
            key = getattr(s3, field)
            if key:
                env.append(_secret_env(variable, s3.secret_name, str(key)))
    return env


def service_account(spec: FineTuneJobSpec) -> Body:
    """`serviceAccountName` for workload identity (`spec.credentials.serviceAccountName`), else nothing.
    The API token stays unmounted: cloud identity webhooks project their own token, and the trainer
    never talks to the Kubernetes API."""
    name = spec.credential_settings().service_account_name
    return {"serviceAccountName": name} if name else {}


def trainer_resources(spec: FineTuneJobSpec, defaults: NamespaceLimits = DEFAULT_LIMITS) -> Body:
    """Requests and limits of the trainer container: CPU, memory and `nvidia.com/gpu`
    (`ResourcesSpec.gpu_count`); CPU and memory the spec leaves out come from the policy's
    `defaultCpu`/`defaultMemory`."""
    resources = spec.resource_settings()
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    cpu = resources.cpu if resources.cpu is not None else defaults.default_cpu
    memory = resources.memory if resources.memory is not None else defaults.default_memory
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = str(memory)
        limits["memory"] = str(memory)
    gpus = resources.gpu_count()
    if gpus:
        # Extended resources cannot be overcommitted: requests must equal limits. Quantities are strings.
        requests[GPU_RESOURCE] = str(gpus)
        limits[GPU_RESOURCE] = str(gpus)
    result: Body = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result


def _tolerations(resources: ResourcesSpec, *, include_gpu_toleration: bool) -> list[Body]:
    """`resources.tolerations` as a pod's, plus (trainer pods with GPUs) the GPU nodes' usual taint."""
    tolerations: list[Body] = [apischema.to_dict(t) for t in resources.tolerations or []]
    if include_gpu_toleration and resources.gpu_count() and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _trainer_command(*extra: str, module: str = "kubetune.trainer") -> list[str]:
    return ["python", "-m", module, "--config",
            f"{render.CONFIG_MOUNT_DIR}/{render.CONFIG_FILE_NAME}", *extra]


LAUNCHER_MODULE = "kubetune.trainer.launch"
"""The trainer container's program: starts one training rank per GPU of the pod (one on CPU)."""
RENDEZVOUS_PORT_NAME = "rendezvous"


def distributed_env(job: Body, spec: FineTuneJobSpec) -> list[Body]:
    """The world's shape for `kubetune.trainer.launch`, from the same numbers as the pod's resources:
    processes = the `nvidia.com/gpu` limit (1 on CPU), nodes = `resources.nodes`; with several pods,
    rank 0's address is pod index 0's DNS name under the headless rendezvous Service."""
    resources = spec.resource_settings()
    gpus = resources.gpu_count()
    env = [{"name": process.ENV_NUM_PROCESSES, "value": str(max(1, gpus))},
           {"name": process.ENV_DEVICE, "value": "gpu" if gpus else "cpu"}]
    nodes = resources.nodes
    if nodes > 1:
        job_name = job["metadata"]["name"]
        env += [
            {"name": process.ENV_NUM_NODES, "value": str(nodes)},
            # Indexed Job pods are named <job>-<index> as hosts; the Service gives them DNS records.
            {"name": process.ENV_MASTER_ADDR,
             "value": f"{names.trainer_job(job_name)}-0.{names.rendezvous(job_name)}"},
            {"name": process.ENV_MASTER_PORT, "value": str(process.DEFAULT_MASTER_PORT)},
        ]
    return env


def rendezvous_service(job: Body) -> Body:
    """The headless Service of a multi-pod trainer Job: a DNS record per pod (ready or not: the ranks
    meet before any of them could be ready), through which the ranks find rank 0."""
    job_name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.rendezvous(job_name), COMPONENT_TRAINER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": names.trainer_job(job_name)},
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": process.DEFAULT_MASTER_PORT,
                       "targetPort": process.DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        },
    }


def _pod_spec(job: Body, spec: FineTuneJobSpec, rendered: render.RenderedConfig, container: Body, *,
              grace: int, limits: NamespaceLimits) -> Body:
    pod: Body = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(rendered, job["metadata"]["name"], limits),
    } | service_account(spec)
    return pod | _placement(spec.resource_settings(), include_gpu_toleration=container["name"] == TRAINER_CONTAINER)


def _placement(resources: ResourcesSpec, *, include_gpu_toleration: bool) -> Body:
    placement: Body = {}
    if resources.node_selector:
        placement["nodeSelector"] = dict(resources.node_selector)
    tolerations = _tolerations(resources, include_gpu_toleration=include_gpu_toleration)
    if tolerations:
        placement["tolerations"] = tolerations
    if resources.priority_class_name:
        placement["priorityClassName"] = resources.priority_class_name
    return placement


def _container(name: str, image: str, pull_policy: str, command: list[str], env: list[Body],
               resources: Body, rendered: render.RenderedConfig, *, writes_output: bool) -> Body:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": command,
        "env": env,
        "resources": resources,
        "securityContext": container_security_context(),
        "volumeMounts": _volume_mounts(rendered, writes_output=writes_output),
        "terminationMessagePath": process.DEFAULT_TERMINATION_LOG,
        # The trainer writes a JSON summary there; a crash before that leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def validation_job(job: Body, spec: FineTuneJobSpec, rendered: render.RenderedConfig, settings: OperatorSettings,
                   limits: NamespaceLimits = DEFAULT_LIMITS) -> Body:
    """The accelerator-free Job that runs `--validate-only` before any GPU is held."""
    name = names.validation_job(job["metadata"]["name"])
    resources = {
        "requests": {"cpu": settings.validation_cpu, "memory": settings.validation_memory},
        "limits": {"memory": settings.validation_memory},
    }
    container = _container(VALIDATION_CONTAINER, settings.trainer_image, settings.image_pull_policy,
                           _trainer_command("--validate-only"),
                           _scratch_env() + credential_env(spec, limits), resources, rendered,
                           writes_output=False)
    metadata = _metadata(job, name, COMPONENT_VALIDATION)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(rendered)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": VALIDATION_BACKOFF_LIMIT,
            "activeDeadlineSeconds": VALIDATION_DEADLINE_SECONDS,
            "podFailurePolicy": _pod_failure_policy(VALIDATION_CONTAINER),
            "template": {
                "metadata": {"labels": labels(job, COMPONENT_VALIDATION)},
                "spec": _pod_spec(job, spec, rendered, container, grace=30, limits=limits),
            },
        },
    }


def _pod_failure_policy(container: str) -> Body:
    return {"rules": [
        # The trainer's permanent-error code: bad data/config/model; a retry cannot help.
        {"action": "FailJob",
         "onExitCodes": {"containerName": container, "operator": "In",
                         "values": [process.EXIT_PERMANENT]}},
        # Preemption, eviction, node drain: not the trainer's fault, not counted as a failure.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def trainer_env(job: Body, settings: OperatorSettings) -> list[Body]:
    """Identity, attempt and progress-endpoint environment of the trainer container."""
    env = _scratch_env()
    env.append({"name": process.ENV_ATTEMPT,
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_ATTEMPT}']"}}})
    if settings.progress_url:
        env.append({"name": process.ENV_PROGRESS_URL, "value": settings.progress_url})
        env.append({"name": process.ENV_PROGRESS_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": names.progress_secret(job["metadata"]["name"]), "key": TOKEN_KEY}}})
        if settings.progress_ca:  # public: the pod verifies the endpoint before it sends its token
            env.append({"name": process.ENV_PROGRESS_CA, "value": settings.progress_ca})
    return env


def trainer_job(job: Body, spec: FineTuneJobSpec, rendered: render.RenderedConfig, settings: OperatorSettings, *,
                admitted: bool = True, limits: NamespaceLimits = DEFAULT_LIMITS) -> Body:
    """The training Job; created suspended when the user suspended the job, when a Kueue queue
    admits it, or when the namespace's quota has no room yet (`admitted=False`).

    One Indexed completion per pod (`resources.nodes`, default 1) with `backoffLimitPerIndex`, so the
    Job controller retries retryable failures itself and counts them in the pod annotation
    `batch.kubernetes.io/job-index-failure-count`, which reaches the trainer as
    `KUBETUNE_ATTEMPT`: a pod with attempt > 0 resumes from the latest checkpoint. The container runs
    `kubetune.trainer.launch`, one rank per GPU. With several pods, one pod failing breaks the
    others' collectives, so they fail too and every index is retried: the ranks meet again through
    the rendezvous Service and resume from the same checkpoint.
    """
    name = names.trainer_job(job["metadata"]["name"])
    limit = spec.backoff_limit
    container = _container(TRAINER_CONTAINER, settings.trainer_image, settings.image_pull_policy,
                           _trainer_command(module=LAUNCHER_MODULE),
                           trainer_env(job, settings) + credential_env(spec, limits) + mlflow_credential_env(spec)
                           + distributed_env(job, spec),
                           trainer_resources(spec, limits), rendered, writes_output=True)
    nodes = spec.resource_settings().nodes
    metadata = _metadata(job, name, COMPONENT_TRAINER)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(rendered)}
    queue = spec.resource_settings().queue_name
    if queue:
        metadata["labels"][LABEL_QUEUE] = queue
    job_spec: Body = {
        "completionMode": "Indexed",
        # One pod per node of the run; Kueue (or the quota) admits all of them or none.
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": limit,
        "backoffLimitPerIndex": limit,
        # Never two trainers on one checkpoint folder: replace a pod only once it is gone.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _pod_failure_policy(TRAINER_CONTAINER),
        # Kueue admits a queued job by unsuspending it.
        "suspend": spec.suspend or bool(queue) or not admitted,
        "template": {
            "metadata": {"labels": labels(job, COMPONENT_TRAINER)},
            "spec": _pod_spec(job, spec, rendered, container, grace=TRAINER_GRACE_SECONDS, limits=limits),
        },
    }
    if nodes > 1:
        job_spec["template"]["spec"]["subdomain"] = names.rendezvous(job["metadata"]["name"])
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


# --- serving -----------------------------------------------------------------------

SERVING_CONTAINER = "server"
SERVING_PORT = 8000
SERVING_PORT_NAME = "http"
RUNTIME_BUILTIN = "builtin"
RUNTIME_VLLM = "vllm"
SHM_VOLUME = "shm"
SHM_SIZE = "2Gi"
"""vLLM's workers share tensors through /dev/shm; the container runtime's default (64 MiB) is too small."""
SERVING_GRACE_SECONDS = 30
SERVING_STARTUP_SECONDS = 1800
"""How long a serving container may take to load its model before liveness checks begin."""


VLLM_BASE_SUFFIX = "-base"
"""vLLM serving an adapter also serves its base, under the job's name plus this suffix."""
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's `--max-lora-rank` accepts."""


def vllm_max_lora_rank(spec: FineTuneJobSpec) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `spec.method.lora.rank`."""
    rank = spec.method.lora_settings().rank
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), VLLM_LORA_RANKS[-1])


AUTH_API_KEY = "apiKey"
AUTH_NONE = "none"
SERVING_KEY_ENTRY = "api-key"
"""The entry of the serving-key Secret that holds the API key."""
ANNOTATION_API_KEY_DIGEST = "kubetune.io/api-key-digest"
"""On the serving pod template: a digest of the API key, so a rotated key rolls the Deployment."""
BUILTIN_API_KEY_ENV = "KUBETUNE_SERVE_API_KEY"
"""The built-in server requires this key as a bearer token when the variable is set."""
VLLM_API_KEY_ENV = "VLLM_API_KEY"
"""vLLM's `--api-key` default; set from the Secret so the key never appears on a command line."""


def serving_key_secret(job: Body, key: str) -> Body:
    """The Secret with the API key of the job's serving endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        # The key's digest rides along as an annotation: the operator reads Secrets as metadata
        # only, never their data, and still rolls the Deployment when the key changes.
        "metadata": {**_metadata(job, names.serving_key(job["metadata"]["name"]), COMPONENT_SERVING),
                     "annotations": {ANNOTATION_API_KEY_DIGEST: api_key_digest(key)}},
        "stringData": {SERVING_KEY_ENTRY: key},
    }


SERVING_ADAPTERS_VOLUME = "serving-adapters"
SERVING_ADAPTERS_DIR = "/etc/kubetune/adapters"
"""Where the builtin server's pods see the ConfigMap listing other jobs' adapters (`shareWith`)."""
SERVING_ADAPTERS_FILE = "adapters.json"
"""Its one entry: `{"adapters": [{"name", "path"}]}`, the server's `--adapter-config` format."""


def serving_takes_adapters(spec: FineTuneJobSpec) -> bool:
    """True when other jobs' adapters can be loaded into this job's serving pods while they run
    (`shareWith`): the builtin server over an unmerged adapter, i.e. over the base they apply to.
    vLLM takes them as `--lora-modules` (a change rolls its pods)."""
    return spec.serving_settings().runtime == RUNTIME_BUILTIN and spec.method.saves_adapter()


def serving_adapters_config_map(job: Body, adapters: Sequence[tuple[str, str]]) -> Body:
    """The ConfigMap the serving pods of `job` re-read to load adapters without a restart: every
    (model name, adapter folder as the pods see it) of the jobs that share its serving."""
    document = {"adapters": [{"name": name, "path": path} for name, path in sorted(adapters)]}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.serving_adapters(job["metadata"]["name"]), COMPONENT_SERVING),
        "data": {SERVING_ADAPTERS_FILE: json.dumps(document, indent=1, sort_keys=True)},
    }


def api_key_digest(key: str) -> str:
    """A short, non-reversible fingerprint of an API key (for the pod template annotation)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def serving_image(spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    """`spec.serving.image`, else the trainer image (builtin) or the operator's pinned vLLM image."""
    serving = spec.serving_settings()
    if serving.image and serving.image.strip():
        return serving.image.strip()
    return settings.vllm_image if serving.runtime == RUNTIME_VLLM else settings.trainer_image


def serving_resources(spec: FineTuneJobSpec, defaults: NamespaceLimits = DEFAULT_LIMITS) -> Body:
    """Requests and limits per serving replica (`spec.serving.resources`; GPUs from
    `ServingSpec.gpu_count`; CPU and memory left out come from the policy's `defaultCpu`/`defaultMemory`)."""
    resources = spec.serving_settings().resource_settings()
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpu = resources.cpu if resources.cpu is not None else defaults.default_cpu
    memory = resources.memory if resources.memory is not None else defaults.default_memory
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = limits["memory"] = str(memory)
    gpus = spec.serving_settings().gpu_count()
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    result: Body = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result


def serving_selector(job: Body) -> dict[str, str]:
    """Labels the serving Deployment and Service select their pods by (immutable once created)."""
    return {LABEL_INSTANCE: job["metadata"]["name"], LABEL_COMPONENT: COMPONENT_SERVING,
            LABEL_MANAGED_BY: MANAGED_BY}


def _http_probe(path: str, *, period: int, failures: int, delay: int = 0) -> Body:
    probe: Body = {"httpGet": {"path": path, "port": SERVING_PORT_NAME}, "periodSeconds": period,
                   "timeoutSeconds": 5, "failureThreshold": failures}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _serving_container(job: Body, spec: FineTuneJobSpec, model: render.ModelLocation, settings: OperatorSettings,
                       defaults: NamespaceLimits, guests: Sequence[tuple[str, str]] = ()) -> Body:
    job_name = job["metadata"]["name"]
    serving = spec.serving_settings()
    runtime = serving.runtime
    env = _scratch_env()
    container: Body = {"name": SERVING_CONTAINER, "image": serving_image(spec, settings),
                       "imagePullPolicy": settings.image_pull_policy}
    if runtime == RUNTIME_VLLM:
        # The image's entrypoint is the vLLM OpenAI server; only its arguments are ours.
        if model.base_path is None:
            args = ["--model", model.path, "--served-model-name", job_name]
        else:
            # An unmerged adapter: vLLM serves the base and applies the adapter per request by model name.
            args = ["--model", model.base_path, "--served-model-name", f"{job_name}{VLLM_BASE_SUFFIX}",
                    "--enable-lora", "--lora-modules", f"{job_name}={model.path}",
                    *[f"{name}={path}" for name, path in sorted(guests)],
                    "--max-lora-rank", str(vllm_max_lora_rank(spec))]
        args += ["--host", "0.0.0.0", "--port", str(SERVING_PORT)]
        gpus = serving.gpu_count()
        if gpus > 1:
            args += ["--tensor-parallel-size", str(gpus)]
        container["args"] = args
        health = ready = "/health"
    else:
        container["command"] = ["python", "-m", "kubetune.trainer.serve", "--model", model.path,
                                "--host", "$(POD_IP)", "--port", str(SERVING_PORT),
                                "--served-model-name", job_name]
        if serving_takes_adapters(spec):
            container["command"] += ["--adapter-config", f"{SERVING_ADAPTERS_DIR}/{SERVING_ADAPTERS_FILE}"]
        # Binding the pod IP is valid in any cluster, and lets a local node give each pod its own address.
        env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}] + env
        health, ready = "/healthz", "/readyz"
    if serving.auth == AUTH_API_KEY:
        env = env + [{"name": VLLM_API_KEY_ENV if runtime == RUNTIME_VLLM else BUILTIN_API_KEY_ENV,
                      "valueFrom": {"secretKeyRef": {"name": names.serving_key(job_name), "key": SERVING_KEY_ENTRY}}}]
    env = env + credential_env(spec, defaults)
    mounts: list[Body] = [{"name": SCRATCH_VOLUME, "mountPath": "/tmp"}]
    if runtime == RUNTIME_VLLM:
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    if model.uri.startswith("s3://"):
        mounts.append({"name": MODEL_VOLUME, "mountPath": render.SERVING_MODEL_DIR, "readOnly": True})
    mounts += [{"name": claim_volume_name(claim), "mountPath": f"{render.PVC_MOUNT_ROOT}/{claim}",
                "readOnly": True} for claim in model.claims]
    if serving_takes_adapters(spec):
        mounts.append({"name": SERVING_ADAPTERS_VOLUME, "mountPath": SERVING_ADAPTERS_DIR, "readOnly": True})
    container |= {
        "env": env,
        "ports": [{"name": SERVING_PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        # Loading a large model takes minutes: liveness waits until the server first answers.
        "startupProbe": _http_probe(health, period=10, failures=SERVING_STARTUP_SECONDS // 10),
        "readinessProbe": _http_probe(ready, period=5, failures=3),
        "livenessProbe": _http_probe(health, period=20, failures=3),
        "resources": serving_resources(spec, defaults),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    return container


def _serving_volumes(job: Body, spec: FineTuneJobSpec, model: render.ModelLocation,
                     defaults: NamespaceLimits) -> list[Body]:
    volumes: list[Body] = [scratch_volume(defaults)]
    if spec.serving_settings().runtime == RUNTIME_VLLM:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    volumes += [{"name": claim_volume_name(claim),
                 "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} for claim in model.claims]
    if serving_takes_adapters(spec):
        # Optional: the server reads a missing file as "no adapters", so the pod never waits for it.
        volumes.append({"name": SERVING_ADAPTERS_VOLUME, "configMap": {
            "name": names.serving_adapters(job["metadata"]["name"]), "optional": True}})
    if model.uri.startswith("s3://"):
        volumes.append({"name": MODEL_VOLUME, "emptyDir": {}})
    return volumes


MODEL_VOLUME = "model"
FETCH_MODEL_CONTAINER = "fetch-model"


def _model_download_container(spec: FineTuneJobSpec, model: render.ModelLocation, settings: OperatorSettings,
                              defaults: NamespaceLimits) -> Body:
    """The serving pod's init container for a model in object storage: the trainer image downloads it
    (credentials by reference, as in the trainer) into an emptyDir the server then reads."""
    return {
        "name": FETCH_MODEL_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "kubetune.trainer.objectstore", model.uri, render.SERVING_MODEL_DIR],
        "env": _scratch_env() + credential_env(spec, defaults),
        "resources": serving_resources(spec, defaults),
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": "/tmp"},
                         {"name": MODEL_VOLUME, "mountPath": render.SERVING_MODEL_DIR}],
    }


def serving_deployment(job: Body, spec: FineTuneJobSpec, model: render.ModelLocation, digest: str,
                       settings: OperatorSettings, defaults: NamespaceLimits = DEFAULT_LIMITS, key_digest: str = "",
                       guests: Sequence[tuple[str, str]] = ()) -> Body:
    """The Deployment that serves the finished model (runtime `builtin` or `vllm`).

    The model digest is a pod-template annotation: a new model rolls the Deployment, and so does
    a new API key (`key_digest`, from `api_key_digest`). The model's claim is mounted read-only
    at the path the trainer wrote to. `guests`: (model name, adapter path) of jobs that share this
    serving (`shareWith`); vLLM gets them as `--lora-modules`, the builtin server from the
    `serving_adapters_config_map` instead (no restart).
    """
    name = names.serving(job["metadata"]["name"])
    pod: Body = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": SERVING_GRACE_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [_serving_container(job, spec, model, settings, defaults, guests)],
        "volumes": _serving_volumes(job, spec, model, defaults),
    } | service_account(spec)
    if model.uri.startswith("s3://"):
        pod["initContainers"] = [_model_download_container(spec, model, settings, defaults)]
    if spec.serving_settings().gpu_count():
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    manifest: Body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(job, name, COMPONENT_SERVING),
        "spec": {
            "replicas": spec.serving_settings().replicas,
            "selector": {"matchLabels": serving_selector(job)},
            # Never more model copies in memory than asked for, but no gap in serving either.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels(job, COMPONENT_SERVING),
                             "annotations": {ANNOTATION_MODEL_DIGEST: digest,
                                             **({ANNOTATION_API_KEY_DIGEST: key_digest} if key_digest else {})}},
                "spec": pod,
            },
        },
    }
    manifest["metadata"]["annotations"] = {ANNOTATION_SERVING_HASH: manifest_hash(manifest)}
    return manifest


def manifest_hash(manifest: Body) -> str:
    """A short digest of a manifest's content (metadata annotations excluded)."""
    content = {k: v for k, v in manifest.items() if k != "metadata"}
    content["labels"] = (manifest.get("metadata") or {}).get("labels")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def serving_service(job: Body) -> Body:
    """The ClusterIP Service in front of the serving pods: port 8000 -> the container's `http` port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.serving(job["metadata"]["name"]), COMPONENT_SERVING),
        "spec": {
            "type": "ClusterIP",
            "selector": serving_selector(job),
            "ports": [{"name": SERVING_PORT_NAME, "port": SERVING_PORT, "targetPort": SERVING_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def serving_endpoint(job: Body, settings: OperatorSettings) -> str:
    """The in-cluster URL of the serving Service (its first DNS label is the Service's name)."""
    metadata = job["metadata"]
    return (f"http://{names.serving(metadata['name'])}.{metadata['namespace']}.svc."
            f"{settings.cluster_domain}:{SERVING_PORT}")
