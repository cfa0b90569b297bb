# syntax=docker/dockerfile:1
# kubetune images, one file, two targets:
#   docker build --target operator -t kubetune-operator .   # the kopf operator: base dependencies, no torch
#   docker build --target trainer  -t kubetune-trainer  .   # trainer + built-in server: torch, transformers, accelerate
# Dependencies come from pyproject.toml only (its [project] dependencies and the `trainer`
# extra); tests/unit/chart/test_dockerfile_matches_pyproject.py checks that. Both images run as
# the numeric non-root user 65532 and work with a read-only root filesystem (writes go to /tmp).

# The Python the tests run on (3.11, as pyproject's requires-python), on Debian bookworm.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---------------------------------------------------------------------------------------------
# base: the runtime every image shares.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 65532 kubetune \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin kubetune
WORKDIR /app

# ---------------------------------------------------------------------------------------------
# wheel: builds the kubetune wheel once (api, operator, trainer and cli packages; no dependencies).
# The dev tooling (control-plane launcher, local node, tiny models, test servers) is for development
# only: dev/ is not copied, and this copy of pyproject.toml drops `kubetune.dev` from its packages.
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
COPY trainer/ trainer/
COPY cli/ cli/
RUN sed -i -e 's/, "kubetune.dev"\]/]/' -e '/^"kubetune.dev" = "dev"$/d' pyproject.toml \
 && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# operator-deps: a virtual environment with kubetune and its base dependencies only.
FROM base AS operator-deps
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install /wheels/kubetune-*.whl

# ---------------------------------------------------------------------------------------------
# trainer-deps: kubetune with the `trainer` extra (torch, transformers, accelerate, peft, ...).
FROM base AS trainer-deps
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install "$(echo /wheels/kubetune-*.whl)[trainer,s3]"

# ---------------------------------------------------------------------------------------------
# trainer: runs `python -m kubetune.trainer --config FILE` (the operator sets the command) and
# `python -m kubetune.trainer.serve` (the built-in OpenAI-compatible server, the default).
FROM base AS trainer
COPY --from=trainer-deps /opt/venv /opt/venv
# Caches of the libraries point at /tmp: the root filesystem is read-only in the pod.
ENV HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/triton
USER 65532:65532
EXPOSE 8000
CMD ["python", "-m", "kubetune.trainer.serve"]

# ---------------------------------------------------------------------------------------------
# operator: `python -m kubetune.operator`; progress, metrics and health on port 8080.
FROM base AS operator
COPY --from=operator-deps /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8080
CMD ["python", "-m", "kubetune.operator"]
