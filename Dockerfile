# tokenmill for GPU hosts: docker run --gpus all -p 8000:8000 -v tokenmill:/models tokenmill
# torch from PyPI on Linux x86_64 is the CUDA build and carries its own CUDA libraries;
# the host needs only the NVIDIA driver and the container toolkit.
#   BASE_IMAGE: any image with python3 (3.10+) and its venv module.
#   TORCH: the torch requirement, with pip options if needed, e.g. for a small CPU image:
#     --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG TORCH="torch==2.11.0"

# TOKENMILL_HOME is a cache folder, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENMILL_HOME=/models \
    HF_HOME=/models/huggingface \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# One layer: the virtual environment, tokenmill, its user and the model folder; no pip cache, no build
# tools, and the source tree removed (the package is installed, not linked).
# TORCH is split into words on purpose: a requirement and its pip options.
# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir $TORCH . \
    && rm -rf /app/src /app/build /root/.cache \
    && useradd --create-home --uid 1000 tokenmill \
    && mkdir -p /models \
    && chown tokenmill /models

USER 1000
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["tokenmill", "serve", "--host", "0.0.0.0", "--port", "8000"]
