# syntax=docker/dockerfile:1
# One image for every role of the service (README "Containers"): the role is the command.
#   docker build -t digital-twin .                                 # CUDA runtime base + CUDA torch (GPU hosts)
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg TORCH=cpu -t digital-twin:cpu .
#   docker build --target root-start -t digital-twin:runpod .      # starts as root, fixes volume owners, drops
#   docker run --gpus all -p 5000:5000 -e TWIN_API_KEYS=... -v twin-models:/models -v twin-data:/data digital-twin
# podman keeps the HEALTHCHECK only with `--format docker` (or BUILDAH_FORMAT=docker).
# No weights (the models volume; the `download` role fills it) and no secrets (settings come at run time) in
# any layer: .dockerignore keeps models/, twin_data/, .venv, .git and *.env out of the build context.

# Users: a CUDA runtime base. The CUDA build of torch brings its own CUDA libraries; the base adds the
# NVIDIA container-runtime settings and the usual CUDA layout. Tests pass a local Debian base.
ARG BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS system
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8
LABEL org.opencontainers.image.title="digital-twin" \
      org.opencontainers.image.description="Digital Twin Generator: Flask + gunicorn API and GPU workers (README: Containers)"
# tini is PID 1 (forwards SIGTERM to the role's process, reaps the generator child); curl serves
# start_app.sh's readiness banner.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates curl tini \
 && rm -rf /var/lib/apt/lists/*

# --- the virtualenv: built here, copied into the runtime stage without pip's cache or python3-venv ---
FROM system AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
# cuda: torch from PyTorch's CUDA 12.8 index and onnxruntime-gpu (as deploy_production.sh installs them);
# cpu: torch from PyTorch's CPU index. TORCH_INDEX_URL overrides the index (tests: PyPI + a local wheel).
ARG TORCH=cuda
ARG TORCH_INDEX_URL=
# Optional, for builds behind a TLS-inspecting proxy, with local wheels or a package mirror: paths of files
# mounted at build time only (`podman build -v host:path`), never copied into a layer. Unset by default.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
# torch first, pinned, from its index: a later requirement must not pull another build of it. With cuda,
# the GPU build of the pinned onnxruntime series replaces the CPU one (both are the `onnxruntime` module).
COPY requirements.txt requirements-nodeps.txt /tmp/req/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    case "$TORCH" in \
      cuda) index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128} ;; \
      cpu) index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;; \
      *) echo "TORCH=$TORCH: use cuda or cpu" >&2; exit 2 ;; \
    esac; \
    python3 -m venv /opt/venv; \
    pip=/opt/venv/bin/pip; \
    $pip install "$(grep -E '^torch==' /tmp/req/requirements.txt)" --index-url "$index"; \
    $pip install -r /tmp/req/requirements.txt; \
    $pip install --no-deps -r /tmp/req/requirements-nodeps.txt; \
    if [ "$TORCH" = cuda ]; then \
      ort=$(grep -E '^onnxruntime==' /tmp/req/requirements.txt | sed 's/^onnxruntime==/onnxruntime-gpu==/'); \
      $pip uninstall -y onnxruntime; $pip install "$ort"; \
    fi; \
    /opt/venv/bin/python -c "import torch, diffusers, gunicorn, rq; print('torch', torch.__version__)"

# --- the runtime image ---
FROM system AS app
# A fixed uid/gid (10001: the CUDA Ubuntu base already has uid 1000) so host folders can be chowned to it.
RUN groupadd --gid 10001 twin \
 && useradd --uid 10001 --gid twin --no-log-init --create-home --home-dir /home/twin --shell /usr/sbin/nologin twin \
 && mkdir -p /data /models /cache/huggingface \
 && chown twin:twin /data /models /cache/huggingface
COPY --from=builder /opt/venv /opt/venv
# The code belongs to root and is read-only to the service user; compiled once here so no start writes it.
COPY . /app
RUN /opt/venv/bin/python -m compileall -q /app \
 && chmod 0755 /app/scripts/docker-entrypoint.sh /app/start_app.sh /app/start_worker.sh
# Defaults for a container (every TWIN_* setting can be overridden with -e / an env file): bind all
# interfaces (start_app.sh then demands TWIN_API_KEYS), the three volumes, weights read offline.
ENV PATH=/opt/venv/bin:$PATH \
    VENV=/opt/venv \
    SKIP_VENV_SETUP=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    TWIN_HOST=0.0.0.0 \
    TWIN_PORT=5000 \
    TWIN_DATA_DIR=/data \
    TWIN_MODEL_DIR=/models
WORKDIR /app
EXPOSE 5000
VOLUME ["/data", "/models", "/cache/huggingface"]
# Healthy only when /health says "ready" (api, all) or the queue's Redis answers (worker). SDXL can take
# minutes to load: failures in the start period do not count. No systemd in the container host (podman
# without it): `podman healthcheck run NAME` runs the same check on demand.
HEALTHCHECK --interval=15s --timeout=10s --start-period=10m --retries=3 \
  CMD ["/opt/venv/bin/python", "/app/scripts/container_healthcheck.py"]
# SIGTERM drains as the systemd units do (README "Jobs and restarts"): give the container
# TWIN_DRAIN_SECONDS + 25 s to stop (`docker run --stop-timeout 50`, compose stop_grace_period: 50s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/app/scripts/docker-entrypoint.sh"]
CMD ["all"]

# For platforms that mount volumes owned by root and cannot start a container as another user (RunPod's
# /workspace): the entrypoint starts as root, creates and chowns TWIN_DATA_DIR, TWIN_MODEL_DIR and HF_HOME
# to uid 10001, then drops to it (setpriv) before anything else runs. Build with --target root-start.
FROM app AS root-start
USER root

# The default target: everything runs as the unprivileged user.
FROM app AS runtime
USER twin
