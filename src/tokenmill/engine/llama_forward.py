"""The llama family's forward pass over the paged pool, without transformers' per-layer Python.

transformers' modules make ~50 small calls a layer (module hooks, keyword plumbing, views, RoPE's
slices and `cat`); at one sequence that is a quarter of a decode step here. `LlamaForward` does the
same arithmetic on the same weights in the same order, so its numbers equal the transformers path's
bit for bit (tests/test_model_impl.py), with q and k rotated together, the projections of one
input in one matmul, and each residual add folded into the norm after it. It takes only layers
built of the stock llama and qwen2 modules; any other model goes through transformers
(`--model-impl transformers` forces that for every model). Where every part of a layer has a compiled
kernel, all the layers of a step run in one compiled call instead (engine/native_layers.py).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.engine.attention import StepContext
from tokenmill.engine.host_memory import HugePageArena
from tokenmill.engine.linear import ArgmaxScreen, PackedLinear
from tokenmill.engine.native_layers import NativeLayers

log = logging.getLogger(__name__)

SMALL_ROWS = 4  # steps of at most this many rows take small_matmul where it is given (no batch invariance)

# the decoder layers whose parts this file reproduces (module class names in transformers)
STOCK_LAYERS = {
    "LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
}


class Projection:
    """One or more nn.Linear of the same input as one matmul: x [T, in] -> [T, sum(out)].

    On a float32 CPU the weight is packed once, for the compiled `matmul` where it is given, else for
    oneDNN (either way its rows' bits do not depend on the number of rows, see engine/linear.py);
    elsewhere it is a plain `F.linear`. small: the compiled `small_matmul`, given only without batch
    invariance, takes steps of 1-4 rows (SMALL_ROWS).
    """

    def __init__(
        self, linears: list[torch.nn.Linear], packed: bool, small: Any = None, matmul: Any = None, arena: HugePageArena | None = None, halves: bool = False
    ):
        """halves: two linears of one size (gate, up) packed as PackedLinear's halves."""
        self.weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.packed = PackedLinear(self.weight, self.bias, matmul, arena, halves) if packed else None
        self.small = small if packed and self.weight.is_contiguous() else None
        if packed and self.small is None:
            del self.weight  # the packed copy replaces it (the modules keep the originals)
        elif len(linears) > 1:  # the modules' weights become views of the fused one: no second copy on the device
            sizes = [lin.out_features for lin in linears]
            for lin, weight in zip(linears, self.weight.split(sizes), strict=True):
                lin.weight.data = weight
            if self.bias is not None:
                for lin, bias in zip(linears, self.bias.split(sizes), strict=True):
                    lin.bias.data = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.shape[0] <= SMALL_ROWS and x.is_contiguous():
            out = x.new_empty(x.shape[0], self.weight.shape[0])
            self.small.small_matmul(
                x.data_ptr(), self.weight.data_ptr(), None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
                x.shape[0], self.weight.shape[0], self.weight.shape[1], torch.get_num_threads(),
            )  # fmt: skip
            return out
        if self.packed is not None:
            return self.packed(x)
        return F.linear(x, self.weight, self.bias)


class RMSNorm:
    """transformers' llama RMSNorm, op for op: w * (x * rsqrt(mean(x^2) + eps)), in float32, after the residual add.

    kernel/lanes: the compiled add_rms_norm and the vector width of torch's sum it reproduces
    (`norm_lanes`), or None/0: torch ops.
    """

    def __init__(self, module: Any, kernel: Any = None, lanes: int = 0):  # Any: transformers' modules, read by attribute
        self.weight = module.weight.detach()
        self.eps = module.variance_epsilon
        self.kernel = kernel if lanes else None
        self.lanes = lanes

    def __call__(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden], the residual stream, with delta [T, hidden] added into it in place first -> normed [T, hidden]."""
        if self.kernel is not None:
            out = torch.empty_like(x)
            self.kernel.add_rms_norm(
                x.data_ptr(), None if delta is None else delta.data_ptr(), self.weight.data_ptr(), out.data_ptr(),
                x.shape[0], x.shape[1], self.eps, self.lanes, torch.get_num_threads(),
            )  # fmt: skip
            return out
        if delta is not None:
            x.add_(delta)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def norm_lanes(kernel: Any, hidden: int, eps: float) -> int:
    """The vector width (16 or 8) at which the compiled add_rms_norm gives torch's bits on this machine; 0: neither does."""
    gen = torch.Generator().manual_seed(0)
    x, delta, weight = torch.randn(33, hidden, generator=gen) * 4, torch.randn(33, hidden, generator=gen), torch.randn(hidden, generator=gen)
    module = types.SimpleNamespace(weight=weight, variance_epsilon=eps)
    want_x = x.clone()
    want = RMSNorm(module)(want_x, delta)
    for lanes in (16, 8):
        got_x = x.clone()
        if torch.equal(RMSNorm(module, kernel, lanes)(got_x, delta), want) and torch.equal(got_x, want_x):
            return lanes
    return 0


class Layer:
    """One decoder layer's weights, gathered out of its transformers modules."""

    def __init__(
        self,
        layer: Any,
        packed: bool,
        kernel: Any = None,
        lanes: int = 0,
        small: Any = None,
        matmul: Any = None,
        kv_dtype: torch.dtype = torch.float32,
        arena: HugePageArena | None = None,
    ):
        """kernel: the compiled llama ops (RoPE with the K/V write; the norms where lanes is not 0), or None: torch ops;
        small: the same library where steps of a few rows may take its small_matmul; matmul: the compiled matmul, or None;
        kv_dtype: the pool's element type, which picks the compiled K/V write (none for a pool it has none for);
        arena: where the compiled matmul's packed weights go, or None."""
        attn, mlp = layer.self_attn, layer.mlp
        self.store = rope_store_for(kernel, kv_dtype)  # RoPE and the K/V write in one compiled call, or None: torch ops
        self.index = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.widths = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.heads = attn.q_proj.out_features // attn.head_dim
        self.norm1 = RMSNorm(layer.input_layernorm, kernel, lanes)
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj], packed, small, matmul, arena)
        self.o = Projection([attn.o_proj], packed, small, matmul, arena)
        self.norm2 = RMSNorm(layer.post_attention_layernorm, kernel, lanes)
        self.inter = mlp.gate_proj.out_features
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], packed, small, matmul, arena, halves=True)
        self.down = Projection([mlp.down_proj], packed, small, matmul, arena)

    def __call__(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, step: StepContext) -> torch.Tensor:
        """x [T, hidden] the residual stream, delta [T, hidden] the last layer's output (None at the first), both added
        into x here; cos/sin [T, 1, D] -> this layer's output [T, hidden]."""
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv(self.norm1(x, delta))  # [T, (H + 2 KVH) D]
        q_width, k_width, _ = self.widths
        key = value = None
        if self.store is not None:  # rotated in place and keys/values written to the pool: step.kv_written
            kv = step.kv  # [layers, 2, KVH, NB, BS, D]; addresses, not indexing: ~20 us a layer less at one sequence
            keys = kv.data_ptr() + self.index * kv.stride(0) * kv.element_size()
            self.store(
                qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), step.slots.data_ptr(), keys, keys + kv.stride(1) * kv.element_size(),
                t, self.heads, kv.shape[2], d, qkv.shape[1], kv.shape[3] * kv.shape[4], kv.shape[4], 0, torch.get_num_threads(),
            )  # fmt: skip
            query = qkv[:, :q_width].view(t, self.heads, d).transpose(0, 1)  # [H, T, D]
        else:
            qk = rotate(qkv[:, : q_width + k_width].view(t, -1, d), cos, sin)  # [T, H + KVH, D]
            query = qk[:, : self.heads].transpose(0, 1)  # [H, T, D]
            key = qk[:, self.heads :].transpose(0, 1)  # [KVH, T, D]
            value = qkv[:, q_width + k_width :].view(t, -1, d).transpose(0, 1)  # [KVH, T, D]
        assert step.backend is not None  # the runner always gives one
        out = step.backend(self.index, query, key, value, self.scaling, step)  # [T, H, D]
        gate_up = self.gate_up(self.norm2(x, self.o(out.reshape(t, -1))))  # [T, 2 I], or padded halves [T, 2 I'] (PackedLinear)
        half, inter = gate_up.shape[1] // 2, self.inter  # slices, not chunk(): two views for one op
        return self.down(F.silu(gate_up[:, :inter]).mul_(gate_up[:, half : half + inter]))  # in place: one [T, I] buffer fewer, the same bits


def rope_store_for(kernel: Any, kv_dtype: torch.dtype) -> Any:
    """The compiled RoPE + K/V write for a pool of kv_dtype (float32, or float16 where the build converts half), or None."""
    if kernel is None:
        return None
    return {torch.float32: kernel.rope_store, torch.float16: getattr(kernel, "rope_store_f16", None)}.get(kv_dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (x cos + rotate_half(x) sin): x [T, N, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    turned = torch.empty_like(x)  # rotate_half(x) = (-x2, x1), written in place of transformers' cat
    torch.neg(x[..., half:], out=turned[..., :half])
    turned[..., half:].copy_(x[..., :half])
    return (x * cos).add_(turned.mul_(sin))


class LlamaForward:
    """A llama or qwen2 model's forward: flat token ids [T] -> logits of the kept rows [K, V]."""

    def __init__(
        self,
        model: Any,
        packed: bool,
        kernel: Any = None,
        invariant: bool = True,
        matmul: Any = None,
        attention: Any = None,
        kv_dtype: torch.dtype = torch.float32,
        screen: str = "off",
    ):
        """kernel: the compiled llama ops (the loader gives them only to a float32 CPU model), or None: torch ops;
        invariant False: steps of 1-4 rows take the compiled small_matmul (faster, other bits than a batch's);
        matmul: the compiled batch-invariant matmul for the packed weights, or None: oneDNN's;
        attention: the compiled paged attention library the step's backend calls, or None; kv_dtype: the pool's;
        screen: the lm_head's argmax screen (linear.ArgmaxScreen) for the rows read only for their argmax: "auto" where
        the CPU runs it in AMX tiles, "on" also in vectors, "off"; only on the compiled matmul's packed head."""
        self.kernel = kernel
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()  # [V, hidden]
        self.rotary = inner.rotary_emb
        # the compiled norm only where it gives torch's bits on this machine (else torch ops, RoPE still compiled)
        self.norm_lanes = norm_lanes(kernel, self.embed.shape[1], inner.norm.variance_epsilon) if kernel is not None else 0
        small = kernel if packed and not invariant else None
        arena = HugePageArena() if packed and matmul is not None else None  # every packed weight on 2 MiB pages, one after another
        self.layers = [Layer(layer, packed, kernel, self.norm_lanes, small, matmul, kv_dtype, arena) for layer in inner.layers]
        self.norm = RMSNorm(inner.norm, kernel, self.norm_lanes)
        self.lm_head = Projection([model.lm_head], packed, small, matmul, arena)
        self.screen = _screen(model.lm_head, self.lm_head, screen)
        # every layer in one compiled call, where each part has a compiled kernel with the same bits
        self.native = NativeLayers.build(self, attention, SMALL_ROWS, kv_dtype) if attention is not None else None

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: StepContext, argmax: Argmax | None = None) -> torch.Tensor:
        """ids, positions [T]; keep [K] rows whose logits are wanted -> [K, V]; argmax: which of them are read only
        for their argmax (their logits may be -inf but where they can be it: ArgmaxScreen)."""
        x = F.embedding(ids, self.embed)  # [T, hidden]
        cos, sin = self.rotary(x[None], positions[None])  # [1, T, D] each
        cos, sin = cos[0, :, None].contiguous(), sin[0, :, None].contiguous()  # [T, 1, D]
        step.kv_written = self.layers[0].store is not None
        if self.native is not None:  # built only for the runner's compiled attention backend
            return self.logits(self.norm(*self.native(x, cos, sin, step, keep)), argmax)
        delta: torch.Tensor | None = None
        for layer in self.layers:
            delta = layer(x, delta, cos, sin, step)
        assert delta is not None  # a model has layers
        return self.logits(self.norm(x[keep], delta[keep]), argmax)

    def logits(self, hidden: torch.Tensor, argmax: Argmax | None) -> torch.Tensor:
        """hidden [K, hidden] -> [K, V]: the lm_head, or for argmax's rows the screen (and the head where it gives up)."""
        if self.screen is None or argmax is None or not argmax.rows:
            return self.lm_head(hidden)
        rows = argmax.rows
        whole = len(rows) == hidden.shape[0]  # every kept row (rows are distinct): no gather, no copy
        screened, fallback = self.screen(hidden if whole else hidden[rows], argmax.limit)  # [S, V]
        if whole:
            logits = screened
        else:
            logits = hidden.new_empty(hidden.shape[0], screened.shape[1])
            logits[rows] = screened
            others = sorted(set(range(hidden.shape[0])) - set(rows))
            if others:
                logits[others] = self.lm_head(hidden[others])
        if fallback:
            redo = [rows[i] for i in fallback]
            logits[redo] = self.lm_head(hidden[redo])
        return logits


@dataclass
class Argmax:
    """The kept rows read only for their first argmax over logits [0, limit) (a greedy draw that reports no logprobs)."""

    rows: list[int]
    limit: int


def _screen(head: torch.nn.Linear, projection: Projection, mode: str) -> ArgmaxScreen | None:
    """The lm_head's argmax screen for mode auto/on/off, where the head runs on the compiled matmul without a bias."""
    packed = projection.packed
    kernel = packed.kernel if packed is not None and projection.small is None else None
    if mode == "off" or kernel is None or head.bias is not None or not hasattr(kernel, "screen_width") or kernel.screen_width() <= 0:
        return None
    tiles = bool(kernel.screen_tiles())
    if not tiles and mode == "auto":
        return None
    log.info("greedy rows take their argmax through the lm_head's bfloat16 screen, in %s", "AMX tiles" if tiles else "AVX512-BF16 vectors")
    return ArgmaxScreen(head.weight, packed, kernel, tiles)


def fits(model: Any) -> bool:
    """Whether every part of the model is a stock llama/qwen2 module this file reproduces."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
        return False
    if type(getattr(inner, "embed_tokens", None)) is not torch.nn.Embedding or not hasattr(inner, "rotary_emb"):
        return False
    return all(_stock(layer) for layer in layers) and type(getattr(inner, "norm", None)).__name__ in {parts[2] for parts in STOCK_LAYERS.values()}


def _stock(layer: Any) -> bool:
    """A decoder layer made of exactly the modules STOCK_LAYERS names, with plain linears and SiLU."""
    parts = STOCK_LAYERS.get(type(layer).__name__)
    if parts is None:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    names = (type(attn).__name__, type(mlp).__name__, type(layer.input_layernorm).__name__, type(layer.post_attention_layernorm).__name__)
    if names != (parts[0], parts[1], parts[2], parts[2]):
        return False
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(lin) is not torch.nn.Linear for lin in linears):
        return False
    if len({lin.bias is None for lin in linears[:3]}) != 1 or len({lin.bias is None for lin in linears[4:6]}) != 1:
        return False  # the projections fused into one matmul have biases all or none
    return type(mlp.act_fn).__name__ in {"SiLU", "SiLUActivation"} and attn.q_proj.out_features % attn.head_dim == 0
