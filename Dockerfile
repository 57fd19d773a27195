# syntax=docker/dockerfile:1.7
#
# One Dockerfile, two runtime targets of the same Python package (console command `latent-verbalizer`):
#
#   cuda  - torch from PyPI (the CUDA build: its CUDA/cuDNN/NCCL libraries come as pip wheels, so only the
#           host's NVIDIA driver + NVIDIA Container Toolkit are needed). For the GPU stages: encoder, decoder.
#           It also runs on CPU. Image: latent-verbalizer-cuda
#   slim  - torch CPU-only wheels (about 1 GB instead of about 6 GB). For the gateway and the categorizer
#           (and for encoder/decoder on machines without a GPU). Image: latent-verbalizer-slim
#
#   docker build --target cuda -t latent-verbalizer-cuda:0.1.0 .
#   docker build --target slim -t latent-verbalizer-slim:0.1.0 .
#
# No model weights are baked in: open_clip downloads them at first start into /models (a volume; HF_HOME points
# there too). The project's offline demo model ships inside the package. Runs as uid/gid 10001 (non-root).
# Volumes: /models (model cache), /data/artifacts (artifact store shared by all services),
# /data/shards (server-side input shards, mounted read-only).

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---------------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------------------------------------------------------
# Build stages: a virtual environment in /opt/venv, copied whole into the runtime stage.
FROM python AS venv
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip pip install --upgrade pip

# The project's sources only (see .dockerignore): a stage to bind-mount from, so editing a source file does
# not invalidate the torch layers above.
FROM scratch AS src
COPY pyproject.toml setup.py README.md* /src/
COPY latent_verbalizer /src/latent_verbalizer
COPY shared /src/shared
COPY services /src/services

FROM venv AS deps-cuda
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

FROM venv AS deps-slim
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# "2.14.1+cpu" satisfies the project's "torch==2.14.1" pin (PEP 440 ignores the local label), so the project
# install below keeps these wheels.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_CPU_INDEX_URL}" \
        "torch==${TORCH_VERSION}+cpu" "torchvision==${TORCHVISION_VERSION}+cpu"

FROM deps-cuda AS app-cuda
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=src,source=/src,target=/src,rw \
    pip install /src && pip check

FROM deps-slim AS app-slim
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=src,source=/src,target=/src,rw \
    pip install /src && pip check

# ---------------------------------------------------------------------------------------------------------------
# Runtime base: non-root user, volume mount points owned by it (a new named volume copies this ownership).
FROM python AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" lv \
 && useradd --system --uid "${UID}" --gid lv --home-dir /home/lv --create-home --shell /usr/sbin/nologin lv \
 && mkdir -p /models/hf /data/artifacts /data/shards \
 && chown -R lv:lv /models /data
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    LV_MODEL_CACHE=/models \
    LV_ARTIFACT_DIR=/data/artifacts \
    LV_DATA_ROOTS=/data/shards \
    LV_HOST=0.0.0.0 \
    LV_PORT=8000 \
    LV_LOG_JSON=true
WORKDIR /home/lv
VOLUME ["/models", "/data/artifacts", "/data/shards"]
EXPOSE 8000
USER 10001:10001
ENTRYPOINT ["latent-verbalizer"]
# Default role: the gateway. Workers override the command (`worker encoder|decoder|categorizer`) and the
# healthcheck (`healthcheck worker NAME`), as docker-compose.yml does; Kubernetes uses its own probes.
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["latent-verbalizer", "healthcheck", "gateway"]

FROM runtime AS slim
COPY --from=app-slim /opt/venv /opt/venv

# Last stage = the default target of a plain `docker build .`.
FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=app-cuda /opt/venv /opt/venv
