# syntax=docker/dockerfile:1
# The comfy-worker image: CUDA 12.8 + PyTorch, the worker, and start.sh as the entrypoint.
# Layers go from what changes least (system packages, PyTorch) to what changes most (the worker's code).
# Build with ./build.sh (buildx, linux/amd64); docs/deploy.md explains every build argument.
#   BAKE=none    (default) ComfyUI, nodes and models are provisioned at run time onto the volume.
#   BAKE=nodes   ComfyUI and the custom nodes of config.yml are installed into the image (/opt/workspace).
#   BAKE=models  the same, plus the models: a fat image that starts warm without a network volume.
# Tokens for gated downloads while baking are build secrets, never ARG/ENV:
#   ./build.sh --bake models --secret id=HF_TOKEN,env=HF_TOKEN

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG BAKE=none

# RunPod runs linux/amd64 only: both stages pin it, so a plain `docker build` on an arm64 laptop still makes an
# image (with an amd64 uv binary in it) that runs there.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${UV_IMAGE} AS uv

# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${CUDA_IMAGE} AS worker

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/opt/venv/bin/python

# System packages: Python 3.12 (Ubuntu 24.04's), git for ComfyUI and custom nodes, ffmpeg and the GL/GLib
# libraries that video and OpenCV nodes load. Unpinned on purpose: the Ubuntu archive keeps one version of each.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    set -eux; \
    rm -f /etc/apt/apt.conf.d/docker-clean; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv ca-certificates git git-lfs ffmpeg \
        libgl1 libglib2.0-0 libsm6 libxext6 libxrender1 libgomp1 procps

COPY --from=uv /uv /uvx /usr/local/bin/

# PyTorch from its CUDA 12.8 index: the biggest layer, and the one that changes least.
ARG TORCH_VERSION=2.9.0
ARG TORCHVISION_VERSION=0.24.0
ARG TORCHAUDIO_VERSION=2.9.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=cache,target=/root/.cache/uv \
    set -eux; \
    uv venv --python /usr/bin/python3.12 /opt/venv; \
    uv pip install --index-url "$TORCH_INDEX_URL" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION"

# Optional attention accelerators (off by default): SageAttention's Triton kernels, and the C compiler and
# Python headers Triton needs to build its launchers at run time. ComfyUI uses them with --use-sage-attention.
ARG ACCELERATORS=false
ARG SAGEATTENTION_VERSION=1.0.6
ARG TRITON_VERSION=3.5.0
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=cache,target=/root/.cache/uv \
    set -eux; \
    if [ "$ACCELERATORS" = true ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends build-essential python3.12-dev; \
        uv pip install "triton==$TRITON_VERSION" "sageattention==$SAGEATTENTION_VERSION"; \
    fi

# The worker's pinned dependencies, and JupyterLab for local and pod use (constrained by the same pins).
ARG WITH_JUPYTER=true
ARG JUPYTERLAB_VERSION=4.6.6
COPY requirements.txt /opt/comfy-worker/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    set -eux; \
    uv pip install -r /opt/comfy-worker/requirements.txt; \
    if [ "$WITH_JUPYTER" = true ]; then \
        uv pip install -c /opt/comfy-worker/requirements.txt "jupyterlab==$JUPYTERLAB_VERSION"; \
    fi

# The worker itself: what provisioning needs first, so a change to the rest does not re-bake.
WORKDIR /opt/comfy-worker
COPY pyproject.toml README.md handler.py start.sh bake.sh config.yml config.schema.json ./
COPY comfy_worker/ comfy_worker/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --no-deps /opt/comfy-worker

# start.sh uses this interpreter instead of making a .venv; BAKED_CONFIG is config.yml's last fallback
# (after CONFIG_YML and $WORKSPACE/config.yml).
ENV WORKER_PYTHON=/opt/venv/bin/python \
    BAKED_CONFIG=/opt/comfy-worker/config.yml

FROM worker AS bake-none

# A fat image: `start.sh provision` (the same provisioning start.sh runs at every start) installs into
# /opt/workspace at build time; at run time the SHA gate finds it done and the worker starts warm.
FROM worker AS baked
ARG BAKE
ENV WORKSPACE=/opt/workspace
RUN --mount=type=secret,id=HF_TOKEN \
    --mount=type=secret,id=CIVITAI_TOKEN \
    --mount=type=cache,target=/root/.cache/uv \
    /opt/comfy-worker/bake.sh "$BAKE"

# BAKE=nodes: the models are downloaded at run time, onto the network volume where there is one.
FROM baked AS bake-nodes
ENV MODELS_DIR=/runpod-volume/models
FROM baked AS bake-models

# hadolint ignore=DL3006
FROM bake-${BAKE}
WORKDIR /opt/comfy-worker
COPY apply_config.sh install_nodes.py download_models.py s3_upload.py test_input.json ./
COPY examples/ examples/
# 8000: the runpod local API (local mode); 8188: ComfyUI; 8888: JupyterLab (only with JUPYTER_PASSWORD).
EXPOSE 8000 8188 8888
# No argument: the RunPod worker (the local API outside RunPod). `provision`: provisioning only.
ENTRYPOINT ["/opt/comfy-worker/start.sh"]
