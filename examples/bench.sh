#!/usr/bin/env bash
# Load a running server the way `vllm bench serve` does: random 256-id prompts, 128 tokens each, 16 at a time.
# Start a server first: tokenmill serve. Works against any OpenAI-compatible /v1/completions (vLLM, llama-server, ...).
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
# Prompts are random token ids below VOCAB_SIZE (SmolLM2's 49152 by default; the server's /tokenizer_info says its own).
tokenmill bench serve --base-url "$BASE" --num-prompts "${NUM_PROMPTS:-64}" --input-len "${INPUT_LEN:-256}" \
  --output-len "${OUTPUT_LEN:-128}" --max-concurrency "${CONCURRENCY:-16}" --vocab-size "${VOCAB_SIZE:-49152}" \
  --result-json "${RESULT_JSON:-bench.json}"
