"""Render a FineTuneJob spec into the trainer's config file (pure).

The trainer config uses the spec's own vocabulary (camelCase keys) for its
sections `model`, `dataset`, `method`, `hyperparameters`, `training` and
`evaluation`, plus `output` and `job`. The operator's part is to turn storage
URIs into paths inside the pod: `pvc://claim/some/path` becomes
`/mnt/pvc/claim/some/path`, and the claim is mounted there. Other sources
(`hf://`, `s3://`, `http(s)://`, local paths in local mode) pass through.

The result is checked with `kubetune.api.config.config_from_dict`, the parser the
trainer reads it with (the same typed models as the spec), so a spec the trainer
would reject is rejected here, before any pod starts, with the same
field-by-field problems.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from typing import Any

from kubetune.api import config as trainer_config, layout

PVC_SCHEME = "pvc://"
PVC_MOUNT_ROOT = "/mnt/pvc"
"""Claims are mounted at `/mnt/pvc/<claim>` in trainer and validation pods."""
OBJECT_STORE_SCRATCH = "/tmp/kubetune-output"
"""Where a run whose `output.storage` is `s3://` writes before its files are uploaded (the pod's /tmp)."""
SERVING_MODEL_DIR = "/mnt/model"
"""Where a serving pod's init container downloads an `s3://` model to (an emptyDir)."""
CONFIG_MOUNT_DIR = "/etc/kubetune"
"""Where the ConfigMap with the trainer config is mounted."""
CONFIG_FILE_NAME = "trainer-config.json"
"""Key of the trainer config in the ConfigMap, and its file name."""

TRAINER_SECTIONS = ("model", "dataset", "method", "hyperparameters", "training", "evaluation")
"""Spec sections copied into the trainer config verbatim (after source rewriting)."""
DATASET_SPLITS = ("train", "validation", "test")


class SpecError(ValueError):
    """The spec cannot be rendered; `problems` lists each as "spec.field: what is wrong"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class RenderedConfig:
    """The trainer config and what the pod needs to run it."""

    config: dict[str, Any]
    """The trainer config (JSON-ready, camelCase keys)."""
    claims: tuple[str, ...]
    """PersistentVolumeClaims to mount at `/mnt/pvc/<claim>`, sorted."""
    output_uri: str
    """Where the run writes, as a storage URI (e.g. `pvc://models/finetunes/my-job`)."""
    model_uri: str
    """Where the finished model will be (`<output_uri>/model`, or `<output_uri>/adapter` for an
    unmerged LoRA adapter)."""

    def config_json(self) -> str:
        """The config file's content (stable key order, so equal specs give equal ConfigMaps)."""
        return self._config_json

    @functools.cached_property
    def _config_json(self) -> str:
        # Asked up to three times per pass (the ConfigMap, each Job's config-hash annotation, the
        # validation Job's comparison); `config` is not changed once rendered.
        return json.dumps(self.config, indent=2, sort_keys=True)


def parse_pvc(uri: str, field: str) -> tuple[str, str]:
    """`pvc://claim/a/b` -> (`claim`, `a/b`); SpecError naming the field when malformed."""
    rest = uri[len(PVC_SCHEME):]
    claim, _, path = rest.partition("/")
    if not claim or not _is_dns_label(claim):
        raise SpecError([f"{field}: {uri!r} must be pvc://<claim>/<path> with a valid claim name "
                         "(lower-case letters, digits and '-', at most 63 characters)"])
    if ".." in path.split("/"):
        raise SpecError([f"{field}: {uri!r} must not contain '..'"])
    return claim, path.strip("/")


def _is_dns_label(name: str) -> bool:
    return (0 < len(name) <= 63 and name[0].isalnum() and name[-1].isalnum()
            and all(ch.islower() or ch.isdigit() or ch == "-" for ch in name))


def localize(uri: str, field: str, claims: set[str]) -> str:
    """A storage URI as the pod sees it; records PVC claims to mount."""
    if uri.startswith(PVC_SCHEME):
        claim, path = parse_pvc(uri, field)
        claims.add(claim)
        return f"{PVC_MOUNT_ROOT}/{claim}/{path}".rstrip("/")
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri


def storage_uri(path: str) -> str:
    """The inverse of `localize` for claims: `/mnt/pvc/claim/a/b` -> `pvc://claim/a/b`; others unchanged."""
    prefix = f"{PVC_MOUNT_ROOT}/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return f"{PVC_SCHEME}{path[len(prefix):]}"
    return path


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where a finished model is, as a serving pod sees it."""

    uri: str
    """Storage URI of what the trainer saved, e.g. `pvc://models/finetunes/my-job/model`
    (`.../adapter` for a LoRA adapter saved unmerged)."""
    path: str
    """That folder inside the pod, e.g. `/mnt/pvc/models/finetunes/my-job/model`."""
    claims: tuple[str, ...]
    """PersistentVolumeClaims to mount (read-only) at `/mnt/pvc/<claim>`: the output's, and for an
    adapter the base model's too."""
    base_path: str | None = None
    """For an unmerged LoRA adapter: the base model folder the adapter applies to (the path the
    trainer loaded it from, which the adapter's `adapter_config.json` names); None otherwise."""


def _method(spec: dict[str, Any]) -> tuple[str, bool]:
    """The spec's method type and LoRA merge flag, with the trainer's defaults (lora, merge: true)."""
    method = spec.get("method") or {}
    if not isinstance(method, dict):
        return "lora", True
    lora = method.get("lora") or {}
    return str(method.get("type") or "lora"), not (isinstance(lora, dict) and lora.get("merge") is False)


def saves_adapter(spec: dict[str, Any]) -> bool:
    """True when the trainer saves a LoRA adapter (`method.lora.merge: false`) rather than a model."""
    return layout.saves_adapter(*_method(spec))


def artefact_folder(spec: dict[str, Any]) -> str:
    """The output sub-folder the trainer saves to (kubetune.api.layout): `adapter` or `model`."""
    return layout.artefact_folder(*_method(spec))


def model_location(job: dict[str, Any]) -> ModelLocation:
    """Where the job's trainer writes the finished model (`<output>/model`, or `<output>/adapter`
    for an unmerged LoRA adapter, with the base model it applies to); SpecError when the output
    storage is unusable or the adapter's base cannot be served. The same mapping as the trainer
    config, so serving pods find the model at the path the trainer wrote it to."""
    metadata = job.get("metadata") or {}
    raw_spec = job.get("spec")
    spec = raw_spec if isinstance(raw_spec, dict) else {}
    uri = layout.model_location(output_location(spec, str(metadata.get("name", ""))), *_method(spec))
    claims: set[str] = set()
    path = SERVING_MODEL_DIR if uri.startswith("s3://") else localize(uri, "spec.output.storage", claims)
    base_path = None
    if saves_adapter(spec):
        model = spec.get("model") or {}
        source, field = adapter_base(job)
        if not source:
            raise SpecError([f"{field}: required to serve a LoRA adapter (method.lora.merge: false) "
                             "on its base model"])
        if source.startswith(("hf://", "s3://", "http://", "https://")):
            raise SpecError([f"spec.method.lora.merge: false serves the adapter on its base model, which must be a "
                             f"folder the serving pod can mount (pvc://<claim>/<path>), got {field} "
                             f"{source!r}; set merge: true to serve a merged model"])
        if isinstance(model, dict) and model.get("ggufFile"):
            raise SpecError(["spec.method.lora.merge: false cannot be served over a GGUF base model "
                             "(spec.model.ggufFile): the server loads adapters onto transformers folders; "
                             "set merge: true"])
        base_path = localize(source, field, claims)
    return ModelLocation(uri=uri, path=path, claims=tuple(sorted(claims)), base_path=base_path)


def adapter_base(job: dict[str, Any]) -> tuple[str, str]:
    """The base model an unmerged adapter of this job applies to, and the field that says so.

    With `spec.model.fromJob` the adapter's base is the newest merged model of `status.lineage`: an
    adapter trained on from an adapter keeps that adapter's base (base -> A adapter -> B adapter: the
    base), one trained on from a merged model has that model as its base. Empty while unresolved."""
    raw_spec = job.get("spec")
    spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
    raw_model = spec.get("model")
    model: dict[str, Any] = raw_model if isinstance(raw_model, dict) else {}
    if not model.get("fromJob"):
        source = model.get("source")
        return (source.strip() if isinstance(source, str) else ""), "spec.model.source"
    lineage = (job.get("status") or {}).get("lineage")
    entries = [e for e in lineage if isinstance(e, dict)] if isinstance(lineage, list) else []
    for index in range(len(entries) - 1, -1, -1):
        uri = str(entries[index].get("uri") or "")
        if uri and not layout.is_adapter(uri):
            return uri, f"status.lineage[{index}].uri (the base model of spec.model.fromJob's chain)"
    return "", "spec.model.fromJob (its lineage is not resolved yet)"


def output_location(spec: dict[str, Any], job_name: str) -> str:
    """The run's output URI: `<spec.output.storage>/<job name>[-<nameSuffix>]`."""
    output = spec.get("output") or {}
    storage = output.get("storage")
    if not isinstance(storage, str) or not storage.strip():
        raise SpecError(["spec.output.storage: required: where the model and checkpoints go "
                         "(pvc://<claim>/<path>)"])
    suffix = output.get("nameSuffix") or ""
    leaf = f"{job_name}-{suffix}" if suffix else job_name
    return f"{storage.rstrip('/')}/{leaf}"


def trainer_config_for(job: dict[str, Any], lineage: list[dict[str, Any]] | None = None) -> RenderedConfig:
    """Render the FineTuneJob into the trainer config; SpecError lists every problem. `lineage`
    (`status.lineage`, for `spec.model.fromJob`) goes into the config for the model card."""
    metadata = job.get("metadata") or {}
    spec = job.get("spec")
    if not isinstance(spec, dict):
        raise SpecError(["spec: required"])
    problems: list[str] = []
    claims: set[str] = set()
    config: dict[str, Any] = {}
    for section in TRAINER_SECTIONS:
        value = spec.get(section)
        if value is not None:
            config[section] = copy.deepcopy(value)
    if isinstance(config.get("model"), dict):
        # The trainer gets the resolved source; the chain of earlier jobs goes to `job.lineage`.
        config["model"].pop("fromJob", None)
    if isinstance(config.get("training"), dict):
        # The operator's own field (stall detection): the trainer has nothing to do with it.
        config["training"].pop("stallTimeoutSeconds", None)

    def rewrite(holder: dict[str, Any], key: str, field: str) -> None:
        value = holder.get(key)
        if isinstance(value, str):
            try:
                holder[key] = localize(value, field, claims)
            except SpecError as error:
                problems.extend(error.problems)

    if isinstance(config.get("model"), dict):
        rewrite(config["model"], "source", "spec.model.source")
    dataset = config.get("dataset")
    if isinstance(dataset, dict):
        for split in DATASET_SPLITS:
            if isinstance(dataset.get(split), dict):
                rewrite(dataset[split], "source", f"spec.dataset.{split}.source")

    output_uri = ""
    try:
        output_uri = output_location(spec, str(metadata.get("name", "")))
        if output_uri.startswith("s3://"):
            # Written to the pod's scratch space and mirrored to the bucket (checkpoints as they are saved).
            config["output"] = {"dir": OBJECT_STORE_SCRATCH, "checkpointDir": layout.checkpoints_location(OBJECT_STORE_SCRATCH),
                                "uri": output_uri}
        else:
            output_dir = localize(output_uri, "spec.output.storage", claims)
            config["output"] = {"dir": output_dir, "checkpointDir": layout.checkpoints_location(output_dir)}
    except SpecError as error:
        problems.extend(error.problems)
    config["job"] = {"namespace": metadata.get("namespace", ""), "name": metadata.get("name", ""),
                     "uid": metadata.get("uid", "")}
    tracking = tracking_config(spec, metadata)
    if tracking:
        config["tracking"] = tracking
    if lineage:
        config["job"]["lineage"] = [{k: str(v) for k, v in entry.items() if k in ("job", "uri", "digest")}
                                    for entry in lineage]
    model = spec.get("model")
    if isinstance(model, dict) and not model.get("source") and not model.get("fromJob"):
        problems.append("spec.model: set source (where the base model is) or fromJob (an earlier FineTuneJob)")
    elif isinstance(model, dict) and model.get("fromJob") and not lineage:
        problems.append(f"spec.model.fromJob: {model['fromJob']!r} is not resolved yet")
    if problems:
        raise SpecError(problems)
    try:
        trainer_config.config_from_dict(config)
    except trainer_config.ConfigError as error:
        raise SpecError([_spec_path(problem) for problem in error.problems]) from None
    return RenderedConfig(config=config, claims=tuple(sorted(claims)), output_uri=output_uri,
                          model_uri=layout.model_location(output_uri, *_method(spec)))


def tracking_config(spec: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The trainer's `tracking` section from `spec.tracking`, defaults filled in here (experiment: the
    namespace; run name: the job's name) so the ConfigMap says where the run is logged; {} when off.
    No credentials: those reach the pod by secretKeyRef (`spec.credentials.mlflow`)."""
    tracking = spec.get("tracking") or {}
    mlflow = tracking.get("mlflow") if isinstance(tracking, dict) else None
    if not isinstance(mlflow, dict) or not mlflow.get("trackingUri"):
        return {}
    filled = {"trackingUri": mlflow["trackingUri"],
              "experiment": mlflow.get("experiment") or str(metadata.get("namespace") or ""),
              "runName": mlflow.get("runName") or str(metadata.get("name") or "")}
    return {"mlflow": {key: value for key, value in filled.items() if value}}


def _spec_path(problem: str) -> str:
    """A trainer problem ("dataset.format: …") named as the user wrote it ("spec.dataset.format: …")."""
    if problem.startswith(("(", "output", "job")):
        return problem
    return f"spec.{problem}"
