"""A 27M-parameter llama with SmolLM2's tokenizer and random weights: the small model of the benchmarks.

    python -m tokenmill.benchmarks.llama27m OUT_DIR [--tokenizer DIR]

Its speed, not its text, is what is measured: 15 layers of width 256 (4 heads of 64, 2 kv heads),
MLP 1024, a 49,152-token vocabulary with tied embeddings, float32 (110 MB).
"""

from __future__ import annotations

import argparse


def build(out_dir: str, tokenizer_dir: str) -> None:
    """Save the model and the tokenizer of `tokenizer_dir` to `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=15,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="a model directory whose tokenizer to use (default: the cached default model)")
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from tokenmill.models.cache import ModelCache, default_home
        from tokenmill.models.sources import resolve

        tokenizer = resolve(None, ModelCache(default_home())).path
    build(args.out_dir, tokenizer)
    print(args.out_dir)


if __name__ == "__main__":
    main()
