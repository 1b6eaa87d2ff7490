"""Logits -> tokens and logprobs, batched: bias, penalties, temperature, top-k/top-p, draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """What one sampling step chose, and how likely the model found it."""

    tokens: list[int]  # [B]
    logprobs: list[float]  # [B] the model's own log probability of each chosen token
    top_ids: list[list[int]]  # [B, k] the k most likely tokens (k = the most any row asked for)
    top_logprobs: list[list[float]]  # [B, k]


@dataclass
class SamplingRow:
    """One sequence's inputs to a sampling step."""

    params: SamplingParams
    prompt_ids: tuple[int, ...]
    output_ids: list[int]
    generator: torch.Generator | None
    eos_ids: tuple[int, ...] = ()


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Choose one token per row of `logits` [B, V] by each row's own settings."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V], reported before any knob applies
    logits = apply_logit_bias(logits, rows)
    logits = apply_penalties(logits, rows)
    logits = ban_early_eos(logits, rows)
    tokens = draw(logits, rows)  # [B]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # [B]
    k = max((r.params.logprobs or 0) for r in rows)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    return SamplerOutput(tokens.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist())


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its logits."""
    if not any(r.params.logit_bias for r in rows):
        return logits
    bias = torch.zeros_like(logits)  # [B, V]
    for i, r in enumerate(rows):
        for token, value in r.params.logit_bias.items():
            bias[i, token] = value
    return logits + bias


def token_counts(rows: list[SamplingRow], vocab: int, device) -> torch.Tensor:
    """How often each token has been generated so far, per row: [B, V]."""
    counts = torch.zeros(len(rows), vocab, device=device)
    for i, r in enumerate(rows):
        if r.output_ids:
            ids = torch.tensor(r.output_ids, device=device)
            counts[i].index_add_(0, ids, torch.ones(len(ids), device=device))
    return counts


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI's presence/frequency penalties, then HF-style repetition penalty."""
    p = [r.params for r in rows]
    if any(x.presence_penalty or x.frequency_penalty for x in p):
        counts = token_counts(rows, logits.shape[-1], logits.device)  # [B, V]
        freq = logits.new_tensor([x.frequency_penalty for x in p])[:, None]
        pres = logits.new_tensor([x.presence_penalty for x in p])[:, None]
        logits = logits - counts * freq - (counts > 0).float() * pres
    if any(x.repetition_penalty != 1.0 for x in p):
        seen = torch.zeros_like(logits, dtype=torch.bool)  # [B, V] prompt and output tokens
        for i, r in enumerate(rows):
            seen[i, torch.tensor([*r.prompt_ids, *r.output_ids], dtype=torch.long)] = True
        rep = logits.new_tensor([x.repetition_penalty for x in p])[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    return logits


def ban_early_eos(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """min_tokens: the end-of-sequence token cannot come before it."""
    early = [(i, r) for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens and r.eos_ids]
    if not early:
        return logits
    logits = logits.clone()
    for i, r in early:
        logits[i, list(r.eos_ids)] = float("-inf")
    return logits


def draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax; the rest sample from temperature, top-k and top-p."""
    greedy = logits.argmax(dim=-1)  # [B]
    hot = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not hot:
        return greedy
    sub = [rows[i] for i in hot]
    temperature = logits.new_tensor([r.params.temperature for r in sub])[:, None]
    shifted = logits[hot] - logits[hot].max(dim=-1, keepdim=True).values  # <= 0: no overflow at tiny T
    probs = torch.softmax(truncate(shifted / temperature, sub), dim=-1)  # [H, V]
    # argmax(p / E), E ~ Exp(1), is a draw from p; each row's E comes from its own generator
    # so that a seeded request's tokens do not depend on what else is in the batch.
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=r.generator) for r in sub])
    tokens = greedy.clone()
    tokens[hot] = (probs / noise).argmax(dim=-1)
    return tokens


def truncate(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Keep each row's top_k tokens and its smallest set with top_p of the mass."""
    top_p = logits.new_tensor([r.params.top_p for r in rows])[:, None]  # [B, 1]
    top_k = torch.tensor([r.params.top_k for r in rows], device=logits.device)[:, None]
    if bool((top_p >= 1.0).all()) and bool((top_k <= 0).all()):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the top token always survives
    drop = mass_before > top_p
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop |= (top_k > 0) & (rank >= top_k)
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[tuple[float, list[int], list[float]]]:
    """For tokens 1..P-1 of a prompt: their logprob and the top k, from prefill logits [P, V]."""
    out = []
    targets = torch.tensor(token_ids[1:], device=logits.device)  # [P-1]
    logits = logits[: len(targets)]  # row i predicts token i+1
    for start in range(0, len(targets), 256):  # bounded memory on long prompts
        lp = torch.log_softmax(logits[start : start + 256].float(), dim=-1)  # [C, V]
        chosen = lp.gather(1, targets[start : start + 256, None])[:, 0]
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        out += zip(chosen.tolist(), top_ids.tolist(), top_lp.tolist())
    return out
