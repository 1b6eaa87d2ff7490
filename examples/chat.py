"""The official openai SDK against tokenmill's chat endpoint: a reply, a stream, n with a seed, logprobs."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("BASE", "http://127.0.0.1:8000") + "/v1", api_key=os.environ.get("TOKENMILL_API_KEY", "none"))
model = client.models.list().data[0].id
question = [{"role": "user", "content": "What is the capital of France?"}]

out = client.chat.completions.create(model=model, messages=question, max_completion_tokens=32, temperature=0)
print(repr(out.choices[0].message.content), out.usage)

for chunk in client.chat.completions.create(model=model, messages=question, max_completion_tokens=32, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

out = client.chat.completions.create(
    model=model, messages=[{"role": "system", "content": "Answer in one word."}, *question], n=2, seed=7, max_completion_tokens=8, logprobs=True, top_logprobs=2
)
for choice in out.choices:
    print(choice.index, repr(choice.message.content), [(t.token, round(t.logprob, 2)) for t in choice.logprobs.content[:3]])
