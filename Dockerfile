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
# Needs BuildKit (the default builder since Docker 23; on older engines set DOCKER_BUILDKIT=1): the pip steps use
# RUN --mount. There is deliberately no `# syntax=` line: the engine's built-in frontend handles every instruction
# here, and a syntax line makes BuildKit pull a frontend image, which fails where no registry is reachable.
#
# Package index (every pip step below uses it; see docs/deploy.md "Building behind a mirror, a proxy or no
# registry"):
#   --build-arg PIP_INDEX_URL=https://mirror.example/simple   (also PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST)
#   --secret id=pip.conf,src=$HOME/.config/pip/pip.conf       a pip.conf (credentials stay out of the image)
#   --secret id=ca.pem,src=/etc/ssl/certs/ca-certificates.crt a CA bundle for a TLS-intercepting proxy / mirror
# Versions: constraints.txt (`make lock`) pins every Python package, the same pins `make` installs for the tests.
#
# No model weights are baked in: open_clip downloads them at first start into /models (HF_HOME points there
# too). The project's offline demo model ships inside the package. Runs as uid/gid 10001 (non-root).
# Mount points (no VOLUME lines: compose and Kubernetes mount what each service needs, and nothing is left
# behind as an anonymous volume): /models (model cache), /data/artifacts (artifact store shared by all
# services), /data/shards (server-side input shards, read-only).

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

# The project's sources and its constraints only (see .dockerignore): a stage to bind-mount from, so editing a
# source file does not invalidate the torch layers below.
FROM scratch AS src
COPY pyproject.toml setup.py constraints.txt README.md* /src/
COPY latent_verbalizer /src/latent_verbalizer
COPY shared /src/shared
COPY services /src/services

FROM python AS venv
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
# `pip-build` (deploy/pip-build.sh) is pip with the index settings above and the optional secrets; --configure
# writes the build args into /etc/pip.conf, which stays in the build stages (the runtime copies /opt/venv only).
COPY deploy/pip-build.sh /usr/local/bin/pip-build
# pip itself at the constraints' version: an index that cannot be reached fails here, loud, instead of leaving
# the base image's pip in place.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    --mount=type=bind,from=src,source=/src/constraints.txt,target=/tmp/constraints.txt \
    pip-build --configure \
 && python -m venv /opt/venv \
 && PATH=/opt/venv/bin:$PATH pip-build install -c /tmp/constraints.txt "pip"
ENV PATH=/opt/venv/bin:$PATH

FROM venv AS deps-cuda
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    --mount=type=bind,from=src,source=/src/constraints.txt,target=/tmp/constraints.txt \
    pip-build install -c /tmp/constraints.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# CPU-only torch from its own index: TORCH_CPU_INDEX_URL (a mirror of the PyTorch CPU wheel index, or any index
# with CPU builds) and the versions to ask it for. "2.14.1+cpu" satisfies the project's "torch==2.14.1" (PEP 440
# ignores the local label), so the project install below keeps these wheels. Where the index or the version is
# not available the build stops here, at once, naming the alternative.
FROM venv AS deps-slim
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CPU_VERSION=${TORCH_VERSION}+cpu
ARG TORCHVISION_CPU_VERSION=${TORCHVISION_VERSION}+cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    --mount=type=bind,from=src,source=/src/constraints.txt,target=/tmp/constraints.txt \
    pip-build has-version "${TORCH_CPU_INDEX_URL}" torch "${TORCH_CPU_VERSION}" || { \
      echo "error: the slim target needs torch==${TORCH_CPU_VERSION} (CPU-only) from ${TORCH_CPU_INDEX_URL}," \
           "which does not offer it or cannot be reached. Point --build-arg TORCH_CPU_INDEX_URL at an index" \
           "that has it (and TORCH_CPU_VERSION / TORCHVISION_CPU_VERSION at its versions), or build" \
           "--target cuda instead: the same package with PyPI's torch, which runs on CPU too (about 6.7 GB)." >&2; \
      exit 1; } \
 && pip-build install -c /tmp/constraints.txt --index-url "${TORCH_CPU_INDEX_URL}" \
        "torch==${TORCH_CPU_VERSION}" "torchvision==${TORCHVISION_CPU_VERSION}"

FROM deps-cuda AS app-cuda
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    --mount=type=bind,from=src,source=/src,target=/src,rw \
    pip-build install -c /src/constraints.txt /src && pip check

FROM deps-slim AS app-slim
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    --mount=type=bind,from=src,source=/src,target=/src,rw \
    pip-build install -c /src/constraints.txt /src && pip check

# ---------------------------------------------------------------------------------------------------------------
# Runtime base: non-root user, mount points owned by it (a new named volume copies this ownership).
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
