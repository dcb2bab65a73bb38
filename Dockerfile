# syntax=docker/dockerfile:1
# The comfy-worker image: CUDA 12.8 + PyTorch, ComfyUI at a pinned version, the worker, and start.sh (under
# tini) as the entrypoint. Layers go from what changes least (system packages, PyTorch, ComfyUI) to what
# changes most (the worker's code). Build with ./build.sh; docs/deploy.md explains every build argument.
#   BAKE=none    (default) custom nodes and models are provisioned at run time onto the volume.
#   BAKE=nodes   the custom nodes of config.yml are installed into the image too (/opt/workspace).
#   BAKE=models  the same, plus the models: a fat image that starts warm without a network volume.
# Two Python environments, one per program:
#   /opt/venv           the worker (runpod, requests, ...): small, torch-free (WORKER_PYTHON).
#   the system Python   PyTorch and ComfyUI's requirements (COMFYUI_BASE_PYTHON); custom nodes' requirements
#                       go into a venv on the volume on top of it (see comfy_worker/pyenv.py).
# Secrets are build secrets, never ARG/ENV, so they are in no layer:
#   HF_TOKEN, CIVITAI_TOKEN  gated downloads while baking (./build.sh --secret id=HF_TOKEN,env=HF_TOKEN)
#   ca_bundle                a PEM file of extra CA certificates to trust while building (a TLS-inspecting
#                            proxy): --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG BAKE=none

# RunPod runs linux/amd64 only: both stages pin it, so a plain `docker build` on an arm64 laptop still makes an
# image (with an amd64 uv binary in it) that runs there.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${UV_IMAGE} AS uv

# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${CUDA_IMAGE} AS worker

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04 (the CUDA image) has Python 3.12; Debian 12 has 3.11.
ARG PYTHON_VERSION=3.12
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMFYUI_BASE_PYTHON=/usr/bin/python${PYTHON_VERSION}

# System packages: Python, git for ComfyUI and custom nodes, ffmpeg and the GL/GLib libraries that video and
# OpenCV nodes load, libwebp for the worker's WebP outputs (comfy_worker/runtime/webp.py), tini as PID 1.
# Unpinned on purpose: the distribution keeps one version of each.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    set -eux; \
    rm -f /etc/apt/apt.conf.d/docker-clean; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" ca-certificates git git-lfs ffmpeg \
        libgl1 libglib2.0-0 libsm6 libxext6 libxrender1 libgomp1 libwebp7 procps tini

COPY --from=uv /uv /uvx /usr/local/bin/

# PyTorch from its CUDA 12.8 index, into the system Python: the biggest layer, and the one that changes least.
# The wheels bring CUDA and cuDNN themselves, so the base image only needs the driver's libraries.
ARG TORCH_VERSION=2.9.0
ARG TORCHVISION_VERSION=0.24.0
ARG TORCHAUDIO_VERSION=2.9.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=cache,target=/root/.cache/uv \
    set -eux; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    uv pip install --system --break-system-packages --python "$COMFYUI_BASE_PYTHON" --index-url "$TORCH_INDEX_URL" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION"

# ComfyUI at a pinned version, with its requirements in the same Python as PyTorch (torch itself stays as it
# is). Provisioning copies this checkout onto the volume when the config asks for this version, and the
# marker below tells it that these requirements are installed: a fresh container installs nothing. A config
# asking for another version still works: that one is cloned, and its requirements go into the volume's venv.
# comfyui-requirements.txt: what ComfyUI imports but does not list (requests for 0.3.64), installed with it.
# The build ends with ComfyUI's own start-up check (--quick-test-for-ci: every import of main.py, its nodes and
# its database, then exit), so an environment that cannot start ComfyUI fails the build instead of every job.
ARG COMFYUI_REPO=https://github.com/comfyanonymous/ComfyUI
ARG COMFYUI_VERSION=v0.3.64
COPY comfy_worker/provision/comfyui-requirements.txt /opt/comfy-worker/comfy_worker/provision/
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=cache,target=/root/.cache/uv \
    set -eux; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle GIT_SSL_CAINFO=/run/secrets/ca_bundle; fi; \
    git clone --quiet --depth 1 --branch "$COMFYUI_VERSION" "$COMFYUI_REPO" /opt/ComfyUI \
        || git clone --quiet --branch "$COMFYUI_VERSION" "$COMFYUI_REPO" /opt/ComfyUI; \
    uv pip freeze --python "$COMFYUI_BASE_PYTHON" | grep -E '^(torch|torchvision|torchaudio)==' >/tmp/torch-pins.txt; \
    extra=/opt/comfy-worker/comfy_worker/provision/comfyui-requirements.txt; \
    uv pip install --system --break-system-packages --python "$COMFYUI_BASE_PYTHON" \
        --constraint /tmp/torch-pins.txt -r /opt/ComfyUI/requirements.txt -r "$extra"; \
    rm /tmp/torch-pins.txt; \
    key="$({ printf 'requirements.txt\0'; cat /opt/ComfyUI/requirements.txt; \
             printf 'comfyui-requirements.txt\0'; cat "$extra"; } | sha256sum | cut -c1-16)"; \
    prefix="$("$COMFYUI_BASE_PYTHON" -c 'import sys; print(sys.prefix)')"; \
    printf '{"installed": ["comfyui:ComfyUI:%s"]}\n' "$key" >"$prefix/comfy-worker-env.json"; \
    "$COMFYUI_BASE_PYTHON" -m compileall -q -j 0 /opt/ComfyUI; \
    boot="$(mktemp -d)"; mkdir "$boot/user" "$boot/input" "$boot/output"; \
    if ! "$COMFYUI_BASE_PYTHON" /opt/ComfyUI/main.py --cpu --quick-test-for-ci --temp-directory "$boot" \
            --input-directory "$boot/input" --output-directory "$boot/output" --user-directory "$boot/user" \
            --database-url "sqlite:///$boot/comfyui.db" \
            >"$boot/log" 2>&1 || grep -q 'IMPORT FAILED' "$boot/log"; then \
        cat "$boot/log"; echo "ComfyUI cannot start in the image's Python (its log is above)" >&2; exit 1; \
    fi; \
    rm -rf "$boot"
# The custom nodes' venv on the volume is keyed by what it is built on: a new Python, PyTorch or ComfyUI makes
# a new one (once per volume), an unchanged image finds it there.
ENV COMFYUI_BAKED_DIR=/opt/ComfyUI \
    COMFYUI_REPO=${COMFYUI_REPO} \
    COMFYUI_VENV_KEY=py${PYTHON_VERSION}-torch${TORCH_VERSION}-comfyui-${COMFYUI_VERSION}

# Optional attention accelerators (off by default): SageAttention's Triton kernels, and the C compiler and
# Python headers Triton needs to build its launchers at run time. ComfyUI uses them with --use-sage-attention.
ARG ACCELERATORS=false
ARG SAGEATTENTION_VERSION=1.0.6
ARG TRITON_VERSION=3.5.0
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca_bundle \
    set -eux; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    if [ "$ACCELERATORS" = true ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends build-essential "python${PYTHON_VERSION}-dev"; \
        uv pip install --system --break-system-packages --python "$COMFYUI_BASE_PYTHON" \
            "triton==$TRITON_VERSION" "sageattention==$SAGEATTENTION_VERSION"; \
    fi

# The worker's own venv: its pinned dependencies only (no PyTorch), so no custom node's requirement can break
# it. JupyterLab (local and pod images only: WITH_JUPYTER=true) gets a venv of its own.
ARG WITH_JUPYTER=false
ARG JUPYTERLAB_VERSION=4.6.6
COPY requirements.txt /opt/comfy-worker/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca_bundle \
    set -eux; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    uv venv --python "$COMFYUI_BASE_PYTHON" /opt/venv; \
    uv pip install --python /opt/venv/bin/python -r /opt/comfy-worker/requirements.txt; \
    if [ "$WITH_JUPYTER" = true ]; then \
        uv venv --python "$COMFYUI_BASE_PYTHON" /opt/jupyter; \
        uv pip install --python /opt/jupyter/bin/python "jupyterlab==$JUPYTERLAB_VERSION"; \
    fi

# The worker itself, in two steps: here what provisioning runs (start.sh, bake.sh, comfy_worker.provision and the
# shared modules it imports), so the bake below depends on nothing else; the worker's runtime is copied after
# the bake, and editing it never re-bakes (re-downloads) a fat image's models. The package is found through a
# .pth file in the worker's venv, not installed, so the second copy needs no install step.
WORKDIR /opt/comfy-worker
COPY start.sh bake.sh config.yml config.schema.json ./
COPY comfy_worker/__init__.py comfy_worker/settings.py comfy_worker/errors.py comfy_worker/redact.py \
     comfy_worker/fsutil.py comfy_worker/
COPY comfy_worker/provision/ comfy_worker/provision/
RUN echo /opt/comfy-worker >"$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/comfy-worker.pth"

# start.sh uses this interpreter instead of making a .venv; BAKED_CONFIG is config.yml's last fallback
# (after CONFIG_YML and $WORKSPACE/config.yml).
ENV WORKER_PYTHON=/opt/venv/bin/python \
    JUPYTER_PYTHON=/opt/jupyter/bin/python \
    BAKED_CONFIG=/opt/comfy-worker/config.yml \
    PIP_NO_CACHE_DIR=1

FROM worker AS bake-none

# A fat image: `start.sh provision` (the same provisioning start.sh runs at every start) installs into
# /opt/workspace at build time; at run time the SHA gate finds it done and the worker starts warm.
# CONFIG_YML (optional): bake this config instead of config.yml; it replaces the image's config.yml.
FROM worker AS baked
ARG BAKE
ARG CONFIG_YML=""
ENV WORKSPACE=/opt/workspace
RUN --mount=type=secret,id=HF_TOKEN \
    --mount=type=secret,id=CIVITAI_TOKEN \
    --mount=type=secret,id=ca_bundle \
    /opt/comfy-worker/bake.sh "$BAKE"

# BAKE=nodes: the models are downloaded at run time, onto the network volume where there is one.
FROM baked AS bake-nodes
ENV MODELS_DIR=/runpod-volume/models
FROM baked AS bake-models

# hadolint ignore=DL3006
FROM bake-${BAKE}
WORKDIR /opt/comfy-worker
COPY README.md handler.py apply_config.sh install_nodes.py download_models.py s3_upload.py test_input.json ./
COPY comfy_worker/ comfy_worker/
COPY examples/ examples/
# 8000: the runpod local API (local mode); 8188: ComfyUI; 8888: JupyterLab (only with JUPYTER_PASSWORD).
EXPOSE 8000 8188 8888
# tini is PID 1: it reaps zombies and passes SIGTERM to start.sh's whole process group (-g), provisioning
# included, so `docker stop` ends the container in seconds at any stage.
# No argument: the RunPod worker (the local API outside RunPod). `provision`: provisioning only.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/opt/comfy-worker/start.sh"]
