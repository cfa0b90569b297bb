"""The built-in server's model side: find the model on disk, load it, generate text.

`resolve_model_source(path)` looks at what `--model` points to and decides how
to load it (no weights are read, so it is fast and runs before the port opens):

- a transformers model folder (`config.json` + weights + tokenizer);
- a trainer output folder holding `model/` and/or `adapter/` (the trainer's
  output contract; when both exist and the adapter's base is `model/`, the
  adapter is applied on top of it, otherwise `model/` is the merged model);
- a peft adapter folder (`adapter_config.json` whose `base_model_name_or_path`
  is a local folder: the base is loaded and the adapter merged into it);
- a `.gguf` checkpoint file (or a folder holding exactly one), loaded with
  transformers' `gguf_file` support (dequantised into a regular torch model).

`load_engine(source, ...)` reads the weights and returns an `Engine`. Its
`generate_batch` decodes several prompts together: left-padded into one batch
with a KV cache, one forward pass per step for every row still generating, each
row with its own sampling settings, seed, stop sequences and token sink, and
leaving the batch the moment it is done. `generate` is a batch of one. Torch
and transformers are imported only when loading, so the server can open its
port (and answer /healthz) while they import.

Concurrency: `generate_batch` holds a lock for the whole batch; the server's
batch scheduler (`serve/batch.py`) gathers concurrent requests into batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubetune.trainer.serve.protocol import ChatMessage, FinishReason

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
SourceKind = Literal["transformers", "adapter", "gguf"]


class ModelSourceError(ValueError):
    """`--model` does not point to something the server can load; the message says why."""


class ChatTemplateMissing(Exception):
    """The tokenizer has no chat template and none was given with --chat-template."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the weights, adapter and tokenizer are, decided from the `--model` path."""

    kind: SourceKind
    """How to load: a transformers folder, base + peft adapter, or a GGUF file."""
    weights_dir: Path
    """Folder passed to `from_pretrained` for the (base) model."""
    tokenizer_dir: Path
    """Folder the tokenizer loads from (the adapter folder when it carries one)."""
    default_name: str
    """The served model name when `--served-model-name` is not given."""
    gguf_file: str | None = None
    """File name inside `weights_dir` for a GGUF checkpoint."""
    adapter_dir: Path | None = None
    """The peft adapter folder, for kind `adapter`."""

    def describe(self) -> str:
        """One line for the log: what will be loaded from where."""
        if self.kind == "gguf":
            return f"GGUF checkpoint {self.weights_dir / str(self.gguf_file)}"
        if self.kind == "adapter":
            return f"base model {self.weights_dir} + peft adapter {self.adapter_dir}"
        return f"transformers model {self.weights_dir}"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _adapter_base(adapter_dir: Path) -> Path:
    """The local base-model folder an adapter's `adapter_config.json` names."""
    config_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"--model: cannot read {config_path}: {error}") from error
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelSourceError(f"--model: {config_path} has no base_model_name_or_path; the server needs a local base model")
    candidates = [Path(base)] if Path(base).is_absolute() else [adapter_dir / base, Path.cwd() / base]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise ModelSourceError(
        f"--model: {config_path} names base model {base!r}, which is not a local model folder with config.json "
        f"(looked at {', '.join(str(c) for c in candidates)}); this server loads local models only, no hub access"
    )


def _adapter_source(adapter_dir: Path, name: str) -> ModelSource:
    base = _adapter_base(adapter_dir)
    return ModelSource(
        kind="adapter",
        weights_dir=base,
        tokenizer_dir=adapter_dir if _has_tokenizer(adapter_dir) else base,
        default_name=name,
        adapter_dir=adapter_dir,
    )


def _gguf_source(file: Path, name: str) -> ModelSource:
    return ModelSource(kind="gguf", weights_dir=file.parent, tokenizer_dir=file.parent, default_name=name, gguf_file=file.name)


def _trainer_output_source(folder: Path) -> ModelSource | None:
    """A trainer output folder (`model/`, `adapter/`), or None when `folder` is not one."""
    model_dir, adapter_dir = folder / "model", folder / "adapter"
    has_model = (model_dir / "config.json").is_file()
    has_adapter = (adapter_dir / "adapter_config.json").is_file()
    if has_adapter and (not has_model or _adapter_base(adapter_dir) == model_dir.resolve()):
        return _adapter_source(adapter_dir, folder.name)
    if has_model:
        return ModelSource(kind="transformers", weights_dir=model_dir, tokenizer_dir=model_dir, default_name=folder.name)
    return None


MAIN_ADAPTER = "main"
"""peft name of the adapter `--model` itself points to, when more adapters are loaded beside it."""


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """One more LoRA adapter to serve over the main model's base (`--adapter NAME=PATH`)."""

    name: str
    """The `model` name requests select it by."""
    path: Path
    """The peft adapter folder (`adapter_config.json` + weights)."""


def resolve_adapter(spec: str, source: ModelSource) -> AdapterSource:
    """Parse `NAME=PATH` and check the adapter applies to the base `source` loads; ModelSourceError if not."""
    name, sep, raw_path = spec.partition("=")
    if not sep or not name.strip() or not raw_path.strip():
        raise ModelSourceError(f"--adapter: expected NAME=PATH, got {spec!r}")
    if name == MAIN_ADAPTER or name.startswith("__"):
        raise ModelSourceError(f"--adapter {spec}: the name {name!r} is reserved")
    path = Path(raw_path).expanduser().absolute()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"  # a trainer output folder with an unmerged adapter
    if not (path / "adapter_config.json").is_file():
        raise ModelSourceError(f"--adapter {spec}: {path} has no adapter_config.json (not a peft adapter folder)")
    if source.kind == "gguf":
        raise ModelSourceError(f"--adapter {spec}: adapters are served over transformers models, not GGUF files")
    base = _adapter_base(path)
    if base != source.weights_dir.resolve():
        raise ModelSourceError(f"--adapter {spec}: its base model is {base}, but this server's base is "
                               f"{source.weights_dir.resolve()}; an adapter only applies to the base it was trained on")
    return AdapterSource(name=name, path=path)


def resolve_model_source(path: str | Path) -> ModelSource:
    """Decide how to load `path` (see the module docstring); raise `ModelSourceError` if it cannot be served."""
    target = Path(path).expanduser().absolute()
    if not target.exists():
        raise ModelSourceError(f"--model: no such file or folder: {target}")
    if target.is_file():
        if target.suffix != ".gguf":
            raise ModelSourceError(f"--model: a file must be a .gguf checkpoint, got {target.name}")
        return _gguf_source(target, target.stem)
    if (target / "adapter_config.json").is_file():
        return _adapter_source(target, target.name)
    if (target / "config.json").is_file():
        return ModelSource(kind="transformers", weights_dir=target, tokenizer_dir=target, default_name=target.name)
    trainer_output = _trainer_output_source(target)
    if trainer_output is not None:
        return trainer_output
    ggufs = sorted(target.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0], target.name)
    raise ModelSourceError(
        f"--model: {target} is not a model folder: expected config.json (a transformers model), "
        "adapter_config.json (a peft adapter), model/ or adapter/ (a trainer output), or one .gguf file"
        + (f"; found {len(ggufs)} .gguf files, pass one of them" if ggufs else "")
    )


# --- Generation -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Resolved settings for one generation (limits already checked by the server)."""

    max_new_tokens: int
    """Most tokens to generate (OpenAI's max_tokens)."""
    temperature: float = 1.0
    """0 = greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 = off."""
    stop: tuple[str, ...] = ()
    """Stop sequences; the text ends before the first one found."""
    seed: int | None = None
    """Seed for torch's RNG before sampling; None = leave the RNG as it is."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one generation produced."""

    text: str
    """The completion text (stop sequence and special tokens removed)."""
    completion_tokens: int
    """Tokens generated, counting an end-of-sequence token the model chose."""
    finish_reason: FinishReason
    """`stop` (end of sequence or a stop sequence) or `length` (max_new_tokens reached)."""


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` must not be streamed yet.

    Those that could be the start of a stop sequence (a later token may
    complete it, and then they must not appear), and a trailing U+FFFD from a
    multi-byte character whose remaining bytes are in the next token.
    """
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    trailing_replacement = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, trailing_replacement)


class TokenSink:
    """Receives generated tokens from `generate` (as its streamer) and decides when to stop.

    It is the single source of truth for a generation: it counts tokens,
    detects end-of-sequence tokens and stop sequences, truncates the text at a
    stop sequence, and hands out text pieces that are safe to stream. Tokens
    arriving after it decided to stop (`generate` may run a step further
    before the stopping criterion sees `done`) are ignored.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self._decode = decode
        self._eos_ids = eos_ids
        self._params = params
        self._on_text = on_text
        self._prompt_skipped = False
        self._text_tokens: list[int] = []
        self.tokens = 0
        """Tokens accepted so far (including an end-of-sequence token)."""
        self.text = ""
        """Decoded completion so far (truncated at a stop sequence once found)."""
        self.emitted = 0
        """Characters of `text` already handed to `on_text`."""
        self.finish_reason: FinishReason | None = None
        """Set once generation must end."""

    @property
    def done(self) -> bool:
        """True once an end-of-sequence token, a stop sequence or max_new_tokens was reached."""
        return self.finish_reason is not None

    def put(self, value: torch.Tensor) -> None:
        """`generate`'s streamer hook: first the prompt (skipped), then each new token."""
        if not self._prompt_skipped:
            self._prompt_skipped = True
            return
        for token in value.reshape(-1).tolist():
            self.add(int(token))

    def end(self) -> None:
        """`generate` finished; if no stop condition fired, it ran out of tokens."""
        if not self.done:
            self._finish("length")

    def add(self, token: int) -> None:
        """Accept one generated token."""
        if self.done:
            return
        self.tokens += 1
        if token in self._eos_ids:
            self._finish("stop")
            return
        self._text_tokens.append(token)
        text = self._decode(self._text_tokens)
        found = [i for i in (text.find(stop) for stop in self._params.stop) if i >= 0]
        if found:
            self.text = text[: min(found)]
            self._finish("stop")
            return
        self.text = text
        if self.tokens >= self._params.max_new_tokens:
            self._finish("length")
            return
        self._emit(len(text) - held_back_length(text, self._params.stop))

    def result(self) -> GenerationResult:
        """The finished generation."""
        return GenerationResult(text=self.text, completion_tokens=self.tokens, finish_reason=self.finish_reason or "length")

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self._emit(len(self.text))

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            piece = self.text[self.emitted : end]
            self.emitted = end
            if self._on_text is not None:
                self._on_text(piece)


BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""


class GenerationRequest:
    """One prompt in a generation batch: its settings, its token sink and how its caller hears back.

    Created on the server's event loop; `begin`, `step`, `fail` run on the
    generation thread. `future` resolves with the `GenerationResult` as soon as
    this row is finished, even while other rows of its batch go on.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
        adapter: str | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        """The prompt's token ids (checked against the vocabulary and context by the server)."""
        self.params = params
        """Resolved sampling and stopping settings."""
        self.on_text = on_text
        """Receives text pieces once they are final (on the generation thread)."""
        self.cancelled = cancelled or threading.Event()
        """Set when the client went away: the row leaves the batch at the next token."""
        self.adapter = adapter
        """LoRA adapter to generate with (None: the base model)."""
        self.future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        """The result, or the exception that ended the batch."""
        self.generator: torch.Generator | None = None
        """This row's random generator (seeded from `params.seed` when given)."""
        self._sink: TokenSink | None = None

    def begin(self, engine: Engine) -> None:
        """Set up the token sink and the random generator; the batch is about to start."""
        import torch

        self._sink = TokenSink(engine.decode, engine.eos_ids, self.params, self.on_text)
        if self.params.temperature > 0:
            self.generator = torch.Generator(device=engine.device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        if self.cancelled.is_set():
            self._complete()

    def step(self, token: int) -> bool:
        """Accept the row's next token; True once the row is finished (its future is then resolved)."""
        sink = self._sink
        assert sink is not None, "begin() first"
        if self.future.done():
            return True
        sink.add(token)
        if sink.done or self.cancelled.is_set():
            self._complete()
            return True
        return False

    def fail(self, error: BaseException) -> None:
        """The batch broke: hand the error to a caller still waiting."""
        if not self.future.done():
            self.future.set_exception(error if isinstance(error, Exception) else RuntimeError(repr(error)))

    def result(self) -> GenerationResult:
        """The finished generation (blocks until it is)."""
        return self.future.result()

    def _complete(self) -> None:
        assert self._sink is not None
        self._sink.end()
        if not self.future.done():
            self.future.set_result(self._sink.result())


@dataclasses.dataclass
class _RunningBatch:
    """The rows being decoded together and their shared state between two steps."""

    rows: list[GenerationRequest]
    cache: Any
    """The KV cache (transformers DynamicCache), one batch row per request."""
    mask: torch.Tensor
    """(rows, cached length): 1 where a row has a token, 0 for its left padding."""
    last_position: torch.Tensor
    """(rows, 1): each row's position of its last token."""
    tokens: torch.Tensor
    """(rows,): each row's latest token, the next step's input."""

    @staticmethod
    def merge(running: _RunningBatch, joining: _RunningBatch | None) -> _RunningBatch:
        """`running` with the rows of `joining` added: the shorter cache is left-padded (masked) to the longer."""
        import torch
        import torch.nn.functional as F

        if joining is None:
            return running
        old_length, new_length = running.mask.shape[1], joining.mask.shape[1]
        length = max(old_length, new_length)
        for old, new in zip(running.cache.layers, joining.cache.layers, strict=True):
            # keys/values: (rows, heads, length, head_dim); pad dim -2 on the left.
            old.keys = torch.cat([F.pad(old.keys, (0, 0, length - old_length, 0)),
                                  F.pad(new.keys, (0, 0, length - new_length, 0))], dim=0)
            old.values = torch.cat([F.pad(old.values, (0, 0, length - old_length, 0)),
                                    F.pad(new.values, (0, 0, length - new_length, 0))], dim=0)
        mask = torch.cat([F.pad(running.mask, (length - old_length, 0)),
                          F.pad(joining.mask, (length - new_length, 0))], dim=0)
        return _RunningBatch(running.rows + joining.rows, running.cache, mask,
                             torch.cat([running.last_position, joining.last_position]),
                             torch.cat([running.tokens, joining.tokens]))


class Engine:
    """A loaded model and tokenizer, and one-at-a-time generation on them."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        chat_template: str | None = None,
        threads: int = 0,
    ) -> None:
        self.model = model
        """The transformers causal LM, in eval mode on `device`."""
        self.tokenizer = tokenizer
        """Its tokenizer."""
        self.device = device
        """Where the model runs (`cpu`, `cuda`, `cuda:0`, ...)."""
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        """Jinja template for chat prompts (the tokenizer's, unless --chat-template overrides it)."""
        self.context_length = _context_length(model, tokenizer)
        """Most tokens (prompt + completion) the model takes; None if it does not say."""
        self.vocab_size = max(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or 0))
        """Token ids must be below this."""
        self.eos_ids = _eos_ids(model, tokenizer)
        """Token ids that end a generation."""
        self.pad_id = _pad_id(model, tokenizer, self.eos_ids)
        """Padding id for left-padded batches (masked out, never attended to)."""
        self.longest_token_chars = _longest_token_chars(tokenizer)
        """Characters in the vocabulary's longest token: bounds a prompt's token count from its length."""
        self.adapter_names: tuple[str, ...] = ()
        """LoRA adapters loaded unmerged over the base, selectable per request; () for a plain model."""
        self.threads = threads
        """Torch intra-op threads the generating thread uses (0: leave torch's setting)."""
        self._cache_argument = _cache_argument(model)
        self._lock = threading.Lock()

    def add_adapter(self, adapter: AdapterSource) -> None:
        """Load one more LoRA adapter over the base while serving (on the generation thread, between
        batches). A model without adapters gets peft's wrapper; its own requests then run with the
        wrapper's base (no adapter), which computes what the plain model does."""
        from peft import PeftModel

        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter.path, adapter_name=adapter.name)
            else:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.name)
            self.model.to(self.device)
            self.model.eval()
            self.adapter_names = (*[n for n in self.adapter_names if n != adapter.name], adapter.name)
        log.info("loaded LoRA adapter %r from %s", adapter.name, adapter.path)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter added while serving (nothing routes to it any more)."""
        with self._lock:
            if name not in self.adapter_names:
                return
            remaining = tuple(n for n in self.adapter_names if n != name)
            if not remaining:
                # peft's wrapper needs one adapter: the last stays in memory, unrouted, until replaced.
                log.info("LoRA adapter %r is no longer served (kept in memory: it is the last one)", name)
                return
            self.model.delete_adapter(name)
            self.adapter_names = remaining
        log.info("removed LoRA adapter %r", name)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's special tokens, e.g. BOS)."""
        ids: list[int] = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [int(self.tokenizer.bos_token_id)]  # an empty prompt: start from BOS
        return ids

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the assistant's turn."""
        if not self.chat_template:
            raise ChatTemplateMissing("this model has no chat template; use /v1/completions or start the server with --chat-template")
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        # The template writes the special tokens itself; do not add BOS again.
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate a completion of `prompt_ids`; blocking, call from a worker thread.

        `on_text` receives text pieces as they become final (called on this
        thread). Setting `cancelled` stops the generation at the next token.
        A batch of one: the same decoding path as batched requests.
        """
        request = GenerationRequest(list(prompt_ids), params, on_text, cancelled or threading.Event())
        self.generate_batch([request])
        return request.result()

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        more: Callable[[int], list[GenerationRequest]] | None = None,
        capacity: int = 0,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """Generate completions for several prompts at once; blocking, call from a worker thread.

        The prompts are left-padded into one batch (masked, with per-row
        positions), so each row computes what it would alone; every decoding
        step runs the model once for all rows still generating. A row leaves
        the batch as soon as it is finished (end of sequence, stop sequence,
        max_tokens, or cancelled) and its future resolves then, so a short
        answer is not held back by a long one. Between steps, `more(n)` may
        hand over up to n new requests (while fewer than `capacity` rows run):
        they are prefilled on their own and join the running batch, their
        caches aligned on the left (continuous batching). Sampling uses a
        random generator per row, seeded from the request's `seed`, so a
        seeded request draws the same tokens whatever else shares its batch.
        `on_step(rows)` is told how many rows each decoding step ran.
        """
        import torch

        if not requests:
            return
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # per calling thread for OpenMP: set where generation runs
        with self._lock, torch.inference_mode():
            rows = list(requests)
            try:
                self._decode(rows, more, capacity, on_step)
            except BaseException as error:
                for request in rows:  # `rows` grows with the requests that joined
                    request.fail(error)
                raise

    def _decode(self, rows: list[GenerationRequest], more: Callable[[int], list[GenerationRequest]] | None,
                capacity: int, on_step: Callable[[int], None] | None) -> None:
        import torch

        batch = self._prefill(list(rows))
        while batch is not None:
            if more is not None and len(batch.rows) < capacity and self._can_join(batch.cache):
                joining = more(capacity - len(batch.rows))
                if joining:
                    rows.extend(joining)
                    batch = _RunningBatch.merge(batch, self._prefill(joining))
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
            positions = batch.last_position + 1
            if on_step is not None:
                on_step(len(batch.rows))
            logits = self._forward(batch.tokens[:, None], mask, positions, batch.cache, batch.rows)
            batch = self._advance(_RunningBatch(batch.rows, batch.cache, mask, positions, batch.tokens), logits)

    def _prefill(self, rows: list[GenerationRequest]) -> _RunningBatch | None:
        """Run the prompts of `rows` (left-padded) and take their first tokens; None if all are done."""
        import torch

        for request in rows:
            request.begin(self)
        longest = max(len(r.prompt_ids) for r in rows)
        pad = self.pad_id if self.pad_id is not None else 0
        # Shapes: (rows, longest); prompts right-aligned so every row's next token is the last column.
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, request in enumerate(rows):
            input_ids[index, longest - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[index, longest - len(request.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(input_ids, mask, positions, cache, rows)
        return self._advance(_RunningBatch(rows, cache, mask, positions[:, -1:], input_ids[:, -1]), logits)

    def _advance(self, batch: _RunningBatch, logits: torch.Tensor) -> _RunningBatch | None:
        """Choose every row's next token, hand it to the row, and drop the rows that are done."""
        import torch

        tokens = self._choose(logits, batch.rows)
        chosen = tokens.tolist()  # one device-to-host copy for the whole batch, not one per row
        keep = [i for i, request in enumerate(batch.rows) if not request.step(chosen[i])]
        if not keep:
            return None
        if len(keep) == len(batch.rows):
            return _RunningBatch(batch.rows, batch.cache, batch.mask, batch.last_position, tokens)
        index = torch.tensor(keep, dtype=torch.long, device=tokens.device)
        batch.cache.batch_select_indices(index)
        return _RunningBatch([batch.rows[i] for i in keep], batch.cache, batch.mask[index],
                             batch.last_position[index], tokens[index])

    @staticmethod
    def _can_join(cache: Any) -> bool:
        """Rows can join only a cache of plain growing layers (not sliding windows, not static)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 rows: Sequence[GenerationRequest]) -> torch.Tensor:
        """Next-token logits (rows, vocab) in float32; the cache grows by the new tokens."""
        kwargs: dict[str, Any] = {self._cache_argument: cache}
        if self.adapter_names:
            kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in rows]
        output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **kwargs)
        return output.logits[:, -1, :].float()

    @staticmethod
    def _choose(logits: torch.Tensor, rows: Sequence[GenerationRequest]) -> torch.Tensor:
        """The next token of every row: argmax when greedy, else a draw with the row's own generator."""
        import torch

        chosen = logits.argmax(dim=-1)
        for index, request in enumerate(rows):
            params = request.params
            if params.temperature <= 0:
                continue
            probs = torch.softmax(logits[index] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            chosen[index] = torch.multinomial(probs, 1, generator=request.generator).squeeze(0)
        return chosen

def _longest_token_chars(tokenizer: Any) -> int:
    """The longest token's length in characters (byte-level vocabularies write one character per byte)."""
    try:
        vocabulary = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        vocabulary = {}
    return max((len(str(token)) for token in vocabulary), default=64) or 1


def _cache_argument(model: Any) -> str:
    """The name `forward` takes the KV cache by (`cache` in recent transformers, `past_key_values` before)."""
    import inspect

    # A peft wrapper passes keyword arguments through to the transformers model it wraps.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _context_length(model: Any, tokenizer: Any) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30).
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def _as_id_set(value: object) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids = _as_id_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids |= _as_id_set(getattr(model.config, "eos_token_id", None))
    ids |= _as_id_set(tokenizer.eos_token_id)
    return frozenset(ids)


def _pad_id(model: Any, tokenizer: Any, eos_ids: frozenset[int]) -> int | None:
    for candidate in (getattr(getattr(model, "generation_config", None), "pad_token_id", None), tokenizer.pad_token_id):
        if isinstance(candidate, int):
            return candidate
    return min(eos_ids) if eos_ids else None


# --- Loading --------------------------------------------------------------------


def resolve_device(device: Device) -> str:
    """`auto` = CUDA when available, else CPU; asking for CUDA without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("--device: cuda was requested but no CUDA device is available")
    return device


def resolve_threads(threads: int, device: str) -> int:
    """Torch intra-op threads for generation; `threads` 0 = auto.

    Auto on CPU is the cores this process may use minus one, at least one: the
    event loop (HTTP, streaming, JSON) needs a core of its own, and torch's
    threads wait for each other at every operation, so a thread that loses its
    core to the event loop (or to a neighbour on a shared machine) stalls them
    all. Measured on the tiny model on a shared 2-core machine, same process and
    minute: 8 rows at about 2,700 tokens/s with one thread, 48-445 with two.
    On GPU the host threads matter little; torch's default is kept.
    """
    import os

    import torch

    if threads > 0:
        return threads
    if device.startswith("cuda"):
        return int(torch.get_num_threads())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def resolve_dtype(dtype: DType, device: str) -> torch.dtype:
    """`auto` = float32 on CPU; bfloat16 on GPUs that support it, else float16."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_engine(
    source: ModelSource,
    *,
    device: Device = "auto",
    dtype: DType = "auto",
    chat_template: str | None = None,
    adapters: Sequence[AdapterSource] = (),
    threads: int = 0,
    unmerged: bool = False,
) -> Engine:
    """Read the weights and tokenizer described by `source`; slow (seconds to minutes).

    `threads`: torch intra-op threads for generation (0 = `resolve_threads`'s choice).
    `unmerged`: keep even a single adapter separate, so more can be added while serving
    (`Engine.add_adapter`); a merged one has changed the base they apply to.

    One adapter (`--model` an adapter folder) is merged into the base. With more
    (`adapters`), every adapter stays separate over one copy of the base, and
    each batch row picks its own (peft's mixed-adapter batches).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    log.info("loading %s on %s as %s", source.describe(), target_device, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir, **gguf)
    model: Any = AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=torch_dtype, **gguf)
    names: list[str] = []
    if source.adapter_dir is not None and not adapters and not unmerged:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter_dir)
        # Merged weights generate as fast as the base model; unmergeable adapter types stay wrapped.
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    elif adapters or source.adapter_dir is not None:
        from peft import PeftModel

        pending = [(MAIN_ADAPTER, source.adapter_dir)] if source.adapter_dir is not None else []
        pending += [(adapter.name, adapter.path) for adapter in adapters]
        first_name, first_path = pending[0]
        model = PeftModel.from_pretrained(model, first_path, adapter_name=first_name)
        for name, path in pending[1:]:
            model.load_adapter(path, adapter_name=name)
        names = [name for name, _ in pending]
        log.info("serving %d LoRA adapters unmerged over one base: %s", len(names), ", ".join(names))
    model.to(target_device)
    model.eval()
    engine = Engine(model, tokenizer, device=target_device, chat_template=chat_template,
                    threads=resolve_threads(threads, target_device))
    engine.adapter_names = tuple(names)
    return engine
