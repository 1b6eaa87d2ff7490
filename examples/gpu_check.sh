#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine, about 5 minutes. Results land in $OUT.
#   here, first:  bash examples/gpu_wheels.sh        (the wheels the GPU image lacks, into .whl/, git-ignored)
#   there:        bash examples/gpu_check.sh         (the device tool sets $OUT; carry .whl along)
#   dry run:      TINY=1 OUT=/tmp/gpu-check bash examples/gpu_check.sh   (any CPU: tiny models, about a minute)
# It installs nothing from the network: the machine's own torch and transformers, the carried wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# the carried wheels, only where this Python lacks them (the GPU image has no fastapi, pydantic, uvicorn, ...)
if ! "$PY" -c 'import fastapi, uvicorn, pydantic, sse_starlette, llguidance' 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} | tee "$OUT/versions.txt"
# the tests marked gpu (they skip without CUDA); a failure is recorded, and the benchmark still runs
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1 || true
tail -3 "$OUT/gpu-tests.txt"
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m tokenmill.benchmarks.gpu --out "$OUT" ${TINY:+--tiny} > "$OUT/bench.txt" 2>&1 || { tail -30 "$OUT/bench.txt"; exit 1; }
cat "$OUT/results.md"
