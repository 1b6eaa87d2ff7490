#!/usr/bin/env bash
# The wheels the GPU image lacks, for its Python 3.12, into .whl/ (git-ignored here); its own torch 2.11 and
# transformers 5.17 are used as they are. Versions: the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 sse-starlette==3.7.0 llguidance==1.9.1 gguf==0.19.0 uvloop==0.23.0 httptools==0.9.0
ls .whl
