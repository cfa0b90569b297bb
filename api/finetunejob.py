"""The FineTuneJob API (`kubetune.io/v1alpha1`): typed spec and status models.

These classes are the one source of truth for the CRD: `kubetune.operator.crd`
generates `crds/finetunejobs.kubetune.io.yaml` from them (descriptions are the
field docstrings below, so `kubectl explain ftj.spec.dataset` prints them), and
`FineTuneJobSpec.from_dict(body["spec"])` reads an object back, typed, with the
same defaults the API server applies.

The spec sections `model`, `dataset`, `method`, `hyperparameters`, `training`
and `evaluation` are also the trainer config's (`kubetune.api.config`): the
operator copies them into the config and the trainer parses them with these
same classes, defaults and rules across fields (each `Rule` carries its Python
twin, `check`, which `parse` applies).

`auto` values: integer hyperparameters accept the string "auto" (the default);
number hyperparameters (`learningRate`, `warmupRatio`, `weightDecay`,
`dropout`) are automatic when left out, because a Kubernetes schema cannot say
"a number or a string". The trainer resolves every automatic value (rules in
docs/api.md) and the operator records them in `status.resolved`.

Pure: no kopf, no kubernetes client.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from kubetune.api import layout, schema as apischema
from kubetune.api.schema import (
    AUTO,
    Format,
    Immutable,
    IntOrAuto,
    ListType,
    MaxItems,
    MaxLength,
    MaxProperties,
    Maximum,
    MinItems,
    MinLength,
    Minimum,
    Pattern,
    PreserveUnknownFields,
    Quantity,
    Rule,
    matches,
    rules,
)

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"

# --- reusable value types ---------------------------------------------------------------

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A Kubernetes object name that must also be a DNS label (RFC 1123)."""
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name (RFC 1123 subdomain)."""

_PVC_REF = re.compile(r"^pvc://[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(/.*)?$")
_PVC_REF_RULE = Rule(
    f"!self.startsWith('pvc://') || self.matches('{_PVC_REF.pattern}')",
    "a pvc:// reference names a PersistentVolumeClaim in the job's own namespace: use "
    "pvc://<claim>/<path> where <claim> is a plain claim name (lower-case letters, digits and '-', "
    "at most 63 characters); namespaces and other separators are not allowed",
    check=lambda v: not v.startswith("pvc://") or _PVC_REF.search(v) is not None,
)
_NO_DOT_DOT_RULE = Rule("!self.contains('/../') && !self.endsWith('/..')",
                        "must not contain '..' path segments",
                        check=lambda v: "/../" not in v and not v.endswith("/.."))
_CREDENTIALS_IN_URL = re.compile(r"^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@")
_NO_CREDENTIALS_IN_URL_RULE = Rule(
    f"!self.matches('{_CREDENTIALS_IN_URL.pattern}')",
    "must not carry credentials (user:password@ or key:secret@ before the host): a URL is stored in the "
    "object, its status, Events and logs; put them in a Secret of this namespace and name it in "
    "spec.credentials",
    check=lambda v: _CREDENTIALS_IN_URL.search(v) is None)
"""Keys pasted into a URL would be copied into the ConfigMap, conditions, Events and log tails."""

ModelURI = Annotated[str, MinLength(1), MaxLength(1024), matches(
    "^(hf://[A-Za-z0-9][-A-Za-z0-9._]*/[A-Za-z0-9][-A-Za-z0-9._]*|pvc://.+|"
    "s3://[a-z0-9][-a-z0-9.]*[a-z0-9]/.+|file:///.+|/.+)$",
    "must be hf://<org>/<name>, pvc://<claim>/<path>, s3://<bucket>/<key>, or (local mode) an "
    "absolute path or file:///<path>"), _PVC_REF_RULE, _NO_DOT_DOT_RULE, _NO_CREDENTIALS_IN_URL_RULE]
"""Where a model comes from."""

DataURI = Annotated[str, MinLength(1), MaxLength(2048), matches(
    "^(https?://.+|s3://[a-z0-9][-a-z0-9.]*[a-z0-9]/.+|pvc://.+|file:///.+|/.+)$",
    "must be pvc://<claim>/<path>, http(s)://<url>, s3://<bucket>/<key>, or (local mode) an absolute "
    "path or file:///<path>"), _PVC_REF_RULE, _NO_DOT_DOT_RULE, _NO_CREDENTIALS_IN_URL_RULE]
"""Where data comes from."""

StorageURI = Annotated[str, MinLength(1), MaxLength(1024), matches(
    "^(pvc://.+|s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/.*)?|file:///.+|/.+)$",
    "must be pvc://<claim>/<path>, s3://<bucket>/<prefix>, or (local mode) an absolute path or "
    "file:///<path>"), _PVC_REF_RULE, _NO_DOT_DOT_RULE, _NO_CREDENTIALS_IN_URL_RULE]
"""Where outputs go."""

ColumnName = Annotated[str, MinLength(1), MaxLength(256)]
"""A column (field) name in a data file."""

Fraction = Annotated[float, Minimum(0), Maximum(1, exclusive=True)]
"""A number in [0, 1)."""

KubeQuantity = Annotated[int | str, Quantity(), MaxLength(64)]
"""A Kubernetes resource quantity: `4`, `500m`, `16Gi`."""

RFC3339 = Annotated[str, Format("date-time"), MaxLength(64)]
"""A timestamp."""

DataFormat = Literal["text", "prompt_completion", "chat", "classification"]
FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "txt"]
ImbalanceStrategy = Literal["none", "oversample", "undersample", "classWeights"]
MethodType = Literal["full", "lora"]
Scheduler = Literal["auto", "linear", "cosine", "constant", "constantWithWarmup"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Strategy = Literal["ddp", "fsdp"]
EarlyStoppingMetric = Literal["valLoss", "valPerplexity", "valAccuracy", "valF1"]
EvaluationMetric = Literal["perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1"]
AugmentationOperation = Literal["wordDeletion", "wordSwap", "wordInsertion", "charNoise"]
AUGMENTATION_OPERATIONS: tuple[AugmentationOperation, ...] = typing.get_args(AugmentationOperation)
"""Every edit operation, in order: the default of `dataset.augmentation.operations`."""
ServingRuntime = Literal["builtin", "vllm"]
ServingAuth = Literal["apiKey", "none"]
Phase = Literal["Validating", "Pending", "Running", "Suspended", "Succeeded", "Failed", "Pruned"]

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
"""Evaluation metrics that only a classification dataset has."""

_RUN_DEFINITION = "it defines the training run; create a new FineTuneJob to change it"


# --- spec.model ------------------------------------------------------------------------


@rules(Rule("has(self.source) != has(self.fromJob)",
            "set exactly one of source (a model's location) and fromJob (continue from an earlier "
            "FineTuneJob's model)", field_path=".source",
            check=lambda m: (m.source is not None) != (m.from_job is not None)))
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The base model to fine-tune: `source`, or `fromJob` to train on from an earlier job's model."""

    source: ModelURI | None = None
    """Where the base model comes from: `hf://<org>/<name>` (Hugging Face hub id),
    `pvc://<claim>/<path>` (a folder on a PersistentVolumeClaim in this namespace, as written by
    `save_pretrained`), `s3://<bucket>/<key>` (a folder prefix; credentials from
    `spec.credentials.s3`), or in local mode an absolute path / `file:///<path>`."""
    from_job: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)] | None = None
    """Continue training from the model of an earlier FineTuneJob of this namespace (incremental
    learning: the same task, new data). The operator waits until that job has Succeeded
    (`Validated=False SourceJobNotReady` until then), resolves it to the exact model URI and digest of
    its `status.model`, and records the chain in `status.lineage` and the model card. A merged model
    is the new base; an unmerged LoRA adapter is trained on (the same adapter, not a second one
    stacked on it). Instead of `source`."""
    revision: Annotated[str, MaxLength(255)] | None = None
    """Hub revision (branch, tag or commit hash) when `source` is `hf://`. Default: the main branch."""
    gguf_file: Annotated[str, MaxLength(255), Pattern(r"^[^/]+\.gguf$")] | None = None
    """File name (no folders) of a GGUF checkpoint inside `source`, e.g. `model.Q4_1.gguf`;
    transformers dequantises it on load. Leave out for safetensors/pytorch checkpoints."""
    trust_remote_code: bool = False
    """Allow Python code shipped with the checkpoint to run. Off by default: it runs arbitrary code
    in the trainer pod."""


# --- spec.dataset ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One data file (or folder of files)."""

    source: DataURI
    """Where the data is: `pvc://<claim>/<path>`, `http(s)://<url>`, `s3://<bucket>/<key>`, or in
    local mode an absolute path / `file:///<path>`."""
    file_format: FileFormat = "auto"
    """How to parse it: `jsonl`, `json`, `csv`, `parquet` or `txt` (one record per line for format
    `text`). `auto` picks from the file extension."""


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """Column names in the data files; each defaults to its own name."""

    text: ColumnName = "text"
    """Column with the text (formats `text` and `classification`)."""
    prompt: ColumnName = "prompt"
    """Column with the prompt (format `prompt_completion`); no loss is computed on it."""
    completion: ColumnName = "completion"
    """Column with the completion (format `prompt_completion`): the only tokens the loss is
    computed on."""
    messages: ColumnName = "messages"
    """Column with a list of `{role, content}` messages (format `chat`), rendered with the model's
    chat template; the loss is computed on assistant turns."""
    label: ColumnName = "label"
    """Column with the class label (format `classification`)."""


@rules(Rule("self.maxChars == 0 || self.maxChars >= self.minChars",
            "maxChars must be 0 (no limit) or at least minChars", field_path=".maxChars",
            check=lambda c: c.max_chars == 0 or c.max_chars >= c.min_chars))
@dataclasses.dataclass(frozen=True)
class Cleaning:
    """Record cleaning, applied before splitting."""

    normalize_whitespace: bool = True
    """Collapse runs of spaces and tabs, strip each line and both ends; paragraph breaks stay."""
    drop_empty: bool = True
    """Drop records whose text is empty after normalisation."""
    min_chars: Annotated[int, Minimum(0), Maximum(1_000_000)] = 1
    """Drop records shorter than this many characters (after normalisation)."""
    max_chars: Annotated[int, Minimum(0), Maximum(100_000_000)] = 0
    """Drop records longer than this many characters; 0 means no limit."""
    dedupe: bool = True
    """Drop exact duplicates (after normalisation), keeping the first."""


@dataclasses.dataclass(frozen=True)
class Split:
    """How the training data is split when no separate validation/test source is given."""

    validation: Fraction = 0.1
    """Fraction of the training data held out for validation (ignored when `dataset.validation`
    is given). Together with `test` it must leave some training data."""
    test: Fraction = 0.1
    """Fraction held out for the final test evaluation (ignored when `dataset.test` is given)."""
    seed: Annotated[int, Minimum(0), Maximum(2**31 - 1)] = 42
    """Shuffle seed: the same seed and data give the same split."""
    stratify: bool = True
    """Keep label proportions equal across the splits (format `classification` only)."""


@dataclasses.dataclass(frozen=True)
class Imbalance:
    """Class-imbalance handling (format `classification` only)."""

    strategy: ImbalanceStrategy = "none"
    """`oversample` repeats minority-class examples, `undersample` drops majority-class ones,
    `classWeights` weights each example's loss by its inverse class frequency, `none` trains on the
    data as it is."""


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """An easiest-first (shortest-first) curriculum over epochs."""

    enabled: bool = False
    """Train on a growing fraction of the training set, shortest examples first."""
    start_fraction: Annotated[float, Minimum(0, exclusive=True), Maximum(1)] = 0.25
    """Fraction of the training set used in the first epoch, in (0, 1]."""
    epochs_to_full: Annotated[int, Minimum(1), Maximum(1000)] = 1
    """Epochs over which the fraction grows linearly to the whole set."""


GeneratorModelURI = Annotated[str, MinLength(1), MaxLength(1024), matches(
    "^(hf://[A-Za-z0-9][-A-Za-z0-9._]*/[A-Za-z0-9][-A-Za-z0-9._]*|file:///.+|/.+)$",
    "must be hf://<org>/<name> or (local mode, or a path already mounted in the trainer pod) an "
    "absolute path or file:///<path>"), _NO_DOT_DOT_RULE, _NO_CREDENTIALS_IN_URL_RULE]
"""Where a synthetic-data generator model comes from."""


@rules(
    Rule("self.maxChars == 0 || self.maxChars >= self.minChars",
         "maxChars must be 0 (no limit) or at least minChars", field_path=".maxChars",
         check=lambda c: c.max_chars == 0 or c.max_chars >= c.min_chars),
    Rule("!self.enabled || has(self.promptTemplate)",
         "synthetic augmentation needs a promptTemplate", field_path=".promptTemplate", reason="FieldValueRequired",
         check=lambda a: not a.enabled or a.prompt_template is not None),
)
@dataclasses.dataclass(frozen=True)
class SyntheticAugmentation:
    """Training examples written by a language model (any format). Each of `count` generations is
    seeded by a training example drawn at random: the model writes a new input side (the text, the
    prompt, or the first user message) and the seed's target side (label, completion, assistant
    turns) is copied. Generations are cut at the first blank line, filtered by length and deduped
    against every real example (train, validation and test) and each other."""

    enabled: bool = False
    """Generate synthetic training examples."""
    model: GeneratorModelURI | None = None
    """The generator model: `hf://<org>/<name>` or an absolute path (a folder with config.json).
    Absent: the base model (`spec.model`, GGUF included)."""
    prompt_template: Annotated[str, MinLength(1), MaxLength(8192)] | None = None
    """What the generator is asked. Placeholders: `{text}` or `{prompt}` (the seed example's input
    side) and `{label}` (its label; format classification only); other braces are literal. Required
    when enabled."""
    count: Annotated[int, Minimum(1), Maximum(100_000)] = 100
    """Examples to generate; those the filters drop are not replaced."""
    max_new_tokens: Annotated[int, Minimum(1), Maximum(4096)] = 64
    """Longest generation, in tokens."""
    min_chars: Annotated[int, Minimum(0), Maximum(1_000_000)] = 8
    """Drop generations shorter than this many characters (after whitespace normalisation)."""
    max_chars: Annotated[int, Minimum(0), Maximum(100_000_000)] = 0
    """Drop generations longer than this many characters; 0 means no limit."""
    temperature: Annotated[float, Minimum(0), Maximum(5)] = 0.8
    """Sampling temperature; 0 means greedy decoding (the same output for the same prompt)."""
    chat_template: bool = False
    """Send the filled template as one user message through the generator's chat template (for
    instruct models); false sends it as plain text."""


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Augmentation of the training split only: validation and test are never edited, seeded from or
    drawn on, and an augmented example equal to a held-out one is dropped. Off by default. Counts go
    to metrics.json (`data.augmentation`)."""

    enabled: bool = False
    """Add edited copies of the training examples (formats text and classification only; the label is
    copied unchanged). For prompt_completion and chat use `synthetic`."""
    operations: Annotated[list[AugmentationOperation], MinItems(1), MaxItems(4), ListType("set")] = \
        dataclasses.field(default_factory=lambda: list(AUGMENTATION_OPERATIONS))
    """Edits to draw from, one per copy: `wordDeletion`, `wordSwap`, `wordInsertion` (words from the
    training split's own vocabulary) and `charNoise` (typos: a character substituted, deleted,
    doubled or transposed)."""
    rate: Annotated[float, Minimum(0, exclusive=True), Maximum(0.5)] = 0.1
    """Fraction of the words (characters for charNoise) a copy edits, in (0, 0.5]; at least one edit."""
    multiplier: Annotated[int, Minimum(1), Maximum(10)] = 1
    """Edited copies added per real training example: 1 doubles the training split."""
    seed: Annotated[int, Minimum(0), Maximum(2**31 - 1)] = 42
    """Seed of every random choice: the same seed and data give the same augmented examples."""
    synthetic: SyntheticAugmentation = dataclasses.field(default_factory=SyntheticAugmentation)
    """Model-generated examples."""


@rules(
    Rule("(has(self.validation) ? 0.0 : self.split.validation) + (has(self.test) ? 0.0 : self.split.test) < 1.0",
         "split.validation + split.test must be below 1 so that a training split remains "
         "(fractions given by a separate validation/test source do not count)", field_path=".split",
         check=lambda d: ((0.0 if d.validation else d.split.validation)
                          + (0.0 if d.test else d.split.test) < 1.0)),
    Rule("self.format == 'classification' || !has(self.labels)",
         "labels apply only to format classification", field_path=".labels", reason="FieldValueForbidden",
         check=lambda d: d.format == "classification" or d.labels is None),
    Rule("self.format == 'classification' || self.imbalance.strategy == 'none'",
         "imbalance.strategy applies only to format classification; use 'none'",
         field_path=".imbalance.strategy", reason="FieldValueForbidden",
         check=lambda d: d.format == "classification" or d.imbalance.strategy == "none"),
    Rule("self.format != 'classification' || self.fields.label != self.fields.text",
         "format classification needs a label field: fields.label must name a column other than fields.text",
         field_path=".fields.label",
         check=lambda d: d.format != "classification" or d.fields.label != d.fields.text),
    Rule("self.format != 'prompt_completion' || self.fields.prompt != self.fields.completion",
         "fields.prompt and fields.completion must name different columns", field_path=".fields.completion",
         check=lambda d: d.format != "prompt_completion" or d.fields.prompt != d.fields.completion),
    Rule("!self.augmentation.enabled || self.format == 'text' || self.format == 'classification'",
         "augmentation edits apply only to formats text and classification; for prompt_completion and "
         "chat use augmentation.synthetic", field_path=".augmentation.enabled", reason="FieldValueForbidden",
         check=lambda d: not d.augmentation.enabled or d.format in ("text", "classification")),
    Rule("self.format == 'classification' || !has(self.augmentation.synthetic.promptTemplate) || "
         "!self.augmentation.synthetic.promptTemplate.contains('{label}')",
         "the {label} placeholder needs format classification",
         field_path=".augmentation.synthetic.promptTemplate",
         check=lambda d: (d.format == "classification"
                          or "{label}" not in (d.augmentation.synthetic.prompt_template or ""))),
)
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The data and how to prepare it."""

    train: DataSource
    """Training data (required). Validation and test splits are carved out of it unless given
    separately."""
    format: DataFormat = "text"
    """Record shape: `text` (plain text, for domain adaptation), `prompt_completion` (loss on the
    completion only), `chat` (a list of messages rendered with the model's chat template) or
    `classification` (text plus a label; the model learns to generate the label)."""
    validation: DataSource | None = None
    """Validation data. Absent: `split.validation` of the training data is held out."""
    test: DataSource | None = None
    """Test data for the final evaluation. Absent: `split.test` of the training data is held out."""
    fields: FieldNames = dataclasses.field(default_factory=FieldNames)
    """Column names in the data files."""
    labels: Annotated[list[Annotated[str, MinLength(1), MaxLength(256)]], MinItems(2), MaxItems(1000),
                      ListType("set")] | None = None
    """The classification label set (format `classification` only); records with another label
    are an error. Absent: the labels found in the training data."""
    cleaning: Cleaning = dataclasses.field(default_factory=Cleaning)
    """Record cleaning before splitting."""
    split: Split = dataclasses.field(default_factory=Split)
    """Train/validation/test split ratios and seed."""
    imbalance: Imbalance = dataclasses.field(default_factory=Imbalance)
    """Class-imbalance handling (format `classification` only)."""
    curriculum: Curriculum = dataclasses.field(default_factory=Curriculum)
    """Optional curriculum over epochs."""
    augmentation: Augmentation = dataclasses.field(default_factory=Augmentation)
    """Optional augmentation of the training split (edited copies, model-generated examples)."""


# --- spec.method -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapter settings."""

    rank: Annotated[int, Minimum(1), Maximum(1024)] = 8
    """LoRA rank r: adapter capacity. 8 suits most instruction tuning; 16-64 for bigger shifts."""
    alpha: Annotated[float, Minimum(0, exclusive=True), Maximum(4096)] = 16
    """LoRA scaling alpha; the adapter update is scaled by alpha / rank."""
    dropout: Fraction = 0.05
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: Annotated[list[Annotated[str, MinLength(1), MaxLength(128),
                                             Pattern(r"^[A-Za-z0-9_.*-]+$")]],
                              MaxItems(64), ListType("set")] = dataclasses.field(default_factory=list)
    """Module names to adapt (e.g. `q_proj`, `v_proj`, `c_attn`). Empty: the attention projections
    of the model's architecture."""
    merge: bool = True
    """Merge the adapters into the saved model (true), or save them separately in `adapter/` next
    to a reference to the base model (false)."""


@rules(Rule("self.type == 'lora' || !has(self.lora)", "lora settings apply only when type is 'lora'",
            field_path=".lora", reason="FieldValueForbidden",
            check=lambda m: m.type == "lora" or m.lora is None))
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How the weights are trained."""

    type: MethodType = "lora"
    """`lora` trains small low-rank adapters (far less memory; the default), `full` updates every
    weight."""
    lora: LoraSettings | None = None
    """LoRA settings; only with type `lora`. Absent: the defaults shown on each field."""

    def lora_settings(self) -> LoraSettings:
        """The LoRA settings in effect (defaults when the section is absent)."""
        return self.lora or LoraSettings()

    def saves_adapter(self) -> bool:
        """Whether the trainer saves a LoRA adapter (`lora.merge: false`) rather than a whole model."""
        return layout.saves_adapter(self.type, self.lora_settings().merge)


# --- spec.hyperparameters ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Optimisation settings. Integers accept "auto"; numbers left out are automatic. The trainer
    resolves every automatic value (see docs/api.md) and the operator records the result in
    `status.resolved`."""

    epochs: Annotated[IntOrAuto, Minimum(1), Maximum(1000)] = AUTO
    """Passes over the training data. auto: 3, more for tiny datasets (so ~100 examples are seen),
    fewer for huge ones (so ~25k examples are seen, at least 1)."""
    batch_size: Annotated[IntOrAuto, Minimum(1), Maximum(4096)] = AUTO
    """Per-device micro-batch, in sequences. auto: a token budget for the device and model size
    (on GPUs twice as much for LoRA) divided by the sequence length; see docs/api.md."""
    learning_rate: Annotated[float, Minimum(0, exclusive=True), Maximum(1)] | None = None
    """Peak learning rate. Leave out for auto: 2e-4 for LoRA; for full fine-tuning 2e-5 at 1B
    parameters, scaled by sqrt(1e9 / parameters) and clamped to [5e-6, 1e-3]."""
    scheduler: Scheduler = AUTO
    """Learning-rate schedule after warmup. auto: cosine."""
    warmup_ratio: Fraction | None = None
    """Fraction of the optimizer steps spent warming up linearly from 0, in [0, 1). Leave out for
    auto: 0.03 (at least one step)."""
    weight_decay: Annotated[float, Minimum(0), Maximum(1)] | None = None
    """AdamW weight decay (not applied to biases and norms). Leave out for auto: 0 for LoRA, 0.01
    for full fine-tuning."""
    dropout: Fraction | None = None
    """Override the model's dropout probabilities, in [0, 1). Leave out to keep the model's own."""
    max_seq_length: Annotated[IntOrAuto, Minimum(16), Maximum(1_048_576)] = AUTO
    """Tokens per training sequence. auto: the next power of two holding the longest record, at
    least 64 and at most min(model context, 1024)."""
    gradient_accumulation_steps: Annotated[IntOrAuto, Minimum(1), Maximum(1024)] = AUTO
    """Micro-batches per optimizer step. auto: enough for ~16 sequences per step per device, but
    never fewer than 8 optimizer steps per epoch."""
    seed: Annotated[IntOrAuto, Minimum(0), Maximum(2**31 - 1)] = AUTO
    """Seed for adapter initialisation, data order and dropout. auto: 42."""


# --- spec.training ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when a validation metric stops improving."""

    enabled: bool = False
    """Stop when `metric` has not improved for `patience` evaluations."""
    metric: EarlyStoppingMetric = "valLoss"
    """What to watch: `valLoss` and `valPerplexity` are minimised, `valAccuracy` and `valF1`
    (macro-averaged F1; format `classification` only) maximised."""
    patience: Annotated[int, Minimum(1), Maximum(1000)] = 3
    """Evaluations without improvement before training stops."""
    min_delta: Annotated[float, Minimum(0)] = 0.0
    """Smallest change of the metric that counts as an improvement."""


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """Precision, evaluation cadence, early stopping and checkpoints."""

    precision: Precision = AUTO
    """Mixed precision. auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30% slower."""
    eval_interval: Annotated[int, Minimum(0), Maximum(10_000_000)] = 0
    """Validate every this many optimizer steps; 0 means once per epoch."""
    early_stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    """Early stopping on a validation metric."""
    checkpoint_interval: Annotated[int, Minimum(0), Maximum(10_000_000)] = 0
    """Save a checkpoint every this many optimizer steps; 0 means at every evaluation. A retried
    pod resumes from the latest complete checkpoint."""
    keep_checkpoints: Annotated[int, Minimum(1), Maximum(100)] = 2
    """How many recent periodic checkpoints stay on disk."""
    keep_best: bool = True
    """Also keep the best checkpoint by the early-stopping metric, and save that model at the end."""
    packing: bool = True
    """Pack short examples into full sequences (no padding); attention does not cross examples."""
    compile: bool = False
    """Compile the model with torch.compile (dynamic shapes): faster training steps on GPUs, after a
    compilation of a minute or more when training starts. Off by default: on CPUs and short runs the
    compilation costs more than it saves; see docs/trainer.md for measured figures."""
    stall_timeout_seconds: Annotated[int, Minimum(0), Maximum(7 * 24 * 3600)] = 0
    """Seconds a running trainer's step may stay the same before the job is marked `Stalled` (a
    Warning Event, and a restart from the latest checkpoint when the platform policy sets
    `restartStalledTraining`); 0 turns the check off. Allow for model loading, the baseline evaluation
    and validations: the clock starts when the operator first sees the pod running."""
    strategy: Strategy = "ddp"
    """Data parallelism over the run's devices (`resources.gpus` per pod × `resources.nodes`): `ddp`
    keeps a whole model on every device and averages gradients; `fsdp` shards parameters, gradients
    and optimizer state over the devices (full fine-tuning of a model that does not fit one device;
    the model class must name its transformer blocks, checked before training), with the same
    per-step losses as ddp. fsdp checkpoints hold gathered full tensors (the optimizer state keyed by
    parameter name: they do not resume a ddp run, nor the reverse); the final model is saved whole, as
    with ddp, and the final evaluation needs it to fit one device. One device: the same as ddp; see
    docs/trainer.md."""


# --- spec.evaluation ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationSpec:
    """The final evaluation on the test split."""

    metrics: Annotated[list[EvaluationMetric], MaxItems(6), ListType("set")] = dataclasses.field(
        default_factory=list)
    """Test metrics to report. `perplexity` and `tokenAccuracy` are always computed; `accuracy`,
    `precision`, `recall` and `f1` (macro-averaged, plus per class) need format `classification`,
    where they are always computed too."""
    max_test_examples: Annotated[int, Minimum(0), Maximum(100_000_000)] = 0
    """Evaluate at most this many test examples; 0 means all."""
    baseline: bool = True
    """Also evaluate the base model on the same test split before training (same tokenisation,
    prompt formatting and metrics) and report it in `status.results.baseline`, with
    `status.results.improvement`, so every job answers "did fine-tuning help?". Costs one
    evaluation pass; false skips it."""
    samples: Annotated[int, Minimum(0), Maximum(20)] = 0
    """Answer this many test prompts with the base model (before training) and the tuned model
    (after), greedy and at most 64 tokens each; they go to `samples.json` in the output folder,
    `status.samples` and an Event. 0 means none."""


# --- spec.resources -----------------------------------------------------------------------------


@rules(Rule("self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists", field_path=".value",
            check=lambda t: t.operator != "Exists" or not t.value),
       Rule("has(self.key) || self.operator == 'Exists'",
            "a toleration without key must use operator Exists (it tolerates every taint)", field_path=".operator",
            check=lambda t: t.key is not None or t.operator == "Exists"))
@dataclasses.dataclass(frozen=True)
class Toleration:
    """A toleration for a node taint (as in a Pod's spec)."""

    key: Annotated[str, MaxLength(316)] | None = None
    """Taint key to tolerate; absent with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value; `Exists` matches the key with any value."""
    value: Annotated[str, MaxLength(63)] | None = None
    """Taint value to match (operator `Equal`)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; absent tolerates every effect."""
    toleration_seconds: Annotated[int, Minimum(0)] | None = None
    """How long a NoExecute taint is tolerated before eviction; absent means forever."""


@rules(Rule("!has(self.nodes) || self.nodes <= 1 || (has(self.gpus) && string(self.gpus) != '0')",
            "nodes > 1 needs gpus >= 1 (or auto) per pod: several pods train together over the network "
            "(nccl), which CPU pods cannot do usefully; use nodes: 1 on CPU", field_path=".nodes",
            check=lambda r: r.nodes <= 1 or (r.gpus is not None and str(r.gpus) != "0")))
@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    """What the trainer pod needs and where it may run."""

    gpus: Annotated[IntOrAuto, Minimum(0), Maximum(64)] | None = None
    """GPUs (`nvidia.com/gpu`) per trainer pod; more than one trains data-parallel. `auto`: the operator
    estimates the memory the run needs (docs/sizing.md) and picks the platform GPU type with the least
    memory that fits (one GPU, more only to meet the platform's target time), or CPU when the platform
    lists no GPU types; absent or 0 trains on CPU. A job that cannot fit is rejected before it starts."""
    cpu: KubeQuantity | None = None
    """CPU request of the trainer pod, e.g. `4` or `3500m`."""
    memory: KubeQuantity | None = None
    """Memory request and limit of the trainer pod, e.g. `32Gi`."""
    node_selector: Annotated[dict[str, Annotated[str, MaxLength(63)]], MaxProperties(32)] | None = None
    """Node labels the trainer pod requires, e.g. `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`."""
    tolerations: Annotated[list[Toleration], MaxItems(32), ListType("atomic")] | None = None
    """Node taints the trainer pod tolerates. With GPUs, `nvidia.com/gpu:NoSchedule` is tolerated
    automatically."""
    priority_class_name: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)] | None = None
    """PriorityClass of the trainer pod (preemption order when GPUs are scarce)."""
    queue_name: Annotated[str, MaxLength(63), Pattern(DNS_LABEL)] | None = None
    """Kueue LocalQueue (in this namespace) to admit the trainer Job through. Set: the Job is
    created suspended with the `kueue.x-k8s.io/queue-name` label and Kueue decides when it runs."""
    nodes: Annotated[int, Minimum(1), Maximum(64)] = 1
    """Trainer pods that train together (data-parallel, one process per GPU of each pod): the world
    size is `gpus` × `nodes`. More than one runs an Indexed Job of that many pods with a headless
    Service for the rendezvous; one pod failing restarts the attempt, which resumes from the latest
    checkpoint (so `output` must be storage every pod reaches). Needs `gpus` >= 1."""

    @property
    def gpus_auto(self) -> bool:
        """Whether the operator chooses the GPUs (`gpus: auto`, resolved from the estimate)."""
        return self.gpus == AUTO

    def gpu_count(self) -> int:
        """GPUs per trainer pod: "auto" is one (until the operator resolves it), absent is none."""
        if self.gpus == AUTO:
            return 1
        return int(self.gpus or 0)

    def job_gpus(self) -> int:
        """GPUs the whole run holds: per pod × pods (what quotas count)."""
        return self.gpu_count() * self.nodes

    def world_size(self) -> int:
        """Training processes of the run: one per GPU of each pod (one per CPU pod) × pods."""
        return max(1, self.gpu_count()) * self.nodes


# --- spec.output, spec.serving -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Where the finished model, metrics and checkpoints go."""

    storage: StorageURI
    """Storage root, e.g. `pvc://models/finetunes`; the run writes to
    `<storage>/<job name>[-<nameSuffix>]` (`model/`, `metrics.json`, `README.md`, `checkpoints/`).
    In local mode an absolute path."""
    name_suffix: Annotated[str, MaxLength(32), Pattern(DNS_LABEL)] | None = None
    """Appended to the job name in the output folder, e.g. a date or a version."""


@dataclasses.dataclass(frozen=True)
class ServingResources:
    """What each serving pod needs."""

    gpus: Annotated[int, Minimum(0), Maximum(8)] = 0
    """GPUs per serving replica (vLLM needs at least one)."""
    cpu: KubeQuantity | None = None
    """CPU request per replica."""
    memory: KubeQuantity | None = None
    """Memory request and limit per replica."""


@rules(Rule("!self.enabled || self.runtime != 'vllm' || (has(self.resources) && self.resources.gpus >= 1)",
            "runtime vllm needs at least one GPU per replica: set resources.gpus", field_path=".resources",
            check=lambda v: (not v.enabled or v.runtime != "vllm"
                             or (v.resources is not None and v.resources.gpus >= 1))))
@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Serve the finished model behind an OpenAI-compatible API. Editable at any time."""

    enabled: bool = False
    """Create a serving Deployment and Service once training succeeds."""
    replicas: Annotated[int, Minimum(0), Maximum(64)] = 1
    """Serving replicas; 0 keeps the Service but scales the server down."""
    runtime: ServingRuntime = "builtin"
    """`builtin`: kubetune's server (transformers; CPU or GPU). `vllm`: the vLLM OpenAI server
    (GPU only, much higher throughput)."""
    resources: ServingResources | None = None
    """Resources per replica. Absent: no GPU, the cluster's default CPU and memory."""
    image: Annotated[str, MaxLength(512)] | None = None
    """Override the serving image (default: the trainer image for `builtin`, the operator's vLLM
    image for `vllm`)."""
    auth: ServingAuth = "apiKey"
    """`apiKey` (default): every `/v1/*` request needs `Authorization: Bearer <key>`, the key being
    the `api-key` entry of the Secret `<job>-serving-key` that the operator creates with a random
    value (delete the Secret to rotate the key: a new one is made and the server restarts);
    wrong or missing keys get 401. `none`: anyone who can reach the Service may use the model."""
    share_with: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)] | None = None
    """Serve this job's LoRA adapter from the serving Deployment of the FineTuneJob of this name (in
    the same namespace) instead of a Deployment of its own: that server loads the adapter without a
    restart and routes requests whose `model` is this job's name to it. Needs
    `method.lora.merge: false`, the same `spec.model` as that job (whose own output must be an
    unmerged adapter too, so its server holds the base) and the output on a claim its pods mount;
    `status.servedBy` and `status.endpoint` then say where the model is served, and `replicas`,
    `runtime`, `resources` and `image` here are not used. A job in another namespace cannot be
    named."""

    def resource_settings(self) -> ServingResources:
        """Resources per replica in effect (`resources`; no GPU and the cluster's defaults when absent)."""
        return self.resources or ServingResources()

    def gpu_count(self) -> int:
        """GPUs per serving replica: `resources.gpus`, and at least one for vLLM (it cannot run without)."""
        gpus = self.resource_settings().gpus
        return max(gpus, 1) if self.runtime == "vllm" else gpus


# --- spec.credentials ---------------------------------------------------------------------------

SecretKey = Annotated[str, MinLength(1), MaxLength(253), Pattern(r"^[-._a-zA-Z0-9]+$")]
"""A key of a Secret's data."""


@dataclasses.dataclass(frozen=True)
class HubCredentials:
    """A Hugging Face hub token, for private or gated `hf://` models."""

    secret_name: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)]
    """A Secret in the job's namespace."""
    token_key: SecretKey = "token"
    """Its key holding the token; it reaches the pods as `HF_TOKEN`."""


@dataclasses.dataclass(frozen=True)
class S3Credentials:
    """Keys of an S3-compatible object store, for `s3://` sources and `output.storage`. Each key named
    here must exist in the Secret: a missing one stops the validation pod (`Validated=False
    CredentialsUnavailable`) before any GPU is held."""

    secret_name: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)]
    """A Secret in the job's namespace."""
    access_key_id_key: SecretKey = "accessKeyId"
    """Its key holding the access key id (`AWS_ACCESS_KEY_ID` in the pods)."""
    secret_access_key_key: SecretKey = "secretAccessKey"
    """Its key holding the secret access key (`AWS_SECRET_ACCESS_KEY`)."""
    session_token_key: SecretKey | None = None
    """Its key holding a session token for temporary credentials (`AWS_SESSION_TOKEN`); absent: none."""
    endpoint_key: SecretKey | None = None
    """Its key holding the endpoint URL of a non-AWS store, e.g. `https://minio.storage:9000`
    (`AWS_ENDPOINT_URL`); absent: AWS."""
    region_key: SecretKey | None = None
    """Its key holding the region (`AWS_REGION`); absent: the SDK's default."""


@rules(Rule("has(self.usernameKey) == has(self.passwordKey)",
            "set usernameKey and passwordKey together (basic auth), or tokenKey alone (a bearer token)",
            field_path=".passwordKey",
            check=lambda c: (c.username_key is None) == (c.password_key is None)),
       Rule("!has(self.tokenKey) || !has(self.usernameKey)",
            "set tokenKey (a bearer token) or usernameKey and passwordKey (basic auth), not both",
            field_path=".tokenKey",
            check=lambda c: c.token_key is None or c.username_key is None))
@dataclasses.dataclass(frozen=True)
class MlflowCredentials:
    """Credentials of the MLflow tracking server (`spec.tracking.mlflow`): a bearer token, or a user
    name and password (basic auth). None of the three keys named: the key `token` is the token."""

    secret_name: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)]
    """A Secret in the job's namespace."""
    token_key: SecretKey | None = None
    """Its key holding a bearer token (`MLFLOW_TRACKING_TOKEN` in the trainer pod)."""
    username_key: SecretKey | None = None
    """Its key holding the basic-auth user name (`MLFLOW_TRACKING_USERNAME`); with `passwordKey`."""
    password_key: SecretKey | None = None
    """Its key holding the basic-auth password (`MLFLOW_TRACKING_PASSWORD`); with `usernameKey`."""


@dataclasses.dataclass(frozen=True)
class CredentialsSpec:
    """Credentials by reference: Secrets of the job's own namespace that reach the validation, trainer
    and serving pods as environment variables (`valueFrom.secretKeyRef`). The operator never reads
    or copies their values."""

    hub: HubCredentials | None = None
    """A hub token for `hf://` models (the hub endpoint itself is the platform's `hfEndpoint`)."""
    s3: S3Credentials | None = None
    """Object-store keys for `s3://` locations."""
    mlflow: MlflowCredentials | None = None
    """A token or user name and password for the MLflow tracking server of `spec.tracking.mlflow`
    (trainer pods only)."""
    service_account_name: Annotated[str, MaxLength(253), Pattern(DNS_SUBDOMAIN)] | None = None
    """Run the pods as this ServiceAccount of the namespace, for workload identity (EKS IRSA, GKE
    Workload Identity, Azure Workload Identity) instead of keys; it must be in the platform policy's
    `allowedServiceAccounts`."""


# --- spec.tracking -------------------------------------------------------------------------------

TrackingURI = Annotated[str, MinLength(1), MaxLength(2048), matches(
    "^https?://[^/?#]+(/.*)?$",
    "must be the http:// or https:// URL of the MLflow tracking server, e.g. http://mlflow.mlflow:5000"),
    _NO_CREDENTIALS_IN_URL_RULE]
"""An MLflow tracking server's base URL."""


@dataclasses.dataclass(frozen=True)
class MlflowTracking:
    """Log the run to an MLflow tracking server (its REST API; artifacts through its
    `mlflow-artifacts` proxy, so start it with artifact serving on)."""

    tracking_uri: TrackingURI
    """The server's base URL, e.g. `http://mlflow.mlflow:5000`, reachable from the trainer pod. No
    credentials in it: name a Secret in `spec.credentials.mlflow`."""
    experiment: Annotated[str, MinLength(1), MaxLength(500)] | None = None
    """The experiment (created when missing); absent: the job's namespace."""
    run_name: Annotated[str, MinLength(1), MaxLength(250)] | None = None
    """The run's name; absent: the job's name. A resumed attempt continues the same run."""


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """Experiment tracking: best effort, a tracking server that is down never fails training
    (`status.tracking` and the `Tracked` condition say so)."""

    mlflow: MlflowTracking | None = None
    """Log params, per-step metrics, test results and artifacts to this MLflow server."""


# --- the spec ------------------------------------------------------------------------------------


RUN_RULES: tuple[Rule, ...] = (
    Rule("!self.training.earlyStopping.enabled || !(self.training.earlyStopping.metric in ['valAccuracy', 'valF1']) "
         "|| self.dataset.format == 'classification'",
         "valAccuracy needs dataset.format classification (valF1 too); use valLoss or valPerplexity",
         field_path=".training.earlyStopping.metric",
         check=lambda j: (not j.training.early_stopping.enabled or j.dataset.format == "classification"
                          or j.training.early_stopping.metric not in ("valAccuracy", "valF1"))),
    Rule("!self.training.earlyStopping.enabled || has(self.dataset.validation) "
         "|| self.dataset.split.validation > 0.0",
         "early stopping needs validation data: set dataset.validation or dataset.split.validation > 0",
         field_path=".training.earlyStopping.enabled",
         check=lambda j: (not j.training.early_stopping.enabled or j.dataset.validation is not None
                          or j.dataset.split.validation > 0)),
    Rule("self.dataset.format == 'classification' || !has(self.evaluation.metrics) || "
         "self.evaluation.metrics.all(m, !(m in ['accuracy', 'precision', 'recall', 'f1']))",
         "accuracy, precision, recall and f1 need dataset.format classification",
         field_path=".evaluation.metrics",
         check=lambda j: j.dataset.format == "classification" or not set(j.evaluation.metrics) & set(CLASSIFICATION_METRICS)),
)
"""Rules across the sections that define the training run (`dataset`, `training`, `evaluation`): the
FineTuneJob's and the trainer config's (`kubetune.api.config.TrainerConfig`), which has the same sections."""


@rules(
    *RUN_RULES,
    Rule("!has(self.serving) || !has(self.serving.shareWith) || "
         "(has(self.method) && has(self.method.lora) && has(self.method.lora.merge) && !self.method.lora.merge)",
         "serving.shareWith loads this job's LoRA adapter into another job's server: it needs "
         "method.lora.merge: false (a merged or fully fine-tuned model is not an adapter)",
         field_path=".serving.shareWith",
         check=lambda j: j.serving is None or j.serving.share_with is None or (j.method.lora is not None
                                                                                and not j.method.lora.merge)),
)
@dataclasses.dataclass(frozen=True)
class FineTuneJobSpec:
    """FineTuneJobSpec is the desired fine-tuning run: a base model, a dataset, a method and how to
    train, evaluate, store and serve the result. Everything that defines the run is immutable once
    created; `suspend`, `serving` and the run-policy fields stay editable."""

    model: Annotated[ModelSpec, Immutable(_RUN_DEFINITION)]
    """The base model to fine-tune."""
    dataset: Annotated[DatasetSpec, Immutable(_RUN_DEFINITION)]
    """Training data: sources, format, field mapping, cleaning, split, class imbalance and
    curriculum."""
    output: Annotated[OutputSpec, Immutable(_RUN_DEFINITION)]
    """Where the model, metrics and checkpoints are written."""
    method: Annotated[MethodSpec, Immutable(_RUN_DEFINITION)] = dataclasses.field(default_factory=MethodSpec)
    """Full fine-tuning or LoRA."""
    hyperparameters: Annotated[Hyperparameters, Immutable(_RUN_DEFINITION)] = dataclasses.field(
        default_factory=Hyperparameters)
    """Optimisation settings; any may be automatic."""
    training: Annotated[TrainingSpec, Immutable(_RUN_DEFINITION)] = dataclasses.field(
        default_factory=TrainingSpec)
    """Precision, evaluation cadence, early stopping and checkpoints."""
    evaluation: Annotated[EvaluationSpec, Immutable(_RUN_DEFINITION)] = dataclasses.field(
        default_factory=EvaluationSpec)
    """The final evaluation on the test split."""
    resources: Annotated[ResourcesSpec, Immutable(
        "the trainer's resources shape the run (batch size, world size); create a new FineTuneJob")] | None = None
    """GPUs, CPU, memory and placement of the trainer pod, and an optional Kueue queue."""
    serving: ServingSpec | None = None
    """Serving of the finished model (editable)."""
    credentials: CredentialsSpec | None = None
    """Secrets (by reference) and a ServiceAccount for private models, data and storage (editable:
    pods created afterwards use the new references)."""
    tracking: TrackingSpec | None = None
    """Experiment tracking (MLflow) of the run (editable: trainer pods created afterwards use it)."""
    suspend: bool = False
    """Suspend the run (editable): the trainer pod is stopped after saving a checkpoint and
    resumes from it when set back to false."""
    backoff_limit: Annotated[int, Minimum(0), Maximum(100)] = 3
    """Retries of retryable trainer failures (each resumes from the latest checkpoint). Preemption
    and node drains do not count; bad data or config fail at once (editable)."""
    active_deadline_seconds: Annotated[int, Minimum(1)] | None = None
    """Fail the run when it has been running longer than this many seconds, retries included
    (editable)."""
    ttl_seconds_after_finished: Annotated[int, Minimum(0)] | None = None
    """Clean up training children (trainer and validation Jobs, their pods, the config ConfigMap and
    the progress Secret) this many seconds after the run succeeded or failed; absent keeps them
    (editable). The FineTuneJob, its status, the model in storage and serving are kept."""

    def resource_settings(self) -> ResourcesSpec:
        """The trainer's resources in effect (`spec.resources`; its defaults when absent: one CPU pod)."""
        return self.resources or ResourcesSpec()

    def serving_settings(self) -> ServingSpec:
        """Serving in effect (`spec.serving`; its defaults when absent: off)."""
        return self.serving or ServingSpec()

    def credential_settings(self) -> CredentialsSpec:
        """Credentials in effect (`spec.credentials`; none when absent)."""
        return self.credentials or CredentialsSpec()

    @classmethod
    def from_dict(cls, data: Any, path: str = "spec") -> FineTuneJobSpec:
        """The typed spec of `body["spec"]`, defaults applied; ValidationError names every bad field."""
        return apischema.parse(cls, data, path)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (camelCase keys); `from_dict` reads it back unchanged."""
        result: dict[str, Any] = apischema.to_dict(self)
        return result


# --- status ---------------------------------------------------------------------------------------


class Condition(TypedDict):
    """One observation of the job's state, per the Kubernetes API conventions."""

    type: Annotated[str, MaxLength(316), Pattern(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")]
    """Condition type: Validated, Running, Succeeded, Failed, Suspended, ServingReady, Stalled or Tracked."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[str, MaxLength(1024), Pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """Why, as a CamelCase word (e.g. TrainingComplete, PermanentError)."""
    message: Annotated[str, MaxLength(32768)]
    """Details for humans."""
    observedGeneration: NotRequired[Annotated[int, Minimum(0)]]
    """The spec generation this condition was computed from."""
    lastTransitionTime: RFC3339
    """When `status` last changed."""


class Progress(TypedDict, total=False):
    """How far the run is."""

    step: Annotated[int, Minimum(0)]
    """Optimizer steps done."""
    totalSteps: Annotated[int, Minimum(0)]
    """Optimizer steps the run will take (before early stopping)."""
    epoch: Annotated[float, Minimum(0)]
    """Epochs done, fractional."""
    percent: Annotated[float, Minimum(0), Maximum(100)]
    """step / totalSteps in percent (100 once the run completed)."""
    tokensSeen: Annotated[int, Minimum(0)]
    """Training tokens processed so far."""
    tokensPerSecond: Annotated[float, Minimum(0)]
    """Recent training throughput."""
    etaSeconds: Annotated[float, Minimum(0)]
    """Estimated seconds until training ends."""
    attempt: Annotated[int, Minimum(0)]
    """The attempt (retry number, from 0) these figures come from."""
    startStep: Annotated[int, Minimum(0)]
    """The step that attempt started at: 0, or the checkpoint it resumed from (stall detection starts
    its clock once `step` has moved past it)."""


class CheckpointRef(TypedDict, total=False):
    """A saved checkpoint."""

    step: Annotated[int, Minimum(0)]
    """Optimizer step it was saved at."""
    path: Annotated[str, MaxLength(2048)]
    """Where it is (inside the output storage)."""
    valLoss: float
    """Validation loss at that step, when evaluated."""
    time: RFC3339
    """When it was saved."""


class EvaluationPoint(TypedDict, total=False):
    """The validation figures at one step."""

    step: Annotated[int, Minimum(0)]
    """Optimizer step of the evaluation."""
    valLoss: float
    """Validation loss."""
    valPerplexity: float
    """Validation perplexity."""
    valTokenAccuracy: float
    """Next-token accuracy on the validation split."""
    valAccuracy: float
    """Classification accuracy on the validation split."""
    valF1: float
    """Macro-averaged classification F1 on the validation split."""


class LatestMetrics(TypedDict, total=False):
    """The latest training and validation figures."""

    trainLoss: float
    """Training loss (recent average)."""
    valLoss: float
    """Latest validation loss."""
    valPerplexity: float
    """Latest validation perplexity (exp of valLoss)."""
    learningRate: Annotated[float, Minimum(0)]
    """Current learning rate."""
    valAccuracy: float
    """Latest validation accuracy (classification: the most likely label is the prediction)."""
    valF1: float
    """Latest macro-averaged validation F1 (classification)."""
    evaluations: Annotated[list[EvaluationPoint], MaxItems(512), ListType("atomic")]
    """Every validation of the run, oldest first (the newest 512): the whole learning curve, which a
    FineTuneSweep prunes trials by."""
    bestCheckpoint: CheckpointRef
    """The checkpoint with the lowest validation loss so far."""


class ClassMetrics(TypedDict, total=False):
    """Test metrics of one class."""

    precision: float
    """Of the examples predicted as this class, the fraction that are."""
    recall: float
    """Of the examples of this class, the fraction predicted as it."""
    f1: float
    """Harmonic mean of precision and recall."""
    support: Annotated[int, Minimum(0)]
    """Test examples of this class."""


class ConfusionMatrix(TypedDict, total=False):
    """Counts of test examples by true and generated label."""

    labels: Annotated[list[Annotated[str, MaxLength(256)]], MaxItems(1000)]
    """The labels, in the order of the rows and columns."""
    matrix: Annotated[list[Annotated[list[Annotated[int, Minimum(0)]], MaxItems(1000)]], MaxItems(1000)]
    """matrix[true][generated]: how many test examples of label `true` got label `generated`."""


class TestMetrics(TypedDict, total=False):
    """Metrics of one model on the test split."""

    loss: float
    """Mean token loss on the test completions/text."""
    perplexity: float
    """exp(loss)."""
    tokenAccuracy: float
    """Fraction of target tokens predicted exactly (greedy)."""
    accuracy: float
    """Classification: fraction of test examples whose label was generated correctly."""
    precision: float
    """Classification: macro-averaged precision."""
    recall: float
    """Classification: macro-averaged recall."""
    f1: float
    """Classification: macro-averaged F1."""
    examples: Annotated[int, Minimum(0)]
    """Test examples evaluated."""
    perClass: Annotated[dict[str, ClassMetrics], MaxProperties(1000)]
    """Classification: metrics per label."""
    confusionMatrix: ConfusionMatrix
    """Classification: counts of true label (row) against generated label (column)."""


class Improvement(TypedDict, total=False):
    """How much better the fine-tuned model did than the base model on the same test split; 0 means
    fine-tuning did not help, negative that it hurt."""

    perplexityDrop: float
    """Relative perplexity drop, (base - tuned) / base: 0.3 means 30% lower."""
    lossDrop: float
    """Test loss of the base model minus that of the tuned one, nats per token."""
    tokenAccuracyGain: float
    """Token accuracy gain, percentage points."""
    accuracyGain: float
    """Classification: accuracy gain, percentage points."""
    f1Gain: float
    """Classification: macro F1 gain, percentage points."""


class EvaluationResults(TestMetrics, total=False):
    """Metrics on the test split, after training. The trainer may report further metrics; they are kept."""

    baseline: Annotated[TestMetrics, PreserveUnknownFields()]
    """The base model's metrics on the same test split, measured before training
    (`spec.evaluation.baseline`)."""
    improvement: Improvement
    """Tuned against base: relative perplexity drop, accuracy and F1 gains in points."""


class SampleAnswer(TypedDict, total=False):
    """One test prompt answered by the base model and by the fine-tuned one."""

    prompt: Annotated[str, MaxLength(1000)]
    """The test prompt (the user's message, the prompt, the classified text or a text's start)."""
    reference: Annotated[str, MaxLength(1000)]
    """The test split's own answer."""
    base: Annotated[str, MaxLength(1000)]
    """The base model's greedy answer, before training."""
    tuned: Annotated[str, MaxLength(1000)]
    """The fine-tuned model's greedy answer."""


class ModelArtifact(TypedDict, total=False):
    """The finished model."""

    uri: Annotated[str, MaxLength(2048)]
    """Where it is, e.g. `pvc://models/finetunes/my-job/model`."""
    digest: Annotated[str, MaxLength(128)]
    """Content digest (sha256 over the model files), to tell models apart and verify copies."""


class ResolvedHyperparameters(TypedDict, total=False):
    """The hyperparameters the run actually uses, `auto` values resolved."""

    epochs: float
    """Epochs."""
    batchSize: int
    """Per-device micro-batch."""
    learningRate: float
    """Peak learning rate."""
    scheduler: Annotated[str, MaxLength(64)]
    """Learning-rate schedule."""
    warmupRatio: float
    """Warmup fraction."""
    weightDecay: float
    """AdamW weight decay."""
    dropout: float
    """Dropout override (absent: the model's own)."""
    maxSeqLength: int
    """Tokens per sequence."""
    gradientAccumulationSteps: int
    """Micro-batches per optimizer step."""
    seed: int
    """Seed."""
    automatic: Annotated[list[Annotated[str, MaxLength(64)]], MaxItems(32)]
    """Names of the fields that were automatic."""
    worldSize: int
    """Training processes of the run (devices per pod × pods)."""
    globalBatchSize: int
    """Sequences per optimizer step over the whole run: batchSize × worldSize ×
    gradientAccumulationSteps."""


class ResourceEstimate(TypedDict, total=False):
    """The operator's estimate of the run, made from the dataset-validation pod's facts before training
    starts (formula in docs/sizing.md)."""

    trainMemoryBytesPerDevice: Annotated[int, Minimum(0)]
    """Peak training memory on each device (each GPU, or the CPU pod), bytes."""
    serveMemoryBytes: Annotated[int, Minimum(0)]
    """Memory to serve the model (weights plus a KV cache for 8 sequences), bytes."""
    tokensToProcess: Annotated[int, Minimum(0)]
    """Training tokens the run will process: dataset tokens × epochs."""
    gpus: Annotated[int, Minimum(0)]
    """GPUs the trainer pod gets (`resources.gpus: auto` resolved; 0 = CPU)."""
    gpuType: Annotated[str, MaxLength(253)]
    """The GPU type chosen from the platform's `gpuTypes` (absent on CPU or when none are listed)."""
    etaSeconds: Annotated[float, Minimum(0)]
    """Estimated training time from FLOPs and the device's throughput (rough: ±2×)."""
    message: Annotated[str, MaxLength(1024)]
    """The recommendation in words."""


class UsageAttempt(TypedDict, total=False):
    """One pod of the job, as it really ran."""

    pod: Annotated[str, MaxLength(253)]
    """The pod's name."""
    kind: Literal["training", "validation"]
    """What the pod did."""
    startTime: RFC3339
    """When the kubelet started it."""
    finishTime: RFC3339
    """When its last container ended (absent while it runs)."""
    accelerators: Annotated[int, Minimum(0)]
    """Accelerators (nvidia.com/gpu and other `*/gpu`, `*/tpu` resources) its containers were allocated."""
    cpus: Annotated[float, Minimum(0)]
    """CPUs its containers requested (else their limit)."""
    acceleratorSeconds: Annotated[float, Minimum(0)]
    """accelerators × seconds from start to finish (to `lastUpdated` while it runs)."""
    cpuSeconds: Annotated[float, Minimum(0)]
    """cpus × the same seconds."""
    tokensProcessed: Annotated[int, Minimum(0)]
    """Training tokens this pod processed, from the trainer's termination message (absent when it
    wrote none: a pod killed without warning)."""


class UsageTotals(TypedDict, total=False):
    """Device time of one kind of work."""

    acceleratorSeconds: Annotated[float, Minimum(0)]
    """Accelerator-seconds."""
    cpuSeconds: Annotated[float, Minimum(0)]
    """CPU-seconds."""


class FoldedUsage(UsageTotals, total=False):
    """Totals of entries no longer listed individually."""

    attempts: Annotated[int, Minimum(0)]
    """Pods folded in."""
    tokensProcessed: Annotated[int, Minimum(0)]
    """Their tokens."""


class EarlierUsage(TypedDict, total=False):
    """Pods and serving slices folded out of the lists (oldest first, past 64 pods or 32 slices)."""

    training: FoldedUsage
    """Training pods."""
    validation: FoldedUsage
    """Validation pods."""
    serving: FoldedUsage
    """Serving slices."""


class ServingSlice(TypedDict, total=False):
    """A stretch of time with a constant number of ready serving replicas."""

    start: RFC3339
    """When the slice began."""
    end: RFC3339
    """When it ended (absent: still open)."""
    replicas: Annotated[int, Minimum(0)]
    """Ready replicas of the serving Deployment."""
    acceleratorsPerReplica: Annotated[int, Minimum(0)]
    """Accelerators of each replica's pod template."""
    cpusPerReplica: Annotated[float, Minimum(0)]
    """CPUs each replica requested."""


class Usage(TypedDict, total=False):
    """What the job really used, from its pods' start and finish times and allocated devices (not
    from the spec); kept in status so that it survives operator restarts and scrape gaps."""

    attempts: Annotated[list[UsageAttempt], MaxItems(64), ListType("atomic")]
    """Every training and dataset-validation pod, oldest first."""
    servingSlices: Annotated[list[ServingSlice], MaxItems(33), ListType("atomic")]
    """Serving time in slices of constant ready replicas, oldest first; the last may be open."""
    earlier: EarlierUsage
    """Totals of pods and slices no longer listed."""
    training: UsageTotals
    """Training pods, summed."""
    validation: UsageTotals
    """Dataset-validation pods, summed."""
    serving: UsageTotals
    """Serving replicas, summed."""
    tokensProcessed: Annotated[int, Minimum(0)]
    """Training tokens processed, summed over the training pods' termination messages."""
    trainingAttempts: Annotated[int, Minimum(0)]
    """Training pods that ran."""
    lastUpdated: RFC3339
    """When these figures were brought up to date (open intervals count up to here)."""


class LastProgress(TypedDict, total=False):
    """The last time the operator saw the running trainer's step advance (stall detection)."""

    pod: Annotated[str, MaxLength(253)]
    """The trainer pod."""
    step: Annotated[int, Minimum(0)]
    """Its step then."""
    time: RFC3339
    """When the operator first saw that step."""
    armed: bool
    """Whether the pod has moved the step since it started: the stall clock runs only then (loading
    the model and the baseline evaluation come before its first step)."""


class TrackingStatus(TypedDict, total=False):
    """Where the run is logged for experiment tracking, as the trainer last said."""

    state: Literal["ok", "unavailable"]
    """`ok`: the run is logged; `unavailable`: the tracking server could not be reached or refused,
    and the trainer went on without tracking for that attempt."""
    message: Annotated[str, MaxLength(1024)]
    """Details, naming the tracking URI."""
    runId: Annotated[str, MaxLength(256)]
    """The MLflow run (one for all attempts of the job)."""
    experimentId: Annotated[str, MaxLength(256)]
    """Its experiment."""
    url: Annotated[str, MaxLength(2048)]
    """The run's page on the tracking server."""


class LineageEntry(TypedDict, total=False):
    """One model in the chain a job trained on from."""

    job: Annotated[str, MaxLength(253)]
    """The FineTuneJob that produced the model; absent for the original base model."""
    uri: Annotated[str, MaxLength(2048)]
    """The model's location (`status.model.uri` of that job, or the base model's `spec.model.source`)."""
    digest: Annotated[str, MaxLength(128)]
    """Its content digest, when known."""


class FineTuneJobStatus(TypedDict, total=False):
    """FineTuneJobStatus is the observed state of the run, written by the operator only."""

    phase: Phase
    """One-word summary for `kubectl get` (the Status column), derived from the conditions:
    Succeeded, Failed, Pruned (ended by a FineTuneSweep), Suspended, Running, Validating or Pending.
    Conditions hold the details."""
    conditions: Annotated[list[Condition], MaxItems(16), ListType("map", ("type",))]
    """Validated, Running, Succeeded, Failed, Suspended, ServingReady, Stalled and Tracked, per the Kubernetes API
    conventions."""
    observedGeneration: Annotated[int, Minimum(0)]
    """The spec generation the status reflects."""
    startTime: RFC3339
    """When the first trainer pod started."""
    completionTime: RFC3339
    """When the run succeeded or failed."""
    attempts: Annotated[int, Minimum(0)]
    """Trainer pods started so far (retries included)."""
    progress: Progress
    """How far training is."""
    metrics: LatestMetrics
    """The latest training and validation figures."""
    checkpoints: Annotated[list[CheckpointRef], MaxItems(100), ListType("atomic")]
    """Recent checkpoints, oldest first."""
    results: Annotated[EvaluationResults, PreserveUnknownFields()]
    """Metrics on the test split, after training."""
    model: ModelArtifact
    """The finished model."""
    endpoint: Annotated[str, MaxLength(2048)]
    """Base URL of the OpenAI-compatible serving endpoint (inside the cluster)."""
    servedBy: Annotated[str, MaxLength(253)]
    """With `spec.serving.shareWith`: the serving Deployment that serves this job's adapter (as
    model `<this job's name>`); absent otherwise."""
    resolved: ResolvedHyperparameters
    """The hyperparameters in effect, `auto` values resolved by the trainer."""
    estimate: ResourceEstimate
    """Memory, tokens, GPUs and ETA estimated before training starts."""
    samples: Annotated[list[SampleAnswer], MaxItems(20), ListType("atomic")]
    """Test prompts with the base and the fine-tuned model's answers (`spec.evaluation.samples`)."""
    usage: Usage
    """Accelerator- and CPU-seconds of training, validation and serving, and tokens processed, from
    what really ran (docs/operator.md, Usage)."""
    lastProgress: LastProgress
    """The trainer's step as last seen advancing (with `spec.training.stallTimeoutSeconds`)."""
    tracking: TrackingStatus
    """With `spec.tracking`: the tracking run and whether logging to it works (the `Tracked` condition)."""
    lineage: Annotated[list[LineageEntry], MaxItems(64), ListType("atomic")]
    """Where the base model came from, oldest first: the original base model, then each FineTuneJob
    trained on from it (`spec.model.fromJob`), ending with the model this job started from."""


def status_from_dict(data: Any, path: str = "status") -> FineTuneJobStatus:
    """The status of `body["status"]`, checked against the schema; ValidationError names every bad field."""
    return apischema.parse(FineTuneJobStatus, data, path)
