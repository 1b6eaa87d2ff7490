"""How often tokenmill's greedy tokens differ from transformers `generate` at batch 1, same weights.

    python -m tokenmill.benchmarks.agreement [--model DIR] [--num-prompts 16] [--input-len 64] [--output-len 48]

tokenmill runs every prompt in one batch (its numbers do not depend on the batch); `generate` runs
each alone. A near-tie between two tokens can flip either way under different matmul kernels; after
a flip the texts go separate ways, so each prompt counts once, at its first differing position.
"""

from __future__ import annotations

import argparse


def run_engine(path: str, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """tokenmill's greedy token ids for every prompt, all in one batch."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import build_engine
    from tokenmill.sampling_params import Prompt, SamplingParams

    engine, _ = build_engine(EngineConfig(model=path), path, "agreement")  # built and run in this thread
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    groups = {}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), [Prompt(tuple(ids))], params)
        groups[i] = engine._requests[str(i)][0]
    while engine.has_unfinished():
        engine.step()
    return [groups[i].sequences[0].output_ids for i in range(len(prompts))]


def run_generate(path: str, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """transformers' greedy token ids, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)[
                0, len(ids) :
            ]
        out.append(y.tolist())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the cached default model)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts compared")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=48, help="tokens generated per prompt")
    args = parser.parse_args(argv)
    import random

    from transformers import AutoConfig

    from tokenmill.benchmarks.workload import id_pool, id_prompts
    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve

    path = args.model or resolve(None, ModelCache(default_home())).path
    pool = id_pool(AutoConfig.from_pretrained(path).vocab_size)
    prompts = id_prompts(random.Random(0), pool, args.num_prompts, args.input_len)
    ours, theirs = run_engine(path, prompts, args.output_len), run_generate(path, prompts, args.output_len)
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), None) for x, y in zip(ours, theirs, strict=True)]
    same = sum(f is None for f in firsts)
    print(f"{path}: {args.num_prompts} prompts of {args.input_len} random ids, {args.output_len} greedy tokens")
    print(f"identical to generate: {same} of {len(firsts)}; first differing positions: {[f for f in firsts if f is not None]}")


if __name__ == "__main__":
    main()
