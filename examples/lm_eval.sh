#!/usr/bin/env bash
# lm-evaluation-harness against tokenmill (pip install 'lm-eval[api]'). Start a server first: tokenmill serve
# Loglikelihood tasks send the prompt and continuation as text with echo and logprobs; tokenmill tokenizes
# them itself, and lm-eval reads its tokenizer through /tokenizer_info and /tokenize (tokenizer_backend=remote).
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
MODEL=${MODEL:-SmolLM2-135M-Instruct}
TASKS=${TASKS:-hellaswag,arc_easy}  # downloads the datasets; point INCLUDE_PATH at local task YAML to run offline
EXTRA=(); [ -n "${INCLUDE_PATH:-}" ] && EXTRA=(--include_path "$INCLUDE_PATH")
lm_eval --model local-completions \
  --model_args "base_url=$BASE/v1/completions,model=$MODEL,tokenizer_backend=remote,tokenized_requests=False,num_concurrent=8,max_retries=3" \
  --tasks "$TASKS" --batch_size 1 "${EXTRA[@]}" ${LIMIT:+--limit "$LIMIT"}
