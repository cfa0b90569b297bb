"""Errors that end a run for good (exit code 78) rather than asking for a retry.

Anything raised from the trainer that is not a `PermanentError` (or a
`config.ConfigError`) is treated as transient: the pod exits with a retryable
code and the next attempt resumes from the latest checkpoint.
"""

from __future__ import annotations


class PermanentError(Exception):
    """The run cannot succeed with this config, data or model; retrying will not help."""

    reason = "InvalidDataset"
    """The operator's condition reason for this kind of error (the termination summary's `reason`)."""


class DataError(PermanentError):
    """The data is unusable: a missing field, an undecodable file, an unknown label, nothing left after cleaning."""


class ModelError(PermanentError):
    """The base model cannot be found or loaded."""

    reason = "ModelUnavailable"


class StorageError(PermanentError):
    """An object-store location cannot be used: a missing bucket or key, wrong credentials, an
    unreachable endpoint. The message names the field."""

    reason = "StorageUnavailable"


class CheckpointError(PermanentError):
    """A checkpoint on the output volume cannot be loaded safely: it holds something other than tensors
    and plain values (a pickle that could run code), or does not fit this run."""


class Preempted(Exception):  # noqa: N818 - a signal, not a failure
    """SIGTERM arrived; the run stops after saving a checkpoint (exit code 75)."""

    def __init__(self, message: str, tokens_processed: int | None = None) -> None:
        super().__init__(message)
        self.tokens_processed = tokens_processed
        """Training tokens this process trained on before it stopped (for the termination message)."""
