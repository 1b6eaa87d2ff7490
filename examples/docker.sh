#!/usr/bin/env bash
# tokenmill in a container. Build once, from the repository's root:
docker build -t tokenmill .
# On the CPU (TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for a small image):
docker run --rm -p 8000:8000 -v tokenmill:/models tokenmill
# On a GPU host (the NVIDIA driver and container toolkit installed): bf16 on CUDA by default.
docker run --rm --gpus all -p 8000:8000 -v tokenmill:/models tokenmill
# Another model, by hub id or a mounted directory, with a key:
docker run --rm --gpus all -p 8000:8000 -v tokenmill:/models -v "$PWD/my-model:/my-model:ro" \
  -e TOKENMILL_API_KEY=sk-local tokenmill --model /my-model --served-model-name my-model
