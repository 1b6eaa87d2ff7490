"""Paged attention inside transformers models, in torch ops whose numbers do not depend on the batch.

transformers calls `paged_attention` (registered through its `AttentionInterface`) from every
attention layer, with this step's `StepContext` among the forward's keyword arguments. It writes
the step's new keys and values into the block pool, then attends each query over its own
sequence's blocks.

Why the numbers hold still (fp32, CPU, measured with torch 2.13 / MKL): a matmul row's bits depend
on the kernel MKL picks, and it picks by shape. Rows below 12 take other kernels than rows at 12 or
more; a reduction longer than ~200 splits differently as it grows. So every position is computed by
one of two fixed recipes, chosen by what the position is, never by what else runs:

- a prompt position (prefill) attends as part of its chunk, queries padded to >= 16 rows;
- a generated position (decode) attends alone, its g = heads/kv_heads query rows batched beside the
  other sequences' in one bmm (batch members never change each other's bits).

Both split the weighted sum over values into chunks of VALUE_CHUNK keys and add the partial sums in
order; keys past a query's position weigh exactly 0. The pool keeps a block's keys as columns
([D][BS] in memory, so the compiled kernels load element d of 16 keys at once) and its values as rows;
`key_rows` views the keys as rows. The seam is `AttentionBackend`: on the CPU,
`NativeAttention` runs both kinds of position through compiled kernels (fixed recipes of their own);
a CUDA kernel that keeps fixed recipes replaces `TorchAttention` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

NAME = "tokenmill_paged"
MIN_ROWS = 16  # fewer matmul rows than this take other kernels with other rounding
VALUE_CHUNK = 64  # keys per partial sum of probabilities x values
RUN = 64  # prompt positions attended together (each run reads keys only up to its last position)


@dataclass
class Chunk:
    """A run of prompt positions of one sequence, computed together."""

    rows: slice  # its rows in the step's flat batch
    start: int  # position of its first token
    blocks: torch.Tensor  # [nb] the sequence's block table, padded to cover the chunk's keys


class Workspace:
    """One buffer for gathered keys and one for values, reused by every layer and step.

    Gathering into fresh tensors costs a page fault per 4 KiB each time; this memory stays mapped.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self._buffers = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]

    def take(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two flat buffers of at least `numel` elements of `dtype` (the pool's)."""
        if self._buffers[0].numel() < numel or self._buffers[0].dtype != dtype:
            self._buffers = [torch.empty(numel, dtype=dtype, device=b.device) for b in self._buffers]
        return self._buffers[0][:numel], self._buffers[1][:numel]


@dataclass
class StepContext:
    """Where this step's tokens sit in the pool: everything attention needs besides q, k and v."""

    kv: torch.Tensor  # [layers, 2, kv_heads, num_blocks, block_size, head_dim] the pool (keys stored as columns: key_rows)
    slots: torch.Tensor  # [T] pool slot (block * block_size + offset) written by each row
    decode_rows: int  # rows [0, decode_rows) are generated positions, one per sequence
    decode_blocks: torch.Tensor | None  # [D, nb] their block tables, padded
    decode_bias: torch.Tensor | None  # [D, 1, L] 0 where a key is visible, -inf past the position
    decode_lens: torch.Tensor | None = None  # [D] keys each generated position sees (its position + 1)
    chunks: list[Chunk] = field(default_factory=list)
    backend: AttentionBackend | None = None
    workspace: Workspace | None = None
    memo: dict = field(default_factory=dict)  # what every layer of this step shares (gather rows, masks)
    kv_written: bool = False  # the forward already wrote this step's keys and values into the pool


class AttentionBackend(Protocol):
    """How a device runs paged attention (TorchAttention on the CPU; a CUDA kernel plugs in here).

    key and value are None when the forward already wrote them into the pool (step.kv_written).
    """

    def __call__(
        self, layer: int, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, scaling: float, step: StepContext
    ) -> torch.Tensor: ...


def key_rows(keys: torch.Tensor) -> torch.Tensor:
    """A pool's keys [..., NB, BS, D], each block stored as its keys' columns ([D][BS] in memory), as a view [..., NB, BS, D] of rows."""
    *lead, nb, bs, d = keys.shape
    return keys.view(*lead, nb, d, bs).transpose(-1, -2)


def halves(pool: torch.Tensor) -> tuple[int, int]:
    """The addresses of pool[0] and pool[1] (a layer's keys and values), without indexing: each index costs microseconds."""
    return pool.data_ptr(), pool.data_ptr() + pool.stride(0) * pool.element_size()


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tokenmill_step=None, **kwargs):
    """transformers' attention interface: q [1, H, T, D], k/v [1, KVH, T, D] -> ([1, T, H, D], None)."""
    if tokenmill_step is None:
        raise RuntimeError(f"the {NAME} attention runs only inside tokenmill's model runner")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = tokenmill_step.backend(module.layer_idx, query[0], key[0], value[0], scale, tokenmill_step)
    return out.unsqueeze(0), None


def register() -> None:
    """Make `attn_implementation="tokenmill_paged"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)


class TorchAttention:
    """Paged attention in plain torch ops; pads and gathers, but every row's bits are fixed."""

    def __call__(self, layer, query, key, value, scaling, step):
        """q [H, T, D], k/v [KVH, T, D] for the step's rows -> [T, H, D]."""
        pool = step.kv[layer]  # [2, KVH, NB, BS, D]
        kvh, nb, bs, d = pool.shape[1:]
        if not step.kv_written:
            assert key is not None and value is not None  # given whenever the pool still lacks them
            key_rows(pool[0])[:, step.slots // bs, step.slots % bs] = key.to(pool.dtype)  # rounded where the pool is narrower
            pool[1].view(kvh, nb * bs, d).index_copy_(1, step.slots, value.to(pool.dtype))
        out = query.new_empty(query.shape[1], query.shape[0], d)  # [T, H, D]: decode rows, then chunks, then padding
        padding = step.chunks[-1].rows.stop if step.chunks else step.decode_rows
        if padding < out.shape[0]:
            out[padding:].zero_()  # padding rows stay 0 (finite keys downstream)
        if step.decode_rows:
            self._decode_rows(query, pool, step, scaling, out)
        if step.chunks:
            self._prefill(query, pool, step, scaling, out)
        return out

    def _decode_rows(self, query, pool, step, scaling, out):
        """Generated positions: q [H, T, D] -> the first decode_rows rows of out [T, H, D]."""
        out[: step.decode_rows] = self._decode(query[:, : step.decode_rows], pool, step, scaling)

    def _prefill(self, query, pool, step, scaling, out):
        """Prompt positions: q [H, T, D] -> their rows of out [T, H, D], chunk by chunk."""
        for i, chunk in enumerate(step.chunks):
            out[chunk.rows] = self._chunk(query[:, chunk.rows], pool, chunk, scaling, step, i)

    def _decode(self, query, pool, step, scaling):
        """Generated positions: q [H, B, D], one per sequence -> [B, H, D]."""
        kvh, d = pool.shape[1], pool.shape[-1]
        h, b = query.shape[:2]
        q = query.reshape(kvh, h // kvh, b, d).transpose(1, 2)  # [KVH, B, g, D]
        if "decode" not in step.memo:  # the same for every layer of the step
            step.memo["decode"] = gather_rows(step.decode_blocks, kvh, pool.shape[2])
        keys, values = _gather(pool, step.decode_blocks, step.memo["decode"], step.workspace, q.dtype)  # [KVH, B, L, D]
        out = _attend(q, keys, values, step.decode_bias, scaling)  # [KVH, B, g, D]
        return out.permute(1, 0, 2, 3).reshape(b, h, d)

    def _chunk(self, query, pool, chunk, scaling, step, index):
        """Prompt positions of one sequence: q [H, C, D] -> [C, H, D], RUN positions at a time.

        Each run reads the keys up to its own last position (in whole value chunks) instead of the
        chunk's: past a position keys weigh exactly 0, so the bits are the same and a long chunk
        does about half the work of attending every key.
        """
        kvh, d = pool.shape[1], pool.shape[-1]
        h, c = query.shape[:2]
        g = h // kvh
        if ("chunk", index) not in step.memo:  # the same for every layer of the step
            length = chunk.blocks.shape[0] * pool.shape[3]
            step.memo["chunk", index] = (gather_rows(chunk.blocks[None], kvh, pool.shape[2]), runs(chunk.start, c, g, length, query.dtype, query.device))
        gather, spans = step.memo["chunk", index]
        keys, values = _gather(pool, chunk.blocks[None], gather, step.workspace, query.dtype)  # [KVH, 1, L, D]
        grouped = query.reshape(kvh, g, c, d)
        out = query.new_empty(c, h, d)
        for a, b, length, bias in spans:
            q = grouped[:, :, a:b].reshape(kvh, 1, g * (b - a), d)  # rows ordered (head in group, position)
            if bias.shape[1] > g * (b - a):
                q = torch.cat([q, q.new_zeros(kvh, 1, bias.shape[1] - g * (b - a), d)], dim=2)
            o = _attend(q, keys[:, :, :length], values[:, :, :length], bias, scaling)[:, 0, : g * (b - a)]  # [KVH, g*n, D]
            out[a:b] = o.reshape(h, b - a, d).transpose(0, 1)
        return out


class NativeAttention(TorchAttention):
    """Attention through the compiled kernels (engine/csrc/paged_attention.cpp), which read the pool in place.

    Each kernel is its own fixed recipe: a generated position alone per (sequence, kv head), a prompt
    position by a recipe fixed by its position, so a request's tokens still never depend on what else
    runs. A float16 pool takes the _f16 kernels, which read each half exactly into float lanes and then
    run the same recipes. Shapes the kernels do not take (queries not float32, a pool neither float32 nor
    float16; head size not a multiple of 16, or for prompts not 16, 32, 64 or 128, or more than 8 query
    heads a kv head) use torch ops.
    """

    def __init__(self, library):
        self.library = library

    def _decode(self, query, pool, step, scaling):
        """Generated positions: q [H, B, D], one per sequence -> [B, H, D]."""
        out = query.new_empty(query.shape[1], query.shape[0], query.shape[2])
        if not self._run_decode(query, pool, step, scaling, out):
            return super()._decode(query, pool, step, scaling)
        return out

    def _decode_rows(self, query, pool, step, scaling, out):
        """Generated positions: q [H, T, D] -> the first decode_rows rows of out [T, H, D], written in place by the kernel."""
        if not self._run_decode(query[:, : step.decode_rows], pool, step, scaling, out):
            super()._decode_rows(query, pool, step, scaling, out)

    def _run_decode(self, query, pool, step, scaling, out) -> bool:
        """The decode kernel over q [H, B, D] (any strides, the last 1) into out's first B rows ([B, H, D] contiguous); False: a shape it does not take."""
        h, b, d = query.shape
        decode = kernel_for(self.library, "paged_decode", pool)
        if decode is None or d % 16 or query.dtype != torch.float32 or query.stride(-1) != 1:
            return False
        keys, values = halves(pool)  # [KVH, NB, BS, D] each, contiguous
        tables, lens = step.decode_blocks, step.decode_lens
        kvh, nb, bs = pool.shape[1:4]
        decode(
            query.data_ptr(), query.stride(0), query.stride(1), keys, values, tables.data_ptr(), lens.data_ptr(), 0, 0,
            out.data_ptr(), b, h, kvh, nb, bs, d, tables.shape[1], scaling, torch.get_num_threads(),
        )  # fmt: skip
        return True

    def _prefill(self, query, pool, step, scaling, out):
        """Prompt positions: q [H, T, D] -> their rows of out [T, H, D], every chunk in one call."""
        prefill = kernel_for(self.library, "paged_prefill", pool)
        if prefill is None or query.dtype != torch.float32 or query.stride(-1) != 1:
            return super()._prefill(query, pool, step, scaling, out)
        if "prefill" not in step.memo:  # the same for every layer of the step
            step.memo["prefill"] = prefill_tables(step.chunks)
        chunks, tables = step.memo["prefill"]
        keys, values = halves(pool)  # [KVH, NB, BS, D] each, contiguous
        kvh, nb, bs, d = pool.shape[1:]
        done = prefill(
            query.data_ptr(), query.stride(0), query.stride(1), keys, values, chunks.data_ptr(), tables.data_ptr(),
            len(step.chunks), out.data_ptr(), query.shape[0], kvh, nb, bs, d, scaling, torch.get_num_threads(),
        )  # fmt: skip
        if done != 0:  # a shape the kernel does not take
            super()._prefill(query, pool, step, scaling, out)


def kernel_for(library, name: str, pool: torch.Tensor):
    """The compiled kernel `name` for this pool's element type: float32, or float16 through `name`_f16 where the build has it; else None."""
    if pool.device.type != "cpu":
        return None
    if pool.dtype == torch.float32:
        return getattr(library, name)
    return getattr(library, name + "_f16", None) if pool.dtype == torch.float16 else None


def positions_agree(backend: AttentionBackend, dtype: torch.dtype, pool: torch.Tensor, heads: int) -> bool:
    """Whether a generated position recomputed as a prompt one gets the same bits: both compiled kernels run this model.

    The torch recipes for the two differ in the last bits; the compiled ones are one recipe (paged_attention.cpp).
    pool: [layers, 2, KVH, NB, BS, D]; dtype: what the queries are.
    """
    library = getattr(backend, "library", None)
    if library is None or dtype != torch.float32:
        return False
    decode, prefill = kernel_for(library, "paged_decode", pool), kernel_for(library, "paged_prefill", pool)
    if decode is None or prefill is None:
        return False
    return kernels_take(decode, prefill, heads, pool.shape[2], pool.shape[-1])


def kernels_take(decode, prefill, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether both compiled kernels have a recipe for this head size and group, asked with no work (they refuse a shape first)."""
    return (
        decode(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, heads, kv_heads, 1, 1, head_dim, 1, 1.0, 1) == 0
        and prefill(0, 0, 0, 0, 0, 0, 0, 0, 0, heads, kv_heads, 1, 1, head_dim, 1.0, 1) == 0
    )


def prefill_tables(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill kernel's view of a step's chunks: [C, 4] (first row, start, count, table offset) and their tables, concatenated."""
    offsets = [0]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + chunk.blocks.shape[0])
    meta = torch.tensor([[c.rows.start, c.start, c.rows.stop - c.rows.start, o] for c, o in zip(chunks, offsets, strict=True)], dtype=torch.long)
    return meta, torch.cat([c.blocks for c in chunks]).contiguous()


def runs(start: int, count: int, g: int, length: int, dtype: torch.dtype, device: torch.device) -> list[tuple[int, int, int, torch.Tensor]]:
    """A chunk's positions start..start+count-1 split into runs of RUN: (first, end, keys read, bias [1, rows, keys]).

    rows = g x the run's positions, padded to MIN_ROWS (padding rows see key 0); keys = up to the
    run's last position, rounded up to whole value chunks.
    """
    out = []
    for a in range(0, count, RUN):
        b = min(a + RUN, count)
        keys = min(length, -(-(start + b) // VALUE_CHUNK) * VALUE_CHUNK)
        positions = torch.arange(start + a, start + b, device=device).repeat(g)
        positions = torch.cat([positions, positions.new_zeros(max(0, MIN_ROWS - len(positions)))])
        out.append((a, b, keys, visibility(positions, keys, dtype)[None]))
    return out


def visibility(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, length] additive mask: 0 for keys at or before each position, -inf after."""
    keys = torch.arange(length, device=positions.device)
    bias = torch.zeros(len(positions), length, device=positions.device, dtype=dtype)
    return bias.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))


def gather_rows(blocks: torch.Tensor, kv_heads: int, num_blocks: int) -> torch.Tensor:
    """Block tables [B, nb] -> the rows [KVH * B * nb] of a layer's pool viewed as [KVH * NB, BS * D]."""
    return (torch.arange(kv_heads, device=blocks.device)[:, None] * num_blocks + blocks.reshape(1, -1)).reshape(-1)


def _gather(pool: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, workspace: Workspace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given block tables [B, nb] (at `rows`) -> two [KVH, B, nb * BS, D] of `dtype`."""
    kvh, num_blocks, bs, d = pool.shape[1:]
    b, nb = blocks.shape
    # one row per (kv head, block) of [KVH * NB, BS * D]: a single gather along the first dim
    keys, values = workspace.take(kvh * b * nb * bs * d, pool.dtype)
    torch.index_select(pool[0].view(kvh * num_blocks, bs * d), 0, rows, out=keys.view(-1, bs * d))
    torch.index_select(pool[1].view(kvh * num_blocks, bs * d), 0, rows, out=values.view(-1, bs * d))
    keys = key_rows(keys.view(kvh, b, nb, bs, d)).reshape(kvh, b, nb * bs, d)  # each block's columns turned into rows: a copy
    return keys.to(dtype), values.view(kvh, b, nb * bs, d).to(dtype)  # exact: the pool's dtype is no wider


def _attend(q, keys, values, bias, scaling):
    """softmax(q k^T * scale + bias) v, the sum over keys taken VALUE_CHUNK at a time.

    q [KVH, B, M, D], keys/values [KVH, B, L, D] with L a multiple of VALUE_CHUNK, bias [B, M, L].
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scaling).add_(bias)  # [KVH, B, M, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    kvh, b, m, length = probs.shape
    n = length // VALUE_CHUNK
    probs = probs.view(kvh, b, m, n, VALUE_CHUNK).transpose(2, 3)  # [KVH, B, n, M, C]
    partial = torch.matmul(probs, values.view(kvh, b, n, VALUE_CHUNK, -1))  # [KVH, B, n, M, D]
    return partial.sum(dim=2)
