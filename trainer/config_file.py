"""Reading the trainer's config file: JSON (what the operator writes) or YAML (written by hand).

The config itself, its sections and its rules are the shared contract's (`kubetune.api.config`);
this module only reads the file, which needs pyyaml, a dependency the contract does not take.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api.config import ConfigError, TrainerConfig, config_from_dict


def load_config(path: str | Path) -> TrainerConfig:
    """Read a JSON or YAML config file and validate it; ConfigError lists every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"(file) {file}: cannot read: {error.strerror or error}"]) from error
    try:
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: it reads both

            data = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError is a ValueError; yaml.YAMLError is not
        raise ConfigError([f"(file) {file}: not valid JSON/YAML: {error}"]) from error
    return config_from_dict(data)
