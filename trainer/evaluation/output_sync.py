"""`output.storage: s3://…`: the run writes to a local scratch folder and this module mirrors it to the
bucket (`output.uri`).

- Before training, complete checkpoints already in the bucket are copied back (a retry, a new pod
  after preemption, resumes from them: the pod's scratch folder starts empty).
- While training, a background thread uploads each new complete checkpoint (the state file last, so a
  half-uploaded checkpoint is never taken for a complete one) and deletes those pruned locally.
- After training, everything else (model or adapter, metrics.json, baseline.json, samples.json, the
  model card, the loss curve) is uploaded, then the checkpoints once more.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from kubetune.api.config import TrainerConfig
from kubetune.trainer import objectstore

log = logging.getLogger(__name__)

FIELD = "output.storage"
STATE_FILE = "trainer_state.json"
"""The file that makes a checkpoint complete (`train.STATE_FILE`; train imports torch, this module does not)."""
CHECKPOINTS = "checkpoints"


def enabled(config: TrainerConfig) -> bool:
    return bool(config.output.uri) and objectstore.is_s3(str(config.output.uri))


def _remote(config: TrainerConfig, *parts: str) -> str:
    bucket, key = objectstore.split(str(config.output.uri))
    return "/".join(p for p in (bucket, key, *parts) if p)


def restore_checkpoints(config: TrainerConfig) -> int:
    """Complete checkpoints from the bucket into the local checkpoint folder; returns how many."""
    fs = objectstore.filesystem()
    uri = str(config.output.uri)
    objectstore.check_bucket(fs, uri, FIELD)
    remote = _remote(config, CHECKPOINTS)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(remote, refresh=True)]
    except FileNotFoundError:
        return 0
    except Exception as error:  # noqa: BLE001 - named by objectstore.explain
        raise objectstore.explain(error, uri, FIELD) from error
    restored = 0
    local_root = config.output.checkpoint_path
    for name in names:
        if not name.startswith("step-") or not fs.exists(f"{remote}/{name}/{STATE_FILE}"):
            continue
        target = local_root / name
        files = sorted(fs.find(f"{remote}/{name}"), key=lambda p: p.endswith(STATE_FILE))
        temporary = local_root / f".download-{name}"
        temporary.mkdir(parents=True, exist_ok=True)
        for path in files:
            (temporary / path.rsplit("/", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(temporary / path[len(f"{remote}/{name}/"):]))
        if not target.exists():
            temporary.rename(target)
        restored += 1
    return restored


def upload_checkpoints(config: TrainerConfig, uploaded: set[str] | None = None) -> set[str]:
    """Uploads complete local checkpoints not in `uploaded` and removes remote ones gone locally;
    returns the names now in the bucket."""
    fs = objectstore.filesystem()
    local_root = config.output.checkpoint_path
    present = sorted(p for p in local_root.glob("step-*") if (p / STATE_FILE).is_file()) if local_root.is_dir() else []
    done = set(uploaded or ())
    remote = _remote(config, CHECKPOINTS)
    for folder in present:
        if folder.name in done:
            continue
        try:
            files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == STATE_FILE)
            for path in files:
                fs.put_file(str(path), f"{remote}/{folder.name}/{path.relative_to(folder).as_posix()}")
        except FileNotFoundError:
            continue  # pruned locally while uploading: removed below like any other pruned one
        done.add(folder.name)
    # Whatever the bucket holds that is no longer kept locally (pruned, or a half-upload of one) goes.
    kept = {p.name for p in present if p.is_dir()}
    try:
        remote_names = {p.rsplit("/", 1)[-1] for p in fs.ls(remote, refresh=True)}
    except FileNotFoundError:
        remote_names = set()
    for name in sorted(remote_names - kept):
        fs.rm(f"{remote}/{name}", recursive=True)
    return done & kept


def upload_outputs(config: TrainerConfig) -> int:
    """Everything the run wrote except checkpoints, then the checkpoints; returns the files uploaded."""
    output = Path(config.output.dir)
    checkpoints = config.output.checkpoint_path.resolve()
    fs = objectstore.filesystem()
    count = 0
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        if checkpoints in path.resolve().parents:
            continue
        fs.put_file(str(path), _remote(config, path.relative_to(output).as_posix()))
        count += 1
    upload_checkpoints(config)
    return count


class CheckpointUploader:
    """Uploads new checkpoints every `interval` seconds in a background thread, and once more on stop."""

    def __init__(self, config: TrainerConfig, interval: float = 10.0) -> None:
        self.config = config
        self.interval = interval
        self.uploaded: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)

    def __enter__(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sync()  # what the last interval saved (a SIGTERM checkpoint too)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sync()

    def _sync(self) -> None:
        try:
            self.uploaded = upload_checkpoints(self.config, self.uploaded)
        except Exception:  # noqa: BLE001 - a failed upload is retried next interval; training goes on
            log.exception("uploading checkpoints to %s failed; retrying", self.config.output.uri)
