"""The trainer process's side of the contract: its exit codes and the environment the operator sets.

The operator builds the trainer pod (its env, and the Job's podFailurePolicy from the exit codes);
the trainer reads the env and exits with the codes. Both import these names from here.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
"""The run finished and wrote its outputs."""
EXIT_PERMANENT: Final = 78
"""Bad config, bad data or a missing model: retrying cannot help (EX_CONFIG from sysexits.h).
The Job's podFailurePolicy turns this code into a failed job without retries."""
EXIT_PREEMPTED: Final = 75
"""SIGTERM arrived; a checkpoint was saved and a retry resumes from it (EX_TEMPFAIL).
Any code other than these three is an unexpected error, also retried."""

ENV_PROGRESS_URL: Final = "KUBETUNE_PROGRESS_URL"
"""POST endpoint for progress reports; unset means reports go to stdout only."""
ENV_PROGRESS_TOKEN: Final = "KUBETUNE_PROGRESS_TOKEN"
"""Bearer token sent with every progress report."""
ENV_PROGRESS_CA: Final = "KUBETUNE_PROGRESS_CA"
"""PEM of the CA an https:// progress endpoint's certificate must chain to; unset = the system's CAs."""
ENV_ATTEMPT: Final = "KUBETUNE_ATTEMPT"
"""Retry attempt number (0 for the first run), echoed in every report."""
ENV_TERMINATION_LOG: Final = "KUBETUNE_TERMINATION_LOG"
"""Where the final summary goes; default `DEFAULT_TERMINATION_LOG` when writable."""
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"
"""The container's termination-message file (Kubernetes' default `terminationMessagePath`)."""
ENV_NUM_PROCESSES: Final = "KUBETUNE_NUM_PROCESSES"
"""Training processes in this pod: the operator writes the pod's GPU count (the same number as its
`nvidia.com/gpu` limit), 1 on CPU. `python -m kubetune.trainer.launch` starts that many ranks."""
ENV_NUM_NODES: Final = "KUBETUNE_NUM_NODES"
"""Pods in the run (`resources.nodes`); the world size is processes × nodes."""
ENV_DEVICE: Final = "KUBETUNE_DEVICE"
"""`gpu` (nccl) or `cpu` (gloo): what the ranks train on, from the pod's GPU count."""
ENV_NODE_RANK: Final = "JOB_COMPLETION_INDEX"
"""This pod's index in the run; Kubernetes sets it in every pod of an Indexed Job."""
ENV_MASTER_ADDR: Final = "MASTER_ADDR"
"""Address of rank 0 (pod index 0) for the rendezvous: its DNS name under the headless Service."""
ENV_MASTER_PORT: Final = "MASTER_PORT"
"""Rendezvous port on rank 0's pod."""
DEFAULT_MASTER_PORT: Final = 29500
"""The rendezvous port every multi-pod run uses (torch.distributed's default)."""
ENV_MLFLOW_TOKEN: Final = "MLFLOW_TRACKING_TOKEN"
"""Bearer token for the MLflow tracking server (`spec.credentials.mlflow.tokenKey`), by secretKeyRef."""
ENV_MLFLOW_USERNAME: Final = "MLFLOW_TRACKING_USERNAME"
"""Basic-auth user of the MLflow tracking server (`spec.credentials.mlflow.usernameKey`)."""
ENV_MLFLOW_PASSWORD: Final = "MLFLOW_TRACKING_PASSWORD"
"""Basic-auth password of the MLflow tracking server (`spec.credentials.mlflow.passwordKey`)."""
