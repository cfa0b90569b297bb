"""The platform policy: per-namespace limits the operator enforces for multi-tenancy (pure).

The Helm chart renders `values.policy` into a ConfigMap that the operator reads
from `KUBETUNE_POLICY_FILE` (YAML)::

    apiVersion: kubetune.io/v1alpha1
    kind: PlatformPolicy
    defaults:                      # every namespace without an entry of its own
      maxConcurrentJobs: 0         # jobs holding a trainer at once; 0 = no limit
      maxGpusPerJob: 0             # GPUs one job may request; 0 = no limit
      maxTotalGpus: 0              # GPUs a namespace's running jobs hold together; 0 = no limit
      allowedModelSources: []      # globs spec.model.source and augmentation.synthetic.model must match; [] = any
      allowedServingImages: []     # globs spec.serving.image must match; [] = the operator's own images only
      allowedTolerations: []       # "key", "key:Effect" or "*"; [] = none (the GPU toleration is the operator's)
      allowedNodeSelectors: []     # "label=value", "label=*" or "*"; [] = none
      allowedPriorityClasses: []   # PriorityClass names or "*"; [] = none
      allowTrustRemoteCode: false  # whether spec.model.trustRemoteCode may be true
      writableClaims: ["*"]        # claims spec.output.storage may write to; "*" = any claim of the namespace
      defaultCpu: ""               # CPU request of trainer/serving containers that set none; "" = none
      defaultMemory: ""            # memory request+limit of trainer/serving containers that set none
      scratchSizeLimit: 64Gi       # sizeLimit of the /tmp emptyDir (caches, downloaded models)
      restartStalledTraining: false  # delete a trainer pod stalled past training.stallTimeoutSeconds
      tenant: ""                   # the usage metrics' tenant label; "" = the namespace name
      allowedServiceAccounts: []   # ServiceAccounts spec.credentials.serviceAccountName may name, or "*"; [] = none
      hfEndpoint: ""               # HF_ENDPOINT of the pods: a hub mirror; "" = huggingface.co
    namespaces:
      team-a: {maxConcurrentJobs: 2}   # keys left out come from `defaults`
    gpuTypes:                      # the node pools' GPUs, for `resources.gpus: auto` and memory checks
      - name: A100-40GB
        memoryGiB: 40
        maxPerNode: 8              # default 8
        tflops: 312                # peak dense bf16, for the ETA (default 100)
        nodeSelector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-40GB}
    targetTrainingHours: 0         # auto adds GPUs (up to a node) to finish within this; 0 = one GPU

Globs use `*` for any characters, `/` included (`hf://meta-llama/*`, `pvc://*`).

`allowedTrainerImages` is deprecated and governs nothing of its own: no FineTuneJob field names a
trainer image (validation and trainer pods always run the operator's trainer image). It is still
accepted: where `allowedServingImages` is not set (left out or null), it governs
`spec.serving.image` as it did before that key existed, and `PlatformPolicy.deprecations` says so.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator.platform.estimate import GpuType

API_VERSION = "kubetune.io/v1alpha1"
KIND = "PlatformPolicy"


class PolicyError(ValueError):
    """The policy file cannot be used; `problems` names each bad field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("platform policy: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class NamespaceLimits:
    """What one namespace's FineTuneJobs may use."""

    max_concurrent_jobs: int = 0
    """Jobs whose trainer may run at once (suspended and Kueue-queued trainers excluded); 0 = no limit."""
    max_gpus_per_job: int = 0
    """GPUs one job's trainer may request; 0 = no limit."""
    max_total_gpus: int = 0
    """GPUs all running trainers of the namespace may hold together; 0 = no limit."""
    allowed_model_sources: tuple[str, ...] = ()
    """Globs that `spec.model.source` must match; empty = any source."""
    allowed_serving_images: tuple[str, ...] | None = None
    """Globs that `spec.serving.image` must match unless it names one of the operator's own images
    (its trainer and vLLM images, always allowed); empty = only those: any other image's entrypoint
    would run in the serving pods. None = not set in the policy: `allowed_trainer_images` stands in
    (see `serving_images`)."""
    allowed_trainer_images: tuple[str, ...] = ()
    """Deprecated; governs nothing of its own: no FineTuneJob field names a trainer image (validation
    and trainer pods always run the operator's trainer image). While `allowed_serving_images` is not
    set, these globs govern `spec.serving.image`, as they did before `allowedServingImages` existed."""
    allowed_tolerations: tuple[str, ...] = ()
    """Tolerations `spec.resources.tolerations` may hold: `key` (any effect), `key:Effect`, or `*`
    (anything, a key-less `Exists` included); empty = none."""
    allowed_node_selectors: tuple[str, ...] = ()
    """Labels `spec.resources.nodeSelector` may require: `label=value`, `label=*` (any value) or `*`;
    empty = none (the GPU type's selector from `gpuTypes` is the operator's own)."""
    allowed_priority_classes: tuple[str, ...] = ()
    """PriorityClass names `spec.resources.priorityClassName` may name, or `*`; empty = none."""
    allow_trust_remote_code: bool = False
    """Whether `spec.model.trustRemoteCode: true` (checkpoint code runs in the trainer) is allowed."""
    writable_claims: tuple[str, ...] = ("*",)
    """Claims `spec.output.storage` may write to (the only claim a trainer mounts read-write), or `*`
    for any claim of the namespace; empty = none."""
    default_cpu: str = ""
    """CPU request of trainer and serving containers whose spec sets none; empty = no request."""
    default_memory: str = ""
    """Memory request and limit of trainer and serving containers whose spec sets none; empty = none."""
    scratch_size_limit: str = "64Gi"
    """sizeLimit of the pods' /tmp emptyDir (caches and hf:// downloads): a pod past it is evicted
    instead of filling the node's disk."""
    restart_stalled_training: bool = False
    """Whether a trainer pod stalled past `spec.training.stallTimeoutSeconds` is deleted, so that its
    replacement resumes from the latest checkpoint (off: only the Warning and the `Stalled` condition)."""
    tenant: str = ""
    """The `tenant` label of the namespace's usage metrics (chargeback); empty = the namespace name.
    Set here, by the platform, not on the FineTuneJob: a tenant cannot move its usage elsewhere."""
    allowed_service_accounts: tuple[str, ...] = ()
    """ServiceAccounts of the namespace that `spec.credentials.serviceAccountName` may name (workload
    identity: the pods get that account's cloud permissions), or `*`; empty = none."""
    hf_endpoint: str = ""
    """`HF_ENDPOINT` of the validation, trainer and serving pods: a Hugging Face hub mirror or proxy,
    e.g. `https://hf-mirror.internal`; empty = the public hub."""

    @property
    def limits_running_jobs(self) -> bool:
        """Whether starting a trainer needs a look at what else runs in the namespace."""
        return self.max_concurrent_jobs > 0 or self.max_total_gpus > 0

    def model_source_allowed(self, source: str) -> bool:
        return _matches(source, self.allowed_model_sources)

    @property
    def serving_images(self) -> tuple[str, ...]:
        """The globs `spec.serving.image` must match: `allowed_serving_images`, or while that is not
        set, the deprecated `allowed_trainer_images`; empty = only the operator's own images."""
        return self.allowed_trainer_images if self.allowed_serving_images is None else self.allowed_serving_images

    def image_allowed(self, image: str, own_images: tuple[str, ...] = ()) -> bool:
        """Whether `spec.serving.image` may name `image`: one of the operator's own, or one that
        `serving_images` allows."""
        if image in own_images:
            return True
        return bool(self.serving_images) and _matches(image, self.serving_images)

    def serving_image_refusal(self, image: str, own_images: tuple[str, ...], namespace: str) -> str:
        """Why `spec.serving.image` may not name `image` in `namespace`; "" when it may. The message
        names the policy key the platform would change (allowedServingImages), what it allows now,
        and what the tenant can do instead."""
        if self.image_allowed(image, own_images):
            return ""
        if self.allowed_serving_images is None and self.allowed_trainer_images:
            rule = (f"allowedServingImages: not set; the deprecated allowedTrainerImages: "
                    f"{_listed(self.allowed_trainer_images)} stands in for it")
        else:
            rule = f"allowedServingImages: {_listed(self.serving_images)}"
        return (f"spec.serving.image: {image!r} is not allowed in namespace {namespace} by the platform policy "
                f"({rule}; the operator's own images, always allowed: {_listed(own_images)}); "
                "leave spec.serving.image out to serve with the operator's own image, name an allowed image, "
                "or ask the platform administrators to add this one to allowedServingImages")

    def claim_writable(self, claim: str) -> bool:
        return "*" in self.writable_claims or claim in self.writable_claims

    def toleration_allowed(self, key: str | None, effect: str | None) -> bool:
        """A toleration of taint `key` (None: every taint) with `effect` (None: every effect): `key`
        entries allow every effect of that key; `key:Effect` only that effect."""
        if "*" in self.allowed_tolerations:
            return True
        return bool(key) and (key in self.allowed_tolerations
                              or (bool(effect) and f"{key}:{effect}" in self.allowed_tolerations))

    def node_selector_allowed(self, label: str, value: str) -> bool:
        allowed = self.allowed_node_selectors
        return "*" in allowed or f"{label}=*" in allowed or f"{label}={value}" in allowed

    def priority_class_allowed(self, name: str) -> bool:
        return "*" in self.allowed_priority_classes or name in self.allowed_priority_classes

    def service_account_allowed(self, name: str) -> bool:
        return "*" in self.allowed_service_accounts or name in self.allowed_service_accounts


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "none"


@dataclasses.dataclass(frozen=True)
class PlatformPolicy:
    """Defaults plus per-namespace overrides."""

    defaults: NamespaceLimits = NamespaceLimits()
    """Limits of every namespace without an entry of its own."""
    namespaces: Mapping[str, NamespaceLimits] = dataclasses.field(default_factory=dict)
    """Per-namespace limits (complete: keys left out in the file were taken from `defaults`)."""
    gpu_types: tuple[GpuType, ...] = ()
    """The GPU types the node pools offer; empty = unknown (`gpus: auto` trains on CPU, GPU memory unchecked)."""
    target_training_hours: float = 0.0
    """`gpus: auto` uses the fewest GPUs (up to a node) whose ETA is within this; 0 = always one GPU."""
    deprecations: tuple[str, ...] = ()
    """What the file uses that is deprecated, one sentence per key and effect, each naming where
    (`defaults`, `namespaces.<name>`) and what to change; the operator logs them at start-up."""

    def limits_for(self, namespace: str) -> NamespaceLimits:
        return self.namespaces.get(namespace, self.defaults)


NO_POLICY = PlatformPolicy()
"""No limits at all (no policy file)."""

_COUNT_KEYS = {"maxConcurrentJobs": "max_concurrent_jobs", "maxGpusPerJob": "max_gpus_per_job",
               "maxTotalGpus": "max_total_gpus"}
_LIST_KEYS = {"allowedModelSources": "allowed_model_sources", "allowedTrainerImages": "allowed_trainer_images",
              "allowedServingImages": "allowed_serving_images",
              "allowedTolerations": "allowed_tolerations", "allowedNodeSelectors": "allowed_node_selectors",
              "allowedPriorityClasses": "allowed_priority_classes", "writableClaims": "writable_claims",
              "allowedServiceAccounts": "allowed_service_accounts"}
_BOOL_KEYS = {"allowTrustRemoteCode": "allow_trust_remote_code",
              "restartStalledTraining": "restart_stalled_training"}
_TENANT = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_QUANTITY_KEYS = {"defaultCpu": "default_cpu", "defaultMemory": "default_memory",
                  "scratchSizeLimit": "scratch_size_limit"}
_URL_KEYS = {"hfEndpoint": "hf_endpoint"}
_URL = re.compile(r"^https?://[^\s/@]+(/\S*)?$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")


def _limits_from(data: Any, path: str, base: NamespaceLimits, problems: list[str]) -> NamespaceLimits:
    if data is None:
        return base
    if not isinstance(data, dict):
        problems.append(f"{path}: must be a mapping, got {type(data).__name__}")
        return base
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _COUNT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{path}.{key}: must be an integer >= 0 (0 = no limit), got {value!r}")
            else:
                values[_COUNT_KEYS[key]] = value
        elif key == "allowedServingImages" and value is None:
            values["allowed_serving_images"] = None  # null = not set: allowedTrainerImages stands in
        elif key in _LIST_KEYS:
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{path}.{key}: must be a list of non-empty glob strings, got {value!r}")
            else:
                values[_LIST_KEYS[key]] = tuple(value)
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                problems.append(f"{path}.{key}: must be true or false, got {value!r}")
            else:
                values[_BOOL_KEYS[key]] = value
        elif key in _URL_KEYS:
            text = "" if value is None else str(value)
            if text and not _URL.match(text):
                problems.append(f"{path}.{key}: must be an http(s):// URL without credentials (empty = the "
                                f"public hub), got {value!r}")
            else:
                values[_URL_KEYS[key]] = text.rstrip("/")
        elif key in _QUANTITY_KEYS:
            text = "" if value is None else str(value)
            if text and not _QUANTITY.match(text):
                problems.append(f"{path}.{key}: must be a Kubernetes quantity such as 2, 500m or 16Gi "
                                f"(empty = none), got {value!r}")
            else:
                values[_QUANTITY_KEYS[key]] = text
        elif key == "tenant":
            if not isinstance(value, str) or (value and not _TENANT.match(value)):
                problems.append(f"{path}.tenant: must be a label value (letters, digits, '-', '_', '.'; at most "
                                f"63 characters, alphanumeric at both ends), got {value!r}")
            else:
                values["tenant"] = value
        else:
            allowed = ", ".join(sorted([*_COUNT_KEYS, *_LIST_KEYS, *_BOOL_KEYS, *_QUANTITY_KEYS, *_URL_KEYS, "tenant"]))
            problems.append(f"{path}.{key}: unknown key; allowed: {allowed}")
    return dataclasses.replace(base, **values)


def policy_from_dict(data: Any) -> PlatformPolicy:
    """The policy in a parsed file; PolicyError lists every problem by field path."""
    if data is None:
        return NO_POLICY
    if not isinstance(data, dict):
        raise PolicyError([f"the document must be a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    if data.get("kind", KIND) != KIND:
        problems.append(f"kind: must be {KIND}, got {data.get('kind')!r}")
    unknown = set(data) - {"apiVersion", "kind", "defaults", "namespaces", "gpuTypes", "targetTrainingHours"}
    if unknown:
        problems.append(f"{sorted(unknown)[0]}: unknown key; allowed: apiVersion, kind, defaults, namespaces, "
                        "gpuTypes, targetTrainingHours")
    gpu_types = _gpu_types_from(data.get("gpuTypes"), problems)
    target = data.get("targetTrainingHours", 0)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target < 0:
        problems.append(f"targetTrainingHours: must be a number >= 0 (0 = off), got {target!r}")
        target = 0
    defaults = _limits_from(data.get("defaults"), "defaults", NamespaceLimits(), problems)
    namespaces: dict[str, NamespaceLimits] = {}
    raw_namespaces = data.get("namespaces") or {}
    if not isinstance(raw_namespaces, dict):
        problems.append(f"namespaces: must be a mapping of namespace names to limits, got {raw_namespaces!r}")
    else:
        for name, limits in raw_namespaces.items():
            namespaces[str(name)] = _limits_from(limits, f"namespaces.{name}", defaults, problems)
    if problems:
        raise PolicyError(problems)
    return PlatformPolicy(defaults=defaults, namespaces=namespaces, gpu_types=gpu_types,
                          target_training_hours=float(target), deprecations=_deprecations(defaults, namespaces))


def _deprecations(defaults: NamespaceLimits, namespaces: Mapping[str, NamespaceLimits]) -> tuple[str, ...]:
    """A warning for each entry whose `allowedTrainerImages` lists globs: they govern
    `spec.serving.image` there (allowedServingImages not set) or nothing (it is set). A namespace
    entry whose two image keys equal the defaults' is left out: the defaults' warning covers it."""
    found: list[str] = []
    scopes = [("defaults", defaults)] + [(f"namespaces.{name}", limits) for name, limits in namespaces.items()
                                         if (limits.allowed_serving_images, limits.allowed_trainer_images)
                                         != (defaults.allowed_serving_images, defaults.allowed_trainer_images)]
    for path, limits in scopes:
        if not limits.allowed_trainer_images:
            continue
        globs = _listed(limits.allowed_trainer_images)
        if limits.allowed_serving_images is None:
            found.append(f"{path}.allowedTrainerImages: deprecated: no FineTuneJob field names a trainer image; "
                         f"it still governs spec.serving.image ({globs}) because {path}.allowedServingImages is "
                         "not set. Move these globs to allowedServingImages and remove allowedTrainerImages")
        else:
            found.append(f"{path}.allowedTrainerImages: ignored ({globs}): {path}.allowedServingImages is set and "
                         "alone governs spec.serving.image, and no FineTuneJob field names a trainer image. "
                         "Remove allowedTrainerImages from the policy")
    return tuple(found)


_GPU_TYPE_KEYS = ("name", "memoryGiB", "maxPerNode", "nodeSelector", "tflops")


def _gpu_types_from(data: Any, problems: list[str]) -> tuple[GpuType, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.append(f"gpuTypes: must be a list of {{name, memoryGiB, maxPerNode, nodeSelector, tflops}}, got {data!r}")
        return ()
    found: list[GpuType] = []
    for index, item in enumerate(data):
        path = f"gpuTypes[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{path}: must be a mapping, got {item!r}")
            continue
        bad = len(problems)
        for key in sorted(set(item) - set(_GPU_TYPE_KEYS)):
            problems.append(f"{path}.{key}: unknown key; allowed: {', '.join(_GPU_TYPE_KEYS)}")
        name, memory = item.get("name"), item.get("memoryGiB")
        per_node, tflops = item.get("maxPerNode", 8), item.get("tflops", 100.0)
        selector = item.get("nodeSelector") or {}
        if not isinstance(name, str) or not name:
            problems.append(f"{path}.name: must be a non-empty string, got {name!r}")
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
            problems.append(f"{path}.memoryGiB: must be a number > 0, got {memory!r}")
        if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
            problems.append(f"{path}.maxPerNode: must be an integer >= 1, got {per_node!r}")
        if isinstance(tflops, bool) or not isinstance(tflops, (int, float)) or tflops <= 0:
            problems.append(f"{path}.tflops: must be a number > 0, got {tflops!r}")
        if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
            problems.append(f"{path}.nodeSelector: must map label names to string values, got {selector!r}")
        if len(problems) == bad:
            assert isinstance(memory, (int, float)) and isinstance(per_node, int) and isinstance(tflops, (int, float))
            found.append(GpuType(str(name), float(memory), per_node, dict(selector), float(tflops)))
    return tuple(found)


def load_policy(path: str) -> PlatformPolicy:
    """The policy in a YAML file; empty path = no limits; PolicyError when unreadable or invalid."""
    if not path:
        return NO_POLICY
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise PolicyError([f"{path}: cannot be read ({error.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError([f"{path}: not valid YAML ({error})"]) from None
    return policy_from_dict(data)


# --- what a spec asks for against the policy ----------------------------------------------------

def _claim_of(uri: str) -> str:
    """The claim of a `pvc://<claim>/...` URI, else ""."""
    if uri.startswith("pvc://"):
        return uri[len("pvc://"):].partition("/")[0]
    return ""


def violations(spec: FineTuneJobSpec, limits: NamespaceLimits, namespace: str,
               own_images: tuple[str, ...] = ()) -> list[str]:
    """Every part of a FineTuneJob spec the platform policy does not allow in `namespace`, each naming
    the field, the value and the policy rule (the same rules the chart's ValidatingAdmissionPolicy
    checks at `kubectl apply`). `spec.model.source` is checked apart (reason ModelSourceNotAllowed)."""
    found: list[str] = []
    where = f"in namespace {namespace} by the platform policy"

    def listed(values: tuple[str, ...]) -> str:
        return ", ".join(values) if values else "none"

    resources = spec.resource_settings()
    for index, toleration in enumerate(resources.tolerations or []):
        if not limits.toleration_allowed(toleration.key, toleration.effect):
            shown = toleration.key or "(no key: every taint)"
            found.append(f"spec.resources.tolerations[{index}]: toleration of {shown}"
                         f"{':' + toleration.effect if toleration.effect else ''} is not allowed "
                         f"{where} (allowedTolerations: {listed(limits.allowed_tolerations)})")
    for label, value in (resources.node_selector or {}).items():
        if not limits.node_selector_allowed(label, value):
            found.append(f"spec.resources.nodeSelector[{label}]: {label}={value} is not allowed {where} "
                         f"(allowedNodeSelectors: {listed(limits.allowed_node_selectors)})")
    priority = resources.priority_class_name
    if priority and not limits.priority_class_allowed(priority):
        found.append(f"spec.resources.priorityClassName: {priority!r} is not allowed {where} "
                     f"(allowedPriorityClasses: {listed(limits.allowed_priority_classes)})")
    if spec.model.trust_remote_code and not limits.allow_trust_remote_code:
        found.append(f"spec.model.trustRemoteCode: true is not allowed {where} (allowTrustRemoteCode: false)")
    generator = spec.dataset.augmentation.synthetic.model
    if generator and not limits.model_source_allowed(generator):
        found.append(f"spec.dataset.augmentation.synthetic.model: {generator!r} is not allowed {where} "
                     f"(allowedModelSources: {listed(limits.allowed_model_sources)})")
    claim = _claim_of(spec.output.storage)
    if claim and not limits.claim_writable(claim):
        found.append(f"spec.output.storage: claim {claim!r} may not be written {where} "
                     f"(writableClaims: {listed(limits.writable_claims)})")
    account = spec.credential_settings().service_account_name
    if account and not limits.service_account_allowed(account):
        found.append(f"spec.credentials.serviceAccountName: {account!r} is not allowed {where} "
                     f"(allowedServiceAccounts: {listed(limits.allowed_service_accounts)})")
    image = (spec.serving_settings().image or "").strip()
    refusal = limits.serving_image_refusal(image, own_images, namespace) if image else ""
    if refusal:
        found.append(refusal)
    return found
