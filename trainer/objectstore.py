"""`s3://` locations: reading models and data from, and writing outputs to, an S3-compatible store.

Credentials come only from the environment the operator gives the pod (`spec.credentials.s3`, as
`valueFrom.secretKeyRef`): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, and for a
store other than AWS `AWS_ENDPOINT_URL`, plus `AWS_REGION`; with none of them, botocore's own chain
(workload identity, instance roles) applies. The client is s3fs, the fsspec filesystem that the data
reader (`fsspec.open`) already speaks, so one client and one set of settings serve models, data and
outputs.

Every failure names the spec field and what is wrong (`StorageError`, a permanent error: retrying
does not create a bucket or fix a key) — a missing bucket, a missing object, refused credentials, an
endpoint that does not answer — and never a credential's value.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from kubetune.trainer.errors import StorageError

SCHEME = "s3://"
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_REGION = "AWS_REGION"
CACHE_DIR_ENV = "KUBETUNE_MODEL_CACHE"
"""Where `s3://` models are downloaded to; default `$XDG_CACHE_HOME/kubetune/models` (the pod's /tmp)."""
_COMPLETE_MARKER = ".kubetune-download-complete"
"""Written last into a downloaded folder: a folder without it is a partial download and is fetched again."""

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "403", "401"}


def is_s3(location: str) -> bool:
    return location.startswith(SCHEME)


def split(location: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    bucket, _, key = location[len(SCHEME):].partition("/")
    return bucket, key.strip("/")


def storage_options() -> dict[str, Any]:
    """s3fs options from the environment: the endpoint and region explicitly (older SDKs ignore
    `AWS_ENDPOINT_URL`), the keys through botocore's own environment lookup. No retries on connect
    errors: an unreachable endpoint should fail validation in seconds, not minutes."""
    client: dict[str, Any] = {}
    if os.environ.get(ENV_ENDPOINT):
        client["endpoint_url"] = os.environ[ENV_ENDPOINT]
    if os.environ.get(ENV_REGION):
        client["region_name"] = os.environ[ENV_REGION]
    return {"client_kwargs": client, "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                                       "retries": {"max_attempts": 2}},
            "skip_instance_cache": True}


def filesystem() -> Any:
    """An s3fs filesystem configured from the environment; StorageError when s3fs is not installed."""
    try:
        import s3fs
    except ImportError as error:  # the trainer image installs kubetune[s3]
        raise StorageError(f"s3:// locations need s3fs (pip install 'kubetune[s3]'): {error}") from error
    return s3fs.S3FileSystem(**storage_options())


def explain(error: BaseException, location: str, field: str) -> StorageError:
    """The failure of an object-store call as a StorageError naming `field` and what is wrong."""
    bucket, key = split(location)
    text = str(error)
    code = ""
    response = getattr(error, "response", None) or getattr(getattr(error, "__cause__", None), "response", None)
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
    endpoint = os.environ.get(ENV_ENDPOINT) or "the AWS default endpoint"
    name = type(error).__name__
    if "NoSuchBucket" in (code, name) or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{field}: {location}: the bucket {bucket!r} does not exist at {endpoint}")
    if code in _CREDENTIAL_CODES or isinstance(error, PermissionError) or any(
            c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
        return StorageError(f"{field}: {location}: the store refused the credentials (spec.credentials.s3: "
                            f"{code or name}); check the Secret's keys and the bucket's permissions")
    if any(c in name or c in text for c in ("EndpointConnectionError", "ConnectTimeout", "ConnectionRefused",
                                             "Cannot connect", "Could not connect", "ClientConnectorError")):
        return StorageError(f"{field}: {location}: the object store at {endpoint} does not answer ({name})")
    if isinstance(error, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return StorageError(f"{field}: {location}: no object or folder {key!r} in bucket {bucket!r}")
    return StorageError(f"{field}: {location}: {name}: {text.splitlines()[0] if text else 'failed'}")


def _call(location: str, field: str, action: Any) -> Any:
    try:
        return action()
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - botocore, aiohttp and OSError all end here, named
        raise explain(error, location, field) from error


def check_bucket(fs: Any, location: str, field: str) -> None:
    """StorageError naming `field` unless the bucket exists and the credentials may list it."""
    bucket, _ = split(location)
    _call(location, field, lambda: fs.ls(bucket, refresh=True))


def download_folder(location: str, field: str, cache_root: Path | None = None) -> Path:
    """The folder (prefix) at `location` copied to a local cache, once per pod: later calls reuse it.
    A single object (`s3://b/model.gguf`'s folder is named instead) is not a model folder."""
    root = cache_root or Path(os.environ.get(CACHE_DIR_ENV) or
                              Path(os.environ.get("XDG_CACHE_HOME") or "/tmp/.cache") / "kubetune" / "models")
    target = root / hashlib.sha256(location.encode()).hexdigest()[:16]
    if (target / _COMPLETE_MARKER).is_file():
        return target
    return download_to(location, target, field)


def download_to(location: str, target: Path, field: str) -> Path:
    """Every object under the prefix `location` copied into `target`, relative paths kept; returns `target`."""
    fs = filesystem()
    check_bucket(fs, location, field)
    bucket, key = split(location)
    files = _call(location, field, lambda: [p for p in fs.find(f"{bucket}/{key}", refresh=True)])
    prefix = f"{bucket}/{key}/" if key else f"{bucket}/"
    files = [p for p in files if p.startswith(prefix)]
    if not files:
        raise StorageError(f"{field}: {location}: no objects under {key or '/'!r} in bucket {bucket!r}")
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        local = target / path[len(prefix):]
        local.parent.mkdir(parents=True, exist_ok=True)
        _call(location, field, lambda path=path, local=local: fs.get_file(path, str(local)))
    (target / _COMPLETE_MARKER).write_text(location + "\n")
    return target


def upload_folder(folder: Path, location: str, field: str) -> int:
    """Every file under `folder` written to `location` (a prefix), keeping relative paths; returns how
    many. Objects already there with other names are left alone."""
    fs = filesystem()
    check_bucket(fs, location, field)
    bucket, key = split(location)
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        remote = f"{bucket}/{key}/{path.relative_to(folder).as_posix()}" if key else \
            f"{bucket}/{path.relative_to(folder).as_posix()}"
        _call(location, field, lambda path=path, remote=remote: fs.put_file(str(path), remote))
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    """`python -m kubetune.trainer.objectstore s3://bucket/model /mnt/model`: the serving pod's init
    container, which puts a model from the bucket where the server reads it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.objectstore",
                                     description="Download an s3:// folder (credentials from the environment).")
    parser.add_argument("location")
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        download_to(args.location, args.target, "status.model.uri")
    except StorageError as error:
        print(f"kubetune: {error}", file=sys.stderr)
        return 78
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
