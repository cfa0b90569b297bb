"""Adapters the built-in server loads while serving: the `--adapter-config` file.

The file is JSON, `{"adapters": [{"name": "NAME", "path": "PATH"}, ...]}`: every
entry is a LoRA adapter (same base model as the server's) to serve as model
`NAME`. The server reads it at startup (its adapters are loaded before the
server reports ready) and then every `--adapter-config-interval` seconds: a new
entry is loaded, a removed one is no longer served, a changed path is
reloaded, all without a restart.

Why a watched file and not an admin endpoint: the operator writes the file as
a ConfigMap mounted into the serving pods, so the list is declared state that
every replica reads, including replicas started later or restarted, and the
kubelet brings the change to each pod. An endpoint would need the operator to
reach every pod and repeat the call after each restart, and would be one more
way into the server to secure.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class AdapterConfigError(ValueError):
    """The adapter config file is not what the server expects; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One adapter the file asks the server to serve."""

    name: str
    """The `model` name requests select it by."""
    path: str
    """The peft adapter folder (or a trainer output folder with `adapter/`)."""


def parse_adapter_config(text: str, source: str) -> dict[str, AdapterEntry]:
    """The entries of an adapter config file's text, by name; AdapterConfigError naming the problem."""
    try:
        document = json.loads(text) if text.strip() else {}
    except ValueError as error:
        raise AdapterConfigError(f"{source}: not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise AdapterConfigError(f"{source}: expected an object with an 'adapters' list")
    raw = document.get("adapters", [])
    if not isinstance(raw, list):
        raise AdapterConfigError(f"{source}: 'adapters' must be a list of {{name, path}} objects")
    entries: dict[str, AdapterEntry] = {}
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise AdapterConfigError(f"{source}: adapters[{index}] needs a non-empty 'name' and 'path'")
        if name in entries:
            raise AdapterConfigError(f"{source}: adapters[{index}]: the name {name!r} appears twice")
        entries[name] = AdapterEntry(name=name, path=path)
    return entries


def read_adapter_config(path: Path) -> dict[str, AdapterEntry]:
    """The entries of the file at `path`; a missing file has none (the ConfigMap may not exist yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise AdapterConfigError(f"--adapter-config {path}: cannot read: {error}") from error
    return parse_adapter_config(text, f"--adapter-config {path}")
