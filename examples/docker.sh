#!/usr/bin/env bash
# tokenmill in a container (see the README's Docker section). Build from the repository's root:
docker build -t tokenmill .  # PyPI's CUDA torch, for GPU hosts
docker build -t tokenmill-cpu --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" .
# On a GPU host (the NVIDIA driver and container toolkit installed): bf16 on CUDA by default.
docker run --rm --gpus all -p 8000:8000 -v tokenmill:/models tokenmill
# On the CPU:
docker run --rm -p 8000:8000 -v tokenmill:/models tokenmill-cpu
# Another model, a mounted directory readable by uid 1000, with a key:
docker run --rm --gpus all -p 8000:8000 -v tokenmill:/models -v "$PWD/my-model:/my-model:ro" \
  -e TOKENMILL_API_KEY=sk-local tokenmill --model /my-model --served-model-name my-model
