"""The openai SDK's async client against tokenmill: several requests at once, served in one batch."""

import asyncio
import os

from openai import AsyncOpenAI


async def main() -> None:
    async with AsyncOpenAI(base_url=os.environ.get("BASE", "http://127.0.0.1:8000") + "/v1", api_key=os.environ.get("TOKENMILL_API_KEY", "none")) as client:
        model = (await client.models.list()).data[0].id
        prompts = ["The capital of France is", "Water boils at", "The largest planet is"]
        replies = await asyncio.gather(*(client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0) for p in prompts))
        for prompt, reply in zip(prompts, replies, strict=True):
            print(repr(prompt), "->", repr(reply.choices[0].text))


asyncio.run(main())
