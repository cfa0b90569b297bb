"""Sample answers: the first test prompts, answered by the base model before training and by the
tuned model after it, so a reader sees what fine-tuning changed and not only a perplexity.

The prompt side of a test example is built exactly as training formats it
(`data.example_segments`: the chat template with its generation prompt, the
classification prompt, the prompt of a prompt/completion pair), so the model
reads what it learned to continue. Plain text has no prompt side: the first
half of the text (at most `TEXT_PROMPT_WORDS` words) is the prompt and the
rest is the reference. Decoding is greedy and bounded by
`kubetune.api.config.SAMPLE_MAX_NEW_TOKENS`: the same model and prompt always give the same
answer, and a sample costs seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kubetune.trainer.prep import data

TEXT_PROMPT_WORDS = 32
"""Plain text: at most this many leading words form the prompt."""
EXCERPT_CHARS = 160
"""Length of each text in the excerpt that goes into the termination summary and the Event."""
STORED_CHARS = 1000
"""Each text in a stored sample is cut to this many characters (status and report stay small)."""


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """One test example's prompt side."""

    prompt: str
    """What a reader sees: the user's message, the prompt, the classified text or the text's start."""
    reference: str
    """The test split's own answer (assistant turn, completion, label, or the rest of the text)."""
    input_ids: list[int]
    """What the model reads, tokenised as in training."""


def _segment_ids(segments: Sequence[tuple[str, bool]], tokenizer: Any, chat: bool) -> list[int]:
    ids: list[int] = []
    for index, (text, _) in enumerate(segments):
        # As in data.tokenize_example: special tokens only at the start; chat templates write their own.
        ids += tokenizer(text, add_special_tokens=index == 0 and not chat)["input_ids"]
    return ids


def sample_prompt(example: data.Example, tokenizer: Any) -> SamplePrompt | None:
    """The prompt side of one example; None when it has nothing to prompt with."""
    if example.messages is not None:
        first_answer = next((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), None)
        if not first_answer:
            return None
        segments = data.example_segments(example, tokenizer)
        prefix = segments[: next(i for i, (_, target) in enumerate(segments) if target)]
        asked = [m["content"] for m in example.messages[:first_answer] if m["role"] == "user"]
        return SamplePrompt(prompt=asked[-1] if asked else example.messages[first_answer - 1]["content"],
                            reference=example.messages[first_answer]["content"],
                            input_ids=_segment_ids(prefix, tokenizer, chat=True))
    if example.prompt:
        segments = data.example_segments(example, tokenizer)
        prefix = [segment for segment in segments if not segment[1]][:1]
        reference = example.label if example.label is not None else example.completion
        return SamplePrompt(prompt=example.prompt, reference=reference,
                            input_ids=_segment_ids(prefix, tokenizer, chat=False))
    words = example.completion.split()
    if len(words) < 2:
        return None
    cut = min(len(words) // 2, TEXT_PROMPT_WORDS)
    prompt = " ".join(words[:cut])
    return SamplePrompt(prompt=prompt, reference=" ".join(words[cut:]),
                        input_ids=tokenizer(prompt, add_special_tokens=True)["input_ids"])


def sample_prompts(examples: Sequence[data.Example], tokenizer: Any, count: int) -> list[SamplePrompt]:
    """The prompt sides of the first `count` test examples that have one."""
    prompts: list[SamplePrompt] = []
    for example in examples:
        if len(prompts) >= count:
            break
        prompt = sample_prompt(example, tokenizer)
        if prompt is not None and prompt.input_ids:
            prompts.append(prompt)
    return prompts


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[SamplePrompt], *, max_new_tokens: int,
                     context_length: int | None, device: Any) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to get wrong), special tokens dropped."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            ids = prompt.input_ids
            if context_length:
                ids = ids[-max(1, context_length - max_new_tokens):]  # keep the end: it is what is asked
            inputs = torch.tensor([ids], device=device)
            with torch.no_grad():
                output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(output[0, len(ids):].tolist(), skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters (an ellipsis marks a cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 1)].rstrip() + "…"


def records(prompts: Sequence[SamplePrompt], base: Sequence[str] | None, tuned: Sequence[str]) -> list[dict[str, str]]:
    """What `samples.json`, the report and `status.samples` hold: prompt, reference, base and tuned answers."""
    found = []
    for index, prompt in enumerate(prompts):
        record = {"prompt": prompt.prompt, "reference": prompt.reference, "tuned": tuned[index]}
        if base is not None:
            record["base"] = base[index]
        found.append({key: _shorten(value.strip(), STORED_CHARS) for key, value in record.items()})
    return found


def excerpt(samples: Sequence[dict[str, str]], limit: int = EXCERPT_CHARS) -> str:
    """The first sample in one line for an Event: `Q: … | base: … | tuned: …`."""
    if not samples:
        return ""
    first = samples[0]
    parts = [f"Q: {cut(first['prompt'], limit)}"]
    if "base" in first:
        parts.append(f"base: {cut(first['base'], limit)}")
    parts.append(f"tuned: {cut(first['tuned'], limit)}")
    return " | ".join(parts)
