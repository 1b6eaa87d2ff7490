"""The only code that calls the model: one forward over a flat batch of every scheduled token."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.engine import attention, llama_forward
from tokenmill.engine.attention import AttentionBackend, Chunk, StepContext, TorchAttention, Workspace
from tokenmill.engine.linear import PackedLinear
from tokenmill.engine.llama_forward import Argmax, LlamaForward

if TYPE_CHECKING:  # transformers is imported by whoever loads the model
    from transformers import PreTrainedModel


@dataclass
class Work:
    """One sequence's share of a step: tokens to compute, where they go, and which logits to keep."""

    token_ids: list[int]
    start: int  # position of the first token
    blocks: list[int]  # the sequence's block table, covering every position up to the last token
    prefill: bool  # prompt positions (computed as a chunk) or one generated position (decode)
    logits: int = 0  # logits wanted for the last `logits` tokens (0: none, len(token_ids): all)
    argmax_below: int = 0  # > 0: its one logits row is read only for its first argmax over [0, argmax_below)


@dataclass(frozen=True)
class KVShape:
    """What one token's keys and values take, per layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @staticmethod
    def of(model_config, dtype: torch.dtype) -> KVShape:
        """Read layers, kv heads and head size off a transformers config."""
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        return KVShape(model_config.num_hidden_layers, kv_heads, head_dim, dtype)


class ModelRunner:
    """Runs a transformers causal LM over the paged KV pool.

    batch_invariant pads every step to a multiple of 16 rows (and the logits to 16 or more) where a
    matmul layer runs on MKL, so each row goes through the same kernels whatever else is in the step;
    without it, `LlamaForward` runs steps of 1-4 rows through its compiled small matmul.
    model_impl "auto" runs llama and qwen2 models through `LlamaForward` (the same numbers without
    transformers' per-layer Python); "transformers", or any other model, calls the model itself.
    kv_dtype is the pool's element type (None: the weights'); attention reads it into the weights' dtype.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        batch_invariant: bool = True,
        backend: AttentionBackend | None = None,
        model_impl: str = "auto",
        llama_ops=None,
        matmul=None,
        kv_dtype: torch.dtype | None = None,
        argmax_screen: str = "auto",
    ):
        attention.register()
        model.set_attn_implementation(attention.NAME)
        packed = device.type == "cpu" and next(model.parameters()).dtype == torch.float32 and torch.backends.mkldnn.is_available()
        fits = model_impl == "auto" and llama_forward.fits(model)
        self.backend = backend or TorchAttention()
        library = getattr(self.backend, "library", None)  # the compiled attention kernels, where the backend has them
        self.dtype = next(model.parameters()).dtype  # what attention computes in
        self.shape = KVShape.of(model.config, kv_dtype or self.dtype)  # what the pool holds
        self.lean = LlamaForward(model, packed, llama_ops, batch_invariant, matmul, library, self.shape.dtype, argmax_screen) if fits else None
        if packed and self.lean is None:
            pack_linears(model, matmul)
        self.model = model
        self.device = device
        self.block_size = block_size
        # packed linears agree at every row count; only other matmul layers (GPT-2's Conv1D, MKL) need padding
        self.pad_rows = batch_invariant and not (packed and not _unpacked_matmuls(model))
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # the width of the logits
        self.scratch = num_blocks  # one extra block: padding rows write here, padded tables point here
        s = self.shape  # zeros, not empty: a masked key weighs 0, and 0 x NaN would be NaN
        self.kv = torch.zeros(s.layers, 2, s.kv_heads, num_blocks + 1, block_size, s.head_dim, dtype=s.dtype, device=device)
        self.workspace = Workspace(s.dtype, device)
        # a generated position then has the same bits recomputed in a chunk as it had alone, so the engine recomputes
        # a preempted sequence's generated positions in chunks and lets its generated blocks into the prefix cache
        self.generated_as_prompt = batch_invariant and attention.positions_agree(self.backend, self.dtype, self.kv, model.config.num_attention_heads)
        # keys are gathered in whole value chunks, so tables are padded to this many blocks
        self._table_multiple = math.lcm(block_size, attention.VALUE_CHUNK) // block_size

    @torch.inference_mode()
    def execute(self, works: list[Work]) -> list[torch.Tensor | None]:
        """One forward over every work; each work's wanted logits [n, V] (None where it wants none)."""
        works_order = sorted(range(len(works)), key=lambda i: works[i].prefill)  # decode rows first
        ordered = [works[i] for i in works_order]
        upload = Upload()
        build = self._inputs(ordered, upload)
        keep_part, spans, argmax = self._logit_rows(ordered, upload)
        parts = upload.send(self.device)  # the step's one host-to-device copy
        ids, positions, step = build(parts)
        if self.lean is not None:
            logits = self.lean(ids, positions, parts[keep_part], step, argmax)  # [len(keep), V]
        else:
            out = self.model(input_ids=ids[None], position_ids=positions[None], logits_to_keep=parts[keep_part], use_cache=False, tokenmill_step=step)
            logits = out.logits[0]
        results: list[torch.Tensor | None] = [None] * len(works)
        for i, span in zip(works_order, spans, strict=True):
            results[i] = logits[span] if span is not None else None
        return results

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source -> destination) in every layer: copy on write of shared blocks."""
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.device)
            self.kv[:, :, :, dst] = self.kv[:, :, :, src]

    def _inputs(self, works: list[Work], upload: Upload) -> Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor, StepContext]]:
        """Gather flat token ids, positions and pool slots [T] (padded) and the attention context's tables into
        `upload`; returns what builds (ids, positions, StepContext) from the sent parts."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        chunks: list[tuple[slice, int, int]] = []  # rows, start, upload part of the block table
        decode = [w for w in works if not w.prefill]
        for w in works:
            row = len(ids)
            ids += w.token_ids
            positions += range(w.start, w.start + len(w.token_ids))
            slots += [w.blocks[p // self.block_size] * self.block_size + p % self.block_size for p in positions[row:]]
            if w.prefill:
                chunks.append((slice(row, len(ids)), w.start, upload.add(self._table(w.blocks, w.start + len(w.token_ids)))))
        pad = self._padding(len(ids))
        parts = [upload.add(ids + [0] * pad), upload.add(positions + [0] * pad), upload.add(slots + [self.scratch * self.block_size] * pad)]
        tables = [self._table(w.blocks, w.start + 1) for w in decode]
        width = max((len(tb) for tb in tables), default=0)
        if decode:
            parts += [upload.add([b for tb in tables for b in tb + [self.scratch] * (width - len(tb))]), upload.add(positions[: len(decode)])]

        def build(sent: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
            ids_t, positions_t, slots_t = (sent[i] for i in parts[:3])
            step = StepContext(self.kv, slots_t, len(decode), None, None, backend=self.backend, workspace=self.workspace)
            if decode:
                step.decode_blocks = sent[parts[3]].view(len(decode), width)  # [D, nb]
                decoded = sent[parts[4]]  # [D] their positions
                step.decode_bias = attention.visibility(decoded, width * self.block_size, self.dtype)[:, None, :]  # [D, 1, L]
                step.decode_lens = decoded + 1  # [D] keys each one sees
            step.chunks = [Chunk(rows, start, sent[part]) for rows, start, part in chunks]
            return ids_t, positions_t, step

        return build

    def _table(self, blocks: list[int], num_tokens: int) -> list[int]:
        """The blocks covering positions [0, num_tokens), padded with scratch to whole value chunks."""
        needed = -(-num_tokens // self.block_size)
        width = -(-needed // self._table_multiple) * self._table_multiple
        return blocks[:needed] + [self.scratch] * (width - needed)

    def _padding(self, rows: int) -> int:
        """Rows to add so the step's matmuls take the same kernels whatever its size."""
        if not self.pad_rows:
            return 0
        return max(attention.MIN_ROWS, -(-rows // attention.MIN_ROWS) * attention.MIN_ROWS) - rows

    def _logit_rows(self, works: list[Work], upload: Upload) -> tuple[int, list[slice | None], Argmax | None]:
        """Rows whose logits are wanted (padded to 16 or more; their upload part), each work's span among them, and
        those of them read only for their argmax (None: none)."""
        keep: list[int] = []
        spans: list[slice | None] = []
        argmax = Argmax([], 0)
        row = 0
        for w in works:
            row += len(w.token_ids)
            spans.append(slice(len(keep), len(keep) + w.logits) if w.logits else None)
            if w.argmax_below and w.logits == 1:
                argmax.rows.append(len(keep))
                argmax.limit = w.argmax_below
            keep += range(row - w.logits, row)
        if not keep:
            keep = [0]
        if self.pad_rows and len(keep) < attention.MIN_ROWS:
            keep += [keep[-1]] * (attention.MIN_ROWS - len(keep))
        return upload.add(keep), spans, argmax if argmax.rows else None


class Upload:
    """A step's integer inputs, gathered on the host and sent to the device as one tensor (pinned and non-blocking on CUDA)."""

    def __init__(self):
        self._parts: list[list[int]] = []

    def add(self, values: list[int]) -> int:
        """Queue a list; returns its index among the sent parts."""
        self._parts.append(values)
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        """Every queued list as an int64 tensor on the device, in the order added: one copy for all of them."""
        host = torch.tensor([v for part in self._parts for v in part], dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()
        return list(host.to(device, non_blocking=True).split([len(part) for part in self._parts]))


def pack_linears(model: torch.nn.Module, matmul=None) -> None:
    """Run every nn.Linear through a `PackedLinear` (the compiled matmul where given, else oneDNN), packed once.

    oneDNN measured here (fp32, 2 threads): 2x MKL's speed at 16 rows, 1.5x at 64; the compiled matmul
    is faster again (engine/linear.py). Either way every row's bits are the same whatever the number of
    rows (MKL's are not below 12). Costs a second copy of the weights. The projections of one input
    (q/k/v, gate/up) become one matmul (`_fuse`).
    """
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(_packed_forward, PackedLinear(module.weight, module.bias, matmul))  # type: ignore[method-assign]  # one instance's forward, patched on purpose
    for module in list(model.modules()):
        _fuse(module, ("q_proj", "k_proj", "v_proj"), matmul)
        _fuse(module, ("gate_proj", "up_proj"), matmul)


def _fuse(parent: torch.nn.Module, names: tuple[str, ...], matmul=None) -> None:
    """Projections of one input (q/k/v, gate/up) as one packed matmul.

    Measured here (SmolLM2 shapes, 2 threads): 27% less time for these matmuls at 1 row, 22% at 16,
    14% at 64, and every output element has the same bits as the separate matmuls'. The first
    projection computes them all; each other one takes its slice when called on the same tensor
    (another input computes every part and takes its own).
    """
    found = [getattr(parent, name, None) for name in names]
    layers = [layer for layer in found if type(layer) is torch.nn.Linear]
    if len(layers) != len(names):  # a projection is missing, or is not a plain nn.Linear
        return
    if len({layer.in_features for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1:
        return
    weight = torch.cat([layer.weight.detach() for layer in layers])  # [sum(out), in]
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
    packed = PackedLinear(weight, bias, matmul)
    sizes = [layer.out_features for layer in layers]
    pending: dict = {}  # the input last seen, and the slices not yet taken

    def all_parts(x):
        out = packed(x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1]).split(sizes, dim=-1)

    def first(self, x):
        parts = all_parts(x)
        pending.clear()
        pending.update({"x": x, **{i: part for i, part in enumerate(parts[1:], 1)}})
        return parts[0]

    def rest(self, x, i):
        if pending.get("x") is not x or i not in pending:
            return all_parts(x)[i]  # another input: rare, so computing every part is fine
        part = pending.pop(i)
        if len(pending) == 1:  # every slice taken: hold no activations between calls
            pending.clear()
        return part

    layers[0].forward = types.MethodType(first, layers[0])  # type: ignore[method-assign]  # one instance's forward, patched on purpose
    for i, layer in enumerate(layers[1:], 1):
        layer.forward = types.MethodType(lambda self, x, i=i: rest(self, x, i), layer)  # type: ignore[method-assign]  # as above


def _unpacked_matmuls(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers with a matrix of weights that pack_linears left alone (not nn.Linear, not a lookup)."""
    return [
        m
        for m in model.modules()
        if type(m) is not torch.nn.Linear
        and not isinstance(m, torch.nn.Embedding)
        and isinstance(weight := getattr(m, "weight", None), torch.Tensor)
        and weight.dim() == 2
    ]


def _packed_forward(linear: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward on its packed weight: x [..., in] -> [..., out]."""
    out = linear(x.reshape(-1, x.shape[-1]))
    return out.view(*x.shape[:-1], out.shape[-1])
