#!/usr/bin/env bash
# A completion, a streamed completion, scoring a text, an error, and a chat reply, with curl. Start a server first:
#   tokenmill serve            (then MODEL=SmolLM2-135M-Instruct, the default)
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
MODEL=${MODEL:-SmolLM2-135M-Instruct}
AUTH=(); [ -n "${TOKENMILL_API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $TOKENMILL_API_KEY")

curl -s "$BASE/v1/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}"
echo
curl -sN "$BASE/v1/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Once upon a time\", \"max_tokens\": 16, \"stream\": true, \"stream_options\": {\"include_usage\": true}}"
# Scoring, as lm-evaluation-harness does: echo the text with max_tokens 0; each token's logprob comes back.
curl -s "$BASE/v1/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Paris is the capital of France.\", \"max_tokens\": 0, \"echo\": true, \"logprobs\": 1}"
echo
curl -s "$BASE/v1/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"x\", \"temperature\": 3}"
echo
curl -s "$BASE/v1/chat/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_completion_tokens\": 32, \"temperature\": 0}"
echo
