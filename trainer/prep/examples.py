"""The examples data preparation and augmentation share: one `Example`, the train/validation/test
`Splits`, and the whitespace normalisation both apply. Its own module so that `augment` (which
`data.prepare` calls) need not import `data`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass
class Example:
    """One training example, whatever the dataset format."""

    prompt: str = ""
    """Context the model sees but is not trained to produce (empty for plain text)."""
    completion: str = ""
    """Text the loss is computed on (the whole text for format `text`)."""
    messages: list[dict[str, str]] | None = None
    """Chat turns ({role, content}); the loss covers the assistant turns."""
    label: str | None = None
    """Class label (format `classification`)."""
    weight: float = 1.0
    """Loss weight of every token of this example (class weights)."""

    def char_length(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt) + len(self.completion)

    def has_content(self) -> bool:
        if self.messages is not None:
            return any(m["role"] == "assistant" and m["content"] for m in self.messages)
        return bool(self.completion) and (self.label is None or bool(self.prompt))

    def dedupe_key(self) -> tuple[Any, ...]:
        messages = tuple((m["role"], m["content"]) for m in self.messages) if self.messages else None
        return (self.prompt, self.completion, messages, self.label)


@dataclasses.dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces, strip each line and the ends, keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
