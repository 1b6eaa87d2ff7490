# tokenmill for GPU hosts: docker run --gpus all -p 8000:8000 -v tokenmill:/models tokenmill
# torch from PyPI on Linux x86_64 is the CUDA build and carries its own CUDA libraries;
# the host needs only the NVIDIA driver and the container toolkit.
FROM python:3.12-slim

# TOKENMILL_HOME is a cache folder, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENMILL_HOME=/models \
    HF_HOME=/models/huggingface

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir "torch==2.11.0" . \
    && useradd --create-home --uid 1000 tokenmill \
    && mkdir -p /models \
    && chown tokenmill /models

USER 1000
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["tokenmill", "serve", "--host", "0.0.0.0", "--port", "8000"]
