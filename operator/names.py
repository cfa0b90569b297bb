"""Deterministic names of a FineTuneJob's children.

A child's name depends only on the FineTuneJob's name, so every reconcile (and
every operator restart) computes the same names and a create that answers 409
means "already there". Names stay within 63 characters (Jobs put their name in
a label): a long job name is shortened and a hash of the full name keeps it unique.
"""

from __future__ import annotations

import hashlib

MAX_NAME_LENGTH = 63
"""Label values, and therefore Job names, are at most 63 characters."""


def child_name(job_name: str, suffix: str) -> str:
    """`<job_name>-<suffix>`, shortened with a stable hash when longer than 63 characters."""
    full = f"{job_name}-{suffix}"
    if len(full) <= MAX_NAME_LENGTH:
        return full
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    keep = MAX_NAME_LENGTH - len(suffix) - len(digest) - 2
    return f"{job_name[:keep].rstrip('-.')}-{digest}-{suffix}"


def config_map(job_name: str) -> str:
    """The ConfigMap holding the rendered trainer config."""
    return child_name(job_name, "config")


def progress_secret(job_name: str) -> str:
    """The Secret holding the job's progress-report token."""
    return child_name(job_name, "progress")


def serving_key(job_name: str) -> str:
    """The Secret holding the API key clients of the job's serving endpoint present."""
    return child_name(job_name, "serving-key")


def validation_job(job_name: str) -> str:
    """The accelerator-free Job that validates the dataset before GPUs are held."""
    return child_name(job_name, "validate")


def trainer_job(job_name: str) -> str:
    """The Job that trains."""
    return child_name(job_name, "train")


def serving_adapters(job_name: str) -> str:
    """The ConfigMap listing the adapters of other jobs that the job's serving pods load (`shareWith`)."""
    return child_name(job_name, "serving-adapters")


def serving(job_name: str) -> str:
    """The serving Deployment and its Service (one name for both).

    Service names are DNS-1035 labels: lower-case letters, digits and '-', starting with a
    letter. A job name that is not one (it has a '.', or starts with a digit) is made one, with
    a hash of the full name so that `a.b` and `a-b` stay apart.
    """
    return _service_child(job_name, "serving")


def rendezvous(job_name: str) -> str:
    """The headless Service that gives each pod of a multi-pod trainer Job a DNS name
    (`<trainer job>-<index>.<this name>`), so the ranks find rank 0. A DNS-1035 label, as `serving`."""
    return _service_child(job_name, "ranks")


def _service_child(job_name: str, suffix: str) -> str:
    name = child_name(job_name, suffix)
    if _is_dns1035_label(name):
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in job_name.lower())
    keep = MAX_NAME_LENGTH - len(f"ftj---{suffix}") - len(digest)
    parts = ("ftj", cleaned[:keep].strip("-"), digest, suffix)
    return "-".join(part for part in parts if part)


def _is_dns1035_label(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME_LENGTH and "a" <= name[0] <= "z" and name[-1].isalnum()
            and all(("a" <= ch <= "z") or ch.isdigit() or ch == "-" for ch in name))
