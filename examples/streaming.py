"""Streaming with the openai SDK: text as it is generated, and the usage chunk at the end."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("BASE", "http://127.0.0.1:8000") + "/v1", api_key=os.environ.get("TOKENMILL_API_KEY", "none"))
model = client.models.list().data[0].id

stream = client.completions.create(
    model=model,
    prompt="Here is a short poem about the sea:\n",
    max_tokens=48,
    stream=True,
    stop=["\n\n"],
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].text, end="", flush=True)
    elif chunk.usage:
        print(f"\n[{chunk.usage.completion_tokens} tokens]")
