"""The official openai SDK against tokenmill: completions, n, logprobs, and scoring a prompt."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("BASE", "http://127.0.0.1:8000") + "/v1", api_key=os.environ.get("TOKENMILL_API_KEY", "none"))
model = client.models.list().data[0].id

out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print(repr(out.choices[0].text), out.usage)

out = client.completions.create(model=model, prompt=["Roses are", "Violets are"], max_tokens=6, n=2, seed=7, logprobs=2)
for choice in out.choices:
    print(choice.index, repr(choice.text), choice.logprobs.tokens)

# lm-evaluation-harness style: echo the prompt with max_tokens=0 to get its log-likelihood.
scored = client.completions.create(model=model, prompt="Paris is the capital of France.", max_tokens=0, echo=True, logprobs=0)
print("log-likelihood:", sum(lp for lp in scored.choices[0].logprobs.token_logprobs if lp is not None))
