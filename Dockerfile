# syntax=docker/dockerfile:1
# One image for every part of oclust: `oclust worker`, `oclust serve`, `oclust produce`, ...
#
#   docker build -t oclust:cpu .                                   # CPU torch (default)
#   docker build -t oclust:cu126 --build-arg TORCH_VARIANT=cu126 . # CUDA torch for the worker
#
# TORCH_VARIANT names a wheel index of download.pytorch.org (cpu, cu126, cu128, ...; pick one
# the chosen torch release is built for). torch goes in first from that index, so that
# `pip install .` finds its `torch` requirement met and never pulls the CUDA build from PyPI.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

# Caches go to /tmp: site-packages is not writable for the runtime user (numba would cache
# next to its modules), and Kubernetes runs the image with a read-only root and /tmp mounted.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    XDG_CACHE_HOME=/tmp/cache

RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# The package itself (.dockerignore keeps tests, the virtualenv and local state out).
COPY pyproject.toml README.md LICENSE /src/
COPY oclust /src/oclust
COPY model /src/model
COPY training_worker /src/training_worker
COPY service /src/service
RUN pip install /src \
    && rm -rf /src \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN groupadd --system --gid 10001 oclust \
    && useradd --system --uid 10001 --gid oclust --create-home --home-dir /home/oclust oclust
USER 10001:10001
WORKDIR /home/oclust

# 8000: `oclust serve` (HTTP + /metrics); 9100: `oclust worker` metrics.
EXPOSE 8000 9100

ENTRYPOINT ["oclust"]
CMD ["--help"]
