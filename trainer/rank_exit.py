"""How each rank tells the launcher its exit code: a file `rank-<N>.exit` per rank, in the folder the
launcher (`launch.py`) names in `KUBETUNE_EXIT_DIR`. Its own module so that the trainer program and
the launcher that starts it need not import each other."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_EXIT_DIR = "KUBETUNE_EXIT_DIR"
"""Folder where every rank writes `rank-<N>.exit` holding its exit code (set by the launcher)."""


def record_exit_code(code: int, env: Mapping[str, str] | None = None) -> None:
    """Called by every rank as it exits: write its code where the launcher reads it."""
    env = os.environ if env is None else env
    folder = env.get(ENV_EXIT_DIR)
    if folder:
        Path(folder, f"rank-{env.get('RANK', '0')}.exit").write_text(str(code))


def read_rank_codes(folder: Path) -> list[int]:
    """The codes the ranks recorded in `folder`, by rank file name."""
    return [int(p.read_text().strip()) for p in sorted(folder.glob("rank-*.exit")) if p.read_text().strip().isdigit()]
